"""Where a model to evaluate or embed with comes from: a checkpoint path or an MLflow model URI."""

from __future__ import annotations

from pathlib import Path

from torch import nn

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def load_model(source: str, tracking_uri: str | None = None) -> nn.Module:
    """A checkpoint directory (or its parent holding `latest`), or an MLflow URI such as models:/name@champion."""
    if source.startswith(MLFLOW_SCHEMES):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        return mlflow.pytorch.load_model(source, map_location="cpu").eval()
    from faceforge.train.checkpoint import load_backbone

    if not Path(source).exists():
        raise FileNotFoundError(f"model source {source} is neither an existing checkpoint nor an MLflow URI")
    return load_backbone(source)
