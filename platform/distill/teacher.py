"""The teacher: a checkpoint or an MLflow model, frozen, and an identity of its weights for the feature cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from faceforge.eval.sources import load_model
from faceforge.train.config import ConfigError


def load_teacher(source: str, tracking_uri: str | None, device: torch.device) -> nn.Module:
    """Eval mode with every parameter frozen: BatchNorm statistics and weights never move."""
    try:
        teacher = load_model(source, tracking_uri)
    except (FileNotFoundError, ValueError) as err:  # no checkpoint, a foreign one, or an unknown MLflow model
        raise ConfigError(f"distill.teacher: {str(err).splitlines()[0]}") from None
    for attribute in ("input_size", "embedding_dim"):
        if not isinstance(getattr(teacher, attribute, None), int):
            raise ConfigError(f"distill.teacher {source} is not a FaceForge backbone (no {attribute})")
    return teacher.to(device).eval().requires_grad_(False)


IDENTITY_PREFIX = "weights-sha256:"  # older checkpoints named a teacher by its file's hash or its MLflow URI


def teacher_identity(teacher: nn.Module) -> str:
    """What the teacher computes: a SHA-256 of its architecture and every weight and buffer.

    No name stands for weights: a checkpoint folder is retrained into, a resumed MLflow run logs its model again
    under the same `runs:/` URI, and a registered model deleted and registered anew starts again at version 1.
    """
    digest = hashlib.sha256(repr(teacher).encode())
    for name, tensor in teacher.state_dict().items():
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {values.dtype} {tuple(values.shape)}".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy())
    return IDENTITY_PREFIX + digest.hexdigest()


def check_same_teacher(saved: str, identity: str, checkpoint: Path, source: str) -> None:
    """A resumed run must learn from the teacher its checkpoint learnt from: `saved` and `identity` are their
    teacher_identity. One saved before weight hashes (no IDENTITY_PREFIX) cannot be compared and is taken on trust."""
    if saved.startswith(IDENTITY_PREFIX) and saved != identity:
        raise ConfigError(
            f"trainer.resume {checkpoint} was distilled from teacher {saved}; distill.teacher {source} now holds "
            "other weights: resume with that teacher or start a new run"
        )
