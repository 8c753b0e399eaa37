"""MLflow bookkeeping: the database and run are created by the launcher, rank 0 logs into the run."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from faceforge.train.torchrun import STOP_SIGNALS

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


@contextmanager
def run_always_ended(tracking_uri: str, hint: str, open_run: Callable[[], str]) -> Iterator[str]:
    """The MLflow run that `open_run` creates or reopens, recorded FINISHED when the block completes and FAILED
    otherwise, whatever stops the process meanwhile (see _RunStops); `hint` says how to carry on after a stop."""
    with _RunStops(hint) as stops:
        run_id = open_run()
        succeeded = False
        try:
            stops.release()
            yield run_id
            succeeded = True
        finally:
            stops.held_back = True
            finish_run(tracking_uri, run_id, succeeded)


class _RunStops:
    """Every stop ends the MLflow run, where the default SIGTERM would kill the process and leave the run RUNNING
    for good. While `held_back` (the run being created, then its end being recorded) a stop waits, then ends the
    process unless it is already ending; once released a stop ends the run at once, as FAILED, saying `hint`.
    Only the interpreter's own handlers are taken over: a caller's (the demo's Ctrl-C) still acts, raising through
    the code that ends the run. Training's handlers replace this one while steps run and restore it after."""

    def __init__(self, hint: str) -> None:
        self.hint, self.held_back, self.held = hint, True, 0

    def __enter__(self) -> _RunStops:
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
            handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
            defaults = (signal.SIG_DFL, signal.default_int_handler)
            self.previous = {sig: handler for sig, handler in handlers.items() if handler in defaults}
        for sig in self.previous:
            signal.signal(sig, self._stop)
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.held and kind is None:
            raise SystemExit(f"stopped by {signal.Signals(self.held).name} as the run ended")

    def release(self) -> None:
        """From here a stop ends the run at once; one held while the run was created does so now."""
        self.held_back, held, self.held = False, self.held, 0
        if held:
            self._stop(held, None)

    def _stop(self, signum: int, frame: object) -> None:
        if self.held_back:
            self.held = self.held or signum
        else:
            raise SystemExit(f"stopped by {signal.Signals(signum).name}; {self.hint}")


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
