"""What benchmarks share about the machine: the line each prints first, so a figure always travels with what
produced it, and the --malloc setting of those that train."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path


def machine_line(*details: str) -> str:
    """CPU, cores, RAM, Python, load at start, then the script's own details (library versions, threads)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    ram_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    parts = [f"{cpu}, {os.cpu_count()} cores, {ram_kib / 2**20:.1f} GiB RAM, Python {platform.python_version()}"]
    return ", ".join([*parts, *details, f"load average {os.getloadavg()[0]:.2f} at start"])


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    """--malloc keep|default: measure with the trainer's allocator settings (the default) or glibc's own."""
    parser.add_argument(
        "--malloc", choices=["keep", "default"], default="keep", help="keep: the trainer's keep_freed_memory()"
    )


def apply_malloc(malloc: str) -> None:
    """Set up this process's allocator as --malloc says; call it in each rank before it allocates."""
    if malloc == "keep":
        from faceforge.train.allocator import keep_freed_memory  # here: faceforge.train imports torch

        keep_freed_memory()
