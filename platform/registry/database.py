"""The MLflow database: where it lives by default, and creating it once before concurrent jobs use it."""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from faceforge.locks import held


def default_tracking_uri() -> str:
    """The trainer's default (configs/train.yaml: mlflow.tracking_uri)."""
    return f"sqlite:///{os.environ.get('FACEFORGE_HOME', 'runs')}/mlflow.db"


def database_path(tracking_uri: str) -> Path:
    if not tracking_uri.startswith("sqlite:///"):
        raise ValueError(f"tracking URI must be sqlite:///<path>, got {tracking_uri!r}")
    return Path(tracking_uri.removeprefix("sqlite:///"))


def open_database(tracking_uri: str) -> MlflowClient:
    """A tracking and registry client on an existing database; MLflow would create an empty one at a typo.

    MLflow reads the database's tables as it opens it: ValueError when the file is not an SQLite database or is
    damaged (a one-line error for the user, not a SQLAlchemy traceback).
    """
    from sqlalchemy.exc import DatabaseError  # MLflow imports it to open the file; at the top, 0.3 s per import

    path = database_path(tracking_uri)
    if not path.is_file():
        raise FileNotFoundError(f"no MLflow database at {path}")
    try:
        return MlflowClient(tracking_uri, registry_uri=tracking_uri)
    except DatabaseError as err:
        raise ValueError(f"{path} is not a readable MLflow database ({err.orig})") from None


def prepare_tracking(tracking_uri: str, experiment: str = "faceforge") -> str:
    """Create the database, its tables and the experiment from this one process; returns the experiment id.

    MLflow migrates an empty SQLite database on first use without any lock, so jobs that start together on a
    fresh database break each other's migrations. Call this before enqueueing or starting them; processes that
    prepare at once (exports, demo services) take turns on a lock beside the database. Artifacts go next to the
    database rather than into ./mlruns of whichever directory a job happens to run in.
    """
    path = database_path(tracking_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with held(path.with_suffix(".prepare.lock")):
        return _prepare(tracking_uri, path, experiment)


def _prepare(tracking_uri: str, path: Path, experiment: str) -> str:
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {experiment!r} was deleted: restore it (`mlflow experiments restore --experiment-id "
            f"{found.experiment_id}` with MLFLOW_TRACKING_URI={tracking_uri}) or set mlflow.experiment to another name"
        )
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=(path.parent / "artifacts").resolve().as_uri())
    except MlflowException as err:  # another process created it meanwhile
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(experiment).experiment_id
