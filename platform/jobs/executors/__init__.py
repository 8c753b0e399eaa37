"""Executors run the queue's jobs: `local` on this machine (the default), `ray` on a Ray cluster."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from faceforge.jobs.executors.base import Executor, ExecutorUnreachableError, Status

# Imported on demand: `ray` is a heavy import that only clusters need.
EXECUTORS = {
    "local": ("faceforge.jobs.executors.local", "LocalExecutor"),
    "ray": ("faceforge.jobs.executors.ray_jobs", "RayExecutor"),
}


def get_executor(name: str, **options: Any) -> Executor:
    """An executor by name: local (slots=, grace_seconds=) or ray (address=)."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
    module, cls = EXECUTORS[name]
    return getattr(import_module(module), cls)(**options)


__all__ = ["EXECUTORS", "Executor", "ExecutorUnreachableError", "Status", "get_executor"]
