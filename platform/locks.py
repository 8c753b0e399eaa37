"""The file locks the platform's processes hold while they live (a job's runner, a training run, a demo home), and
the ones they take turns on (a new database, a pack folder, the web token)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def try_lock(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int | None:
    """An open descriptor holding an exclusive lock on `path`, or None when another open file holds one. The lock
    lasts while the descriptor (or a process it was passed to) stays open, whatever kills the process."""
    descriptor = os.open(path, flags, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


@contextmanager
def held(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) for the block, waiting for whoever holds it: processes
    take turns. It goes with the open file, so a killed holder releases it."""
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
