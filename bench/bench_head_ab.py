"""The sharded head of this checkout against the one of a git revision, in the same gloo ranks, step by step.

This VM's per-core speed drifts by up to a third within minutes, so two separate runs of
bench_sharded_head.py cannot tell a 5% change from noise. Here both heads live in the same two ranks and
take turns (the order alternates every step), so drift hits both alike. Run from the repo root:

    .venv/bin/python bench/bench_head_ab.py 259c55a --classes 1e6 --rate 1
    .venv/bin/python bench/bench_head_ab.py bab787b --step-in-backward   # this checkout's head steps in backward
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and (inherited) in every rank

import argparse
import importlib.util
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from machine import apply_malloc, machine_line

from faceforge.heads import margin_spec
from faceforge.parallel import HeadOptimizer, ShardedMarginSoftmax

MODULE = "platform/parallel/sharded_softmax.py"
CHECKOUT = "this checkout"


def write_module_at(revision: str, directory: str) -> Path:
    """The sharded-softmax module as it was at `revision`, written once before the ranks start (two ranks
    writing it themselves would race: one could import the file while the other truncates it)."""
    source = subprocess.run(["git", "show", f"{revision}:{MODULE}"], capture_output=True, text=True, check=True)
    path = Path(directory) / "baseline_sharded_softmax.py"
    path.write_text(source.stdout)
    return path


def import_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_rank(rank: int, args: argparse.Namespace, port: int, baseline_path: Path, results: mp.SimpleQueue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    apply_malloc("keep")  # the trainer's allocator settings
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        classes, margin = int(args.classes), margin_spec("arcface")
        baseline = import_module(baseline_path).ShardedMarginSoftmax
        heads = {
            args.revision: baseline(classes, args.dim, margin, sample_rate=args.rate),
            CHECKOUT: ShardedMarginSoftmax(classes, args.dim, margin, sample_rate=args.rate),
        }
        optimizers = {name: HeadOptimizer(head, momentum=0.9, weight_decay=5e-4) for name, head in heads.items()}
        seconds: dict[str, list[float]] = {name: [] for name in heads}
        generator = torch.Generator().manual_seed(rank)
        for step in range(args.warmup + args.steps):
            features = torch.randn(args.batch, args.dim, generator=generator)
            labels = torch.randint(0, classes, (args.batch,), generator=generator)
            for name in list(heads)[:: 1 if step % 2 else -1]:
                dist.barrier()
                start = time.perf_counter()
                in_backward = args.step_in_backward and name == CHECKOUT
                if in_backward:
                    optimizers[name].step_in_next_backward(0.1)
                heads[name](features.clone().requires_grad_(), labels).backward()
                if not in_backward:
                    optimizers[name].step(0.1)
                dist.barrier()
                if step >= args.warmup:
                    seconds[name].append(time.perf_counter() - start)
        if rank == 0:
            results.put(seconds)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("revision", help="git revision of the baseline head")
    parser.add_argument("--classes", type=float, default=1e6)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--step-in-backward", action="store_true", help="this checkout's optimizer steps inside the backward"
    )
    args = parser.parse_args()
    print("machine: " + machine_line(f"torch {torch.__version__}", "2 gloo ranks, 1 thread each"))
    where = "in the backward for this checkout" if args.step_in_backward else "after the backward"
    print(f"C={args.classes:g} r={args.rate:g} D={args.dim} B={args.batch}/rank, ArcFace, SGD step {where}; s/step:")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as directory:
        baseline_path = write_module_at(args.revision, directory)
        mp.start_processes(run_rank, args=(args, port, baseline_path, results), nprocs=2, start_method="spawn")
        for name, times in results.get().items():
            print(f"{name:>14}: median {statistics.median(times):.3f}  ({' '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
