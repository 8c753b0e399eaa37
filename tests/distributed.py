"""Spawn real gloo process groups for tests: `run_ranks(fn, W, *args)` calls fn(rank, W, *args)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, store: Path, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # No rank tears down its gloo connections while another still uses them: that race aborts a rank
        # ("terminate called without an active exception") after its work has passed.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run fn on `world_size` gloo ranks; an assertion failing on any rank fails the caller.

    The ranks meet through a file, not a TCP port picked beforehand: another process could take such a port
    between the pick and rank 0's bind, a second or more later (rank 0 imports torch first)."""
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "store"
        mp.start_processes(_entry, args=(world_size, store, fn, args), nprocs=world_size, start_method="spawn")
