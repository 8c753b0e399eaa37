"""The teacher: a checkpoint or an MLflow model, frozen, and a stable identity for the feature cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from faceforge.eval.sources import MLFLOW_SCHEMES, load_model
from faceforge.train.checkpoint import resolve_checkpoint
from faceforge.train.config import ConfigError

_HASH_CHUNK = 1 << 20


def _mlflow_error(source: str, err: Exception) -> ConfigError:
    return ConfigError(f"distill.teacher {source}: {str(err).splitlines()[0]}")


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


def teacher_identity(source: str, tracking_uri: str | None = None) -> str:
    """What the teacher's weights are, independent of where they were read from.

    A checkpoint is its model.pt's SHA-256 (retraining into the same folder changes it); a registered model
    is its name and resolved version, so `@champion` moving to a new version changes it; runs:/ and
    mlflow-artifacts:/ URIs name immutable artifacts and stand for themselves.
    """
    if source.startswith("models:/"):
        from mlflow.exceptions import MlflowException
        from mlflow.store.artifact.utils.models import get_model_name_and_version
        from mlflow.tracking import MlflowClient

        try:
            resolved = get_model_name_and_version(MlflowClient(tracking_uri), source)
        except MlflowException as err:
            raise _mlflow_error(source, err) from None
        return "models:/" + "/".join(str(part) for part in resolved)
    if source.startswith(MLFLOW_SCHEMES):
        return source
    digest = hashlib.sha256()
    with open(resolve_checkpoint(Path(source)) / "model.pt", "rb") as weights:
        while chunk := weights.read(_HASH_CHUNK):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
