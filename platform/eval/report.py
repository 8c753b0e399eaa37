"""Verification results for a model or fixed features on a pair set: metrics dict, ROC plot, printout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from faceforge.eval.embed import Embedder, embed_images
from faceforge.eval.metrics import eer, kfold_accuracy, roc_auc, roc_curve, tar_at_far

if TYPE_CHECKING:
    from faceforge.data.verification import VerificationSet


def pair_scores(features: np.ndarray, vset: VerificationSet) -> np.ndarray:
    """Cosine similarity of each pair; rows of `features` follow `vset.images` and need not be normalised.

    An all-zero row (a dead embedding, seen in barely trained tiny models) scores 0 with anything, as in sklearn's
    cosine_similarity: the model is scored as poor rather than the evaluation failing after the training.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) != len(vset.images):
        raise ValueError(
            f"{vset.name}: need one feature row per image ({len(vset.images)}), got shape {features.shape}"
        )
    if not np.isfinite(features).all():
        raise ValueError(f"{vset.name}: features contain NaN or infinity (has the model diverged?)")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = features / np.where(norms > 0, norms, 1.0)
    return np.einsum("ij,ij->i", unit[vset.left], unit[vset.right])


def evaluate_verification(features: np.ndarray, vset: VerificationSet) -> dict[str, float]:
    """k-fold accuracy over the set's folds, the mean fitted threshold, TAR@FAR, ROC AUC and EER."""
    scores = pair_scores(features, vset)
    accuracy, accuracy_std, thresholds = kfold_accuracy(scores, vset.issame, vset.folds)
    metrics = {
        "accuracy": accuracy,
        "accuracy_std": accuracy_std,
        "best_threshold": float(thresholds.mean()),
    }
    for far, tar in tar_at_far(scores, vset.issame).items():
        metrics[f"tar_far_{far:.0e}"] = tar  # MLflow metric names allow no "@" or "="
    metrics["roc_auc"] = roc_auc(scores, vset.issame)
    metrics["eer"] = eer(scores, vset.issame)
    return metrics


def save_roc_plot(scores: np.ndarray, issame: np.ndarray, path: str | Path, title: str) -> Path:
    """Write the ROC as a PNG with a log FAR axis, where face-recognition operating points live."""
    far, tar, _ = roc_curve(scores, issame)
    measurable = far > 0  # log axis: FAR 0 cannot be drawn
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    label, lone = f"AUC {roc_auc(scores, issame):.4f}", measurable.sum() == 1  # all scores tied: one point
    ax.step(far[measurable], tar[measurable], where="post", label=label, marker="o" if lone else None)
    ax.set_xscale("log")
    ax.set_xlim(min(far[measurable].min(), 1.0 / max(1, int((~issame).sum())), 0.1), 1.0)  # never an empty range
    ax.set_ylim(0.0, 1.005)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return write_png(fig, path)


def write_png(fig: Figure, path: str | Path) -> Path:
    """Lay out and write a figure drawn on an Agg canvas (no pyplot state, safe in any thread)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def format_metrics(metrics: dict[str, float]) -> str:
    """One aligned `name  value` line per metric, for logs and the CLI."""
    width = max((len(name) for name in metrics), default=0)
    return "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in metrics.items())


def evaluate_model(
    model: nn.Module | Embedder,
    vset: VerificationSet,
    *,
    input_size: int,
    crop_fraction: float,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    roc_path: str | Path | None = None,
) -> dict[str, float]:
    """Embed every distinct image of the set once (with flip), then score its pairs."""
    features = embed_images(
        model,
        vset.images,
        input_size=input_size,
        crop_fraction=crop_fraction,
        batch_size=batch_size,
        device=device,
        names=vset.sources,
    )
    metrics = evaluate_verification(features, vset)
    if roc_path is not None:
        save_roc_plot(pair_scores(features, vset), vset.issame, roc_path, title=vset.name)
    return metrics
