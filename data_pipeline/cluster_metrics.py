"""Scores of a clustering against true identities: pairwise and BCubed precision/recall/F, NMI, cluster counts.

With n_ij the number of faces in predicted cluster i and true identity j, a_i = Σ_j n_ij, b_j = Σ_i n_ij, N faces:
- pairwise, over ordered pairs of distinct faces: TP = Σ n_ij² − N, predicted pairs Σ a_i² − N, true pairs
  Σ b_j² − N; precision = TP / predicted pairs, recall = TP / true pairs (1.0 when there are no pairs to get
  wrong: all-singleton predictions are perfectly precise). Large clusters dominate, as pairs grow with size².
- BCubed (Bagga & Baldwin 1998; Amigó et al. 2009), per face then averaged: precision = Σ_ij n_ij² / a_i / N,
  recall = Σ_ij n_ij² / b_j / N. Every face counts once.
- NMI = I(pred; true) / mean(H(pred), H(true)), natural logs, arithmetic mean (sklearn's default); 1.0 when both
  are a single cluster.
F is the harmonic mean of precision and recall in both families.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClusterScores:
    pairwise_precision: float
    pairwise_recall: float
    pairwise_f: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f: float
    nmi: float
    clusters: int
    singletons: int
    identities: int
    faces: int

    def format(self) -> str:
        return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in asdict(self).items())


def _f(precision: float, recall: float) -> float:
    return float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts / n
    return float(-(p * np.log(p)).sum())


def _numbered(labels: np.ndarray | list) -> np.ndarray:
    """Each label's number, by Python equality: numpy would turn [1, "1"] into one string label and cannot sort None.
    NaN equals nothing, not even itself, so it is refused rather than made a cluster per face."""
    labels = list(labels)
    if any(isinstance(label, float) and math.isnan(label) for label in labels):
        raise ValueError("labels contain NaN (missing labels?): give every face a label")
    number = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    return np.array([number[label] for label in labels], dtype=np.int64)


def cluster_scores(predicted: np.ndarray | list, truth: np.ndarray | list) -> ClusterScores:
    """Scores of predicted cluster labels against true identity labels (any hashable values, one per face)."""
    shapes = np.shape(predicted), np.shape(truth)
    if shapes[0] != shapes[1] or len(shapes[0]) != 1 or shapes[0][0] == 0:
        raise ValueError(f"need two equal-length, non-empty label lists, got {shapes[0]} and {shapes[1]}")
    n = len(predicted)
    pred, true = _numbered(predicted), _numbered(truth)
    cells, cell_of = np.unique(pred * (true.max() + 1) + true, return_inverse=True)
    n_ij = np.bincount(cell_of.ravel()).astype(np.float64)
    pred_of_cell, true_of_cell = cells // (true.max() + 1), cells % (true.max() + 1)
    a = np.bincount(pred).astype(np.float64)
    b = np.bincount(true).astype(np.float64)

    tp = (n_ij**2).sum() - n
    predicted_pairs, true_pairs = (a**2).sum() - n, (b**2).sum() - n
    pw_p = tp / predicted_pairs if predicted_pairs else 1.0
    pw_r = tp / true_pairs if true_pairs else 1.0
    bc_p = float((n_ij**2 / a[pred_of_cell]).sum() / n)
    bc_r = float((n_ij**2 / b[true_of_cell]).sum() / n)

    h_pred, h_true = _entropy(a, n), _entropy(b, n)
    mutual = float((n_ij / n * np.log(n_ij * n / (a[pred_of_cell] * b[true_of_cell]))).sum())
    # I <= min(H) <= mean(H) in exact arithmetic; the clip only removes rounding error.
    nmi = 1.0 if h_pred == 0 and h_true == 0 else min(max(mutual, 0.0) / ((h_pred + h_true) / 2), 1.0)
    return ClusterScores(
        pairwise_precision=float(pw_p),
        pairwise_recall=float(pw_r),
        pairwise_f=_f(pw_p, pw_r),
        bcubed_precision=bc_p,
        bcubed_recall=bc_r,
        bcubed_f=_f(bc_p, bc_r),
        nmi=nmi,
        clusters=len(a),
        singletons=int((a == 1).sum()),
        identities=len(b),
        faces=n,
    )


def read_assignments(path: str | Path) -> dict[str, str]:
    """Face -> label from a `.csv` with a `path,label` header and one row per face, or a `.json` object
    {"<path>": <label>, ...}. Labels are compared as text, so 3 and "3" are the same cluster."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if path.suffix.lower() == ".json":
        try:
            text = path.read_text(encoding="utf-8-sig")
            data = json.loads(text, object_pairs_hook=lambda pairs: _unique(path, pairs))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object mapping path to label")
        return {str(face): str(label) for face, label in data.items()}
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path}: expected a .csv (path,label) or .json ({{path: label}}) file")
    try:
        return _read_csv(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def _unique(path: Path, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The pairs as a dict; a path given twice, with one label or two, is refused rather than one of them kept."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"{path}: {key} is listed twice")
        found[key] = value
    return found


def _read_csv(path: Path) -> dict[str, str]:
    with path.open(newline="", encoding="utf-8-sig") as stream:  # -sig: Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(stream)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the CSV needs a header row with the columns path,label")
        rows = []
        for row in reader:
            if row["label"] is None:
                raise ValueError(f"{path}: row for {row['path']} has no label")
            rows.append((row["path"], row["label"]))
    return _unique(path, rows)


def score_files(predicted: str | Path, truth: str | Path) -> ClusterScores:
    """Scores of a predicted-cluster file against a true-label file; both must list the same faces."""
    pred, true = read_assignments(predicted), read_assignments(truth)
    if pred.keys() != true.keys():
        only_pred, only_true = sorted(pred.keys() - true.keys()), sorted(true.keys() - pred.keys())
        example = (only_pred or only_true)[0]
        raise ValueError(
            f"the files list different faces: {len(only_pred)} only in {predicted}, {len(only_true)} only in "
            f"{truth} (e.g. {example})"
        )
    faces = sorted(pred)
    return cluster_scores([pred[f] for f in faces], [true[f] for f in faces])
