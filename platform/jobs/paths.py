"""Where the queue keeps its files: under $FACEFORGE_HOME (default ./runs), next to the MLflow database."""

from __future__ import annotations

import os
from pathlib import Path


def faceforge_home() -> Path:
    return Path(os.environ.get("FACEFORGE_HOME", "runs"))


def store_path(home: Path | None = None) -> Path:
    """The job store every submitter and scheduler of one home shares."""
    return (home or faceforge_home()) / "jobs.db"


def job_dir(home: Path, job_id: str) -> Path:
    """A job's output directory: checkpoints, log, exit code; every attempt of the job reuses it."""
    return home / "jobs" / job_id
