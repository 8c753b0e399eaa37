"""The job queue: a SQLite store of jobs, the scheduler that claims them and the executors that run them."""

from faceforge.jobs.spec import compose_config, expand_sweep, make_jobs, train_command
from faceforge.jobs.store import CANCELLED, FAILED, LOST, QUEUED, RUNNING, STATES, SUCCEEDED, TERMINAL, Job, JobStore

__all__ = [
    "CANCELLED",
    "FAILED",
    "LOST",
    "QUEUED",
    "RUNNING",
    "STATES",
    "SUCCEEDED",
    "TERMINAL",
    "Job",
    "JobStore",
    "compose_config",
    "expand_sweep",
    "make_jobs",
    "train_command",
]
