"""Read-only access to a job's MLflow run: which database it logs to, the run itself and its metric curves.

The web server never creates or migrates an MLflow database: opening one with MlflowClient while the
scheduler is still creating it would run a second migration into the first. A database counts as ready
once MLflow has finished initialising it, which is when its first experiment row appears.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from functools import cache
from pathlib import Path

import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from faceforge.jobs import Job
from faceforge.registry.selection import JOB_TAG

CURVES = ("loss", "lr", "img_per_s")


def tracking_uri(job: Job) -> str:
    return yaml.safe_load(job.config_yaml)["mlflow"]["tracking_uri"]


def database_ready(uri: str) -> bool:
    path = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or not path.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)) as db:
            return db.execute("SELECT 1 FROM experiments LIMIT 1").fetchone() is not None
    except sqlite3.DatabaseError:  # no tables yet, locked by the migration in progress, or not a database at all
        return False


def unreadable(uri: str, err: MlflowException) -> str:
    """What a page shows for an MLflow database it cannot read (made by an older MLflow, or damaged): MLflow's own
    first line, which says what to run, with the database named in it."""
    return f"MLflow database {uri}: " + str(err).splitlines()[0].replace("<database_uri>", uri)


@cache
def client(uri: str) -> MlflowClient:
    return MlflowClient(uri, registry_uri=uri)


def job_run(job: Job) -> Run | None:
    """The run recorded on the job row, else the one tagged with the job's id (the latest attempt)."""
    uri = tracking_uri(job)
    if not database_ready(uri):
        return None
    mlflow = client(uri)
    if job.mlflow_run_id:
        try:
            run = mlflow.get_run(job.mlflow_run_id)
            if run.info.lifecycle_stage == "active":  # get_run also returns deleted runs
                return run
        except MlflowException:  # garbage-collected, or the database was replaced: look for the job's tag instead
            pass
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    if not experiments:
        return None
    found = mlflow.search_runs(
        experiments, filter_string=f"tags.`{JOB_TAG}` = '{job.id}'", order_by=["attributes.start_time DESC"]
    )
    return found[0] if found else None


def curves(uri: str, run: Run) -> dict[str, list[tuple[float, float]]]:
    """Training curves first, then evaluation metrics (`eval.*`), each as (step, value) in step order."""
    keys = [key for key in CURVES if key in run.data.metrics]
    keys += sorted(key for key in run.data.metrics if key.startswith("eval."))
    mlflow = client(uri)
    histories = {}
    for key in keys:
        history = sorted(mlflow.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        histories[key] = [(float(m.step), float(m.value)) for m in history]
    return histories
