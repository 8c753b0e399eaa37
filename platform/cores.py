"""The cores this process may run on: taskset and a container's cpuset give it fewer than the machine has."""

from __future__ import annotations

import os


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
