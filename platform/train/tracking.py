"""MLflow bookkeeping: the database and run are created by the launcher, rank 0 logs into the run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH
from torch import nn

from faceforge.registry.database import prepare_tracking

for _noisy in ("mlflow", "alembic", "faiss.loader"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def create_run(
    tracking_uri: str, experiment: str, run_name: str | None, params: dict[str, Any], tags: dict[str, str]
) -> str:
    """Create the database, experiment and run from one process, before any rank writes to it (a fresh SQLite
    database migrated by several processes at once breaks MLflow); artifacts go beside the database."""
    experiment_id = prepare_tracking(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    flat = [Param(key, str(value)) for key, value in flatten(params).items()]
    for start in range(0, len(flat), MAX_PARAMS_TAGS_PER_BATCH):  # a write per batch, not per param
        client.log_batch(run.info.run_id, params=flat[start : start + MAX_PARAMS_TAGS_PER_BATCH])
    return run.info.run_id


def finish_run(tracking_uri: str, run_id: str, succeeded: bool) -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, "FINISHED" if succeeded else "FAILED")


class RunTracker:
    """Rank 0's handle on its MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.tracking_uri = tracking_uri

    def metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def model(self, model: nn.Module, input_size: int, step: int) -> None:
        """Log the backbone as an MLflow PyTorch model that loads as a module accepting any batch size.

        MLflow 3 defaults to torch.export's pt2 format, which fixes the batch to the example's; the pickle
        format keeps the nn.Module (faceforge must be importable where it is loaded).
        """
        example = np.zeros((2, 3, input_size, input_size), dtype=np.float32)
        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(
                model.eval(),
                name="model",
                input_example=example,
                serialization_format="pickle",
                step=step,  # a resumed run that logs its model again: selection takes the latest step's
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "faceforge"],
            )
