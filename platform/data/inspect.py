"""Format detection and a one-screen summary of any dataset FaceForge reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from faceforge.data.folder import ImageFolderDataset
from faceforge.data.image import decode_image
from faceforge.data.record_dataset import RecordDataset
from faceforge.data.verification import VerificationSet, load_bin, load_pairs


def open_dataset(path: str | Path, transform: Callable | None = None) -> ImageFolderDataset | RecordDataset:
    """A directory holding train.rec is InsightFace RecordIO; any other is an identity-folder tree."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: training data must be a directory (identity folders or train.rec)")
    if (path / "train.rec").is_file():
        return RecordDataset(path, transform)
    return ImageFolderDataset(path, transform)


def _training_summary(kind: str, path: Path, dataset: ImageFolderDataset | RecordDataset) -> dict[str, Any]:
    counts = np.unique(dataset.labels, return_counts=True)[1]
    return {
        "kind": kind,
        "path": str(path),
        "identities": len(counts),
        "images": len(dataset),
        "images_per_identity": {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "max": int(counts.max()),
        },
        "image_size": list(dataset.read_image(0).shape[:2]),
    }


def _verification_summary(kind: str, path: Path, vset: VerificationSet) -> dict[str, Any]:
    return {
        "kind": kind,
        "path": str(path),
        "name": vset.name,
        "images": len(vset.images),
        "pairs": vset.num_pairs,
        "same_pairs": int(vset.issame.sum()),
        "folds": vset.num_folds,
        "image_size": list(decode_image(vset.images[0], f"{path} image 0").shape[:2]),
    }


def inspect_dataset(path: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """Summarise a folder tree, a RecordIO directory, a `.bin` or a pairs file (images under `root`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    if path.is_dir():
        dataset = open_dataset(path)
        if isinstance(dataset, RecordDataset):
            summary = _training_summary("recordio", path, dataset)
            summary["num_classes"] = dataset.num_classes
            return summary
        return _training_summary("folder", path, dataset)
    if path.suffix.lower() == ".bin":
        return _verification_summary("bin", path, load_bin(path))
    if path.suffix.lower() == ".txt":
        vset = load_pairs(path, root if root is not None else path.parent)
        return _verification_summary("pairs", path, vset)
    raise ValueError(f"{path}: unknown dataset format (expected a directory, a .bin or a pairs .txt)")


def format_summary(summary: dict[str, Any]) -> str:
    """Aligned `key: value` lines for the terminal."""
    width = max(len(key) for key in summary)
    lines = []
    for key, value in summary.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        elif key == "image_size":
            value = "x".join(str(v) for v in value)
        lines.append(f"{key.replace('_', ' '):<{width}}  {value}")
    return "\n".join(lines)
