"""What the scheduler needs from an executor: capacity, idempotent start, status, stop and logs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from faceforge.jobs.store import Job


class ExecutorUnreachableError(ConnectionError):
    """The executor could not be asked (a cluster head down, slow or answering 5xx): the scheduler asks again
    next tick. Any other error from a start fails the job, which would otherwise hold its slots for good."""


@dataclass(frozen=True)
class Status:
    """An executor's view of a job: still running, or finished with a terminal state and exit code."""

    state: str  # running, succeeded, failed, cancelled or lost (store constants)
    exit_code: int | None = None
    error: str | None = None


class Executor(Protocol):
    name: str
    # True when the job's output stays with the executor (a Ray head, which forgets it with the submission):
    # the scheduler then copies it into job.log_path as it polls, where the web page and the demo read it.
    remote_log: bool

    def capacity(self) -> int:
        """Slots this executor can run at once (cores here, cluster CPUs or GPUs for Ray)."""

    def start(self, job: Job, job_dir: Path) -> str:
        """Start the job, or find it already started under its id; returns the handle to store."""

    def status(self, job: Job) -> Status:
        """Where the job stands, from its stored handle."""

    def find(self, job: Job, job_dir: Path) -> str | None:
        """The handle of a start of this job that landed but was never recorded (its scheduler died in between),
        or None when no start did."""

    def stop(self, job: Job) -> None:
        """Ask the job to stop (SIGTERM or its equivalent), then force it after a grace period."""

    def read_log(self, job: Job, offset: int = 0) -> tuple[str, int]:
        """Log text from byte `offset` on, and the offset to continue from."""


def threads_per_rank(job: Job) -> int:
    """OpenMP threads for each rank: the job's slots shared by its trainer.nproc ranks, at least one."""
    return max(1, job.slots // int(yaml.safe_load(job.config_yaml)["trainer"]["nproc"]))
