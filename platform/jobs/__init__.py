"""The job queue: a SQLite store of jobs, the scheduler that claims them and the executors that run them."""

from typing import TYPE_CHECKING

from faceforge.jobs.paths import faceforge_home, job_dir, store_path
from faceforge.jobs.scheduler import retry
from faceforge.jobs.store import (
    CANCELLED,
    FAILED,
    LOST,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    TERMINAL,
    Job,
    JobStore,
    JobStoreBusyError,
)

if TYPE_CHECKING:
    from faceforge.jobs.spec import (
        compose_config,
        expand_sweep,
        make_jobs,
        merge_overrides,
        override_key,
        override_value,
        quoted_path,
        train_command,
    )

# Job specs compose Hydra configs, which imports torch and MLflow (seconds); they load on first use, so that
# users of the store alone (`faceforge queue list/show/cancel/logs`) start at once.
_SPEC = (
    "compose_config",
    "expand_sweep",
    "make_jobs",
    "merge_overrides",
    "override_key",
    "override_value",
    "quoted_path",
    "train_command",
)


def __getattr__(name: str) -> object:
    if name in _SPEC:
        from faceforge.jobs import spec

        return getattr(spec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "JobStoreBusyError",
    "compose_config",
    "expand_sweep",
    "faceforge_home",
    "job_dir",
    "make_jobs",
    "merge_overrides",
    "override_key",
    "override_value",
    "quoted_path",
    "retry",
    "store_path",
    "train_command",
]
