"""glibc malloc settings for training: keep freed memory in the process instead of handing it back.

A training step frees and reallocates the same large activations every step. By default glibc serves
each block above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap, and trims freed heap
back to the kernel, so every step page-faults its activations in again. On this 2-core CPU that made
MobileFaceNet on 2 ranks train at 31 img/s instead of 49 at the same peak RSS (bench/bench_train_throughput.py
with and without it; docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # from <malloc.h>
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: trim only a free top of heap above 2 GiB


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep freed heap; False (nothing changed) off glibc."""
    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):  # not glibc (macOS, musl): its allocator has its own policy
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
