"""Step time, memory and traffic of the sharded margin softmax against a replicated full FC.

Each configuration runs in fresh gloo ranks (one thread each), so peak RSS is that configuration's own.
A step is head forward + backward + optimizer step (SGD, momentum 0.9, weight decay 5e-4) on random
features that require grad. Run from the repo root:

    .venv/bin/python bench/bench_sharded_head.py            # the full table, a few minutes
    .venv/bin/python bench/bench_sharded_head.py --classes 1e5 --rates 1 --naive-classes
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and (inherited) in every rank

import argparse
import platform
import socket
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from faceforge.heads import MarginSpec, margin_spec
from faceforge.parallel import HeadOptimizer, ShardedMarginSoftmax

FLOAT_BYTES, LABEL_BYTES = 4, 8
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


@dataclass(frozen=True)
class Config:
    kind: str  # "sharded" or "naive"
    classes: int
    sample_rate: float
    world_size: int
    dim: int
    batch: int
    warmup: int
    steps: int


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmRSS now, VmHWM peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


class ReplicatedArcFace(nn.Module):
    """The naive baseline: every rank holds the full C × D classifier, as with DDP over an nn.Linear."""

    def __init__(self, classes: int, dim: int, margin: MarginSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, dim).normal_(0.0, 0.01))
        self.margin = margin

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T
        rows = torch.arange(len(labels))
        target = self.margin.target_logit(cos[rows, labels])
        return F.cross_entropy(cos.index_put((rows, labels), target) * self.margin.scale, labels)


def build_step(config: Config):
    """The head and a closure running one training step on a fresh random batch."""
    margin = margin_spec("arcface")
    if config.kind == "sharded":
        head = ShardedMarginSoftmax(config.classes, config.dim, margin, sample_rate=config.sample_rate)
        head_optimizer = HeadOptimizer(head, kind="sgd", momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

        def step(features: torch.Tensor, labels: torch.Tensor) -> None:
            head(features, labels).backward()
            head_optimizer.step(LR)

        return head, step

    model = DistributedDataParallel(ReplicatedArcFace(config.classes, config.dim, margin))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step(features: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=False)
        model(features, labels).backward()
        optimizer.step()

    return model, step


def run_rank(rank: int, config: Config, port: int, results: mp.SimpleQueue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=config.world_size)
    try:
        torch.manual_seed(rank)
        rss_before_kib = status_kib("VmRSS")
        _, step = build_step(config)
        times = []
        for i in range(config.warmup + config.steps):
            features = torch.randn(config.batch, config.dim, requires_grad=True)
            labels = torch.randint(0, config.classes, (config.batch,))
            dist.barrier()
            start = time.perf_counter()
            step(features, labels)
            if i >= config.warmup:
                times.append(time.perf_counter() - start)
        peak_kib = status_kib("VmHWM")
        results.put((rank, statistics.median(times), peak_kib * 1024, (peak_kib - rss_before_kib) * 1024))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(config: Config) -> dict[str, float]:
    """Median s/step (slowest rank) and peak / incremental RSS (largest rank) in fresh processes."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        run_rank, args=(config, free_port(), results), nprocs=config.world_size, start_method="spawn"
    )
    per_rank = [results.get() for _ in range(config.world_size)]
    return {
        "seconds": max(r[1] for r in per_rank),
        "peak_bytes": max(r[2] for r in per_rank),
        "increment_bytes": max(r[3] for r in per_rank),
    }


def state_bytes(config: Config) -> int:
    """Weight + gradient + momentum held per rank: C/W · D · 4 bytes × 3 (replicated: C · D · 4 × 3)."""
    rows = config.classes / config.world_size if config.kind == "sharded" else config.classes
    return int(rows * config.dim * FLOAT_BYTES * 3)


def traffic_bytes(config: Config) -> int:
    """Collective payload per step, from tensor sizes (the received all-gather buffers, reduced tensors)."""
    global_batch = config.world_size * config.batch
    if config.kind == "naive":
        return config.classes * config.dim * FLOAT_BYTES  # the gradient all-reduce
    gather = global_batch * (config.dim * FLOAT_BYTES + LABEL_BYTES)  # features + labels
    softmax_reduces = 3 * global_batch * FLOAT_BYTES  # row max, target logit, sum of exponentials
    feature_grad = global_batch * config.dim * FLOAT_BYTES  # backward of the all-gather
    return gather + softmax_reduces + feature_grad


def machine_line() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    ram_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram_kib / 2**20:.1f} GiB RAM, torch {torch.__version__}, "
        f"1 thread per rank (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}), "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )


def available_bytes() -> int:
    kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    return kib * 1024


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--naive-classes", type=float, nargs="*", default=[1e5, 1e6])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    print(f"machine: {machine_line()}")
    print(f"W={args.world_size} gloo ranks, D={args.dim}, B={args.batch}/rank, ArcFace (s=64, m=0.5)")
    print(f"step = forward + backward + SGD(momentum {MOMENTUM}, wd {WEIGHT_DECAY}); median of {args.steps}")
    print("memory: peak RSS per rank; increment = peak minus RSS just before the head was built;")
    print("        formula = weight + grad + momentum per rank; ratio = increment / formula\n")
    header = "| head | C | r | s/step | peak RSS (GB) | increment (GB) | formula (GB) | ratio | comm/step (MB) |"
    print(header)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    common = dict(world_size=args.world_size, dim=args.dim, batch=args.batch, warmup=args.warmup)
    runs = [("sharded", int(c), r) for c in args.classes for r in args.rates]
    runs += [("naive", int(c), 1.0) for c in args.naive_classes]
    naive_increment_per_class = None
    for kind, classes, rate in runs:
        config = Config(kind, classes, rate, steps=args.steps, **common)
        if kind == "naive" and naive_increment_per_class is not None:
            needed = naive_increment_per_class * classes * args.world_size
            if needed > 0.75 * available_bytes():
                print(
                    f"| naive | {classes:.0e} | 1 | skipped: needs ~{gb(needed)} GB over {args.world_size}"
                    f" ranks (scaled from the smaller run), {gb(available_bytes())} GB available | | | | | |"
                )
                continue
        result = measure(config)
        if kind == "naive":
            naive_increment_per_class = result["increment_bytes"] / classes
        formula = state_bytes(config)
        print(
            f"| {kind} | {classes:.0e} | {rate:g} | {result['seconds']:.3f} | {gb(result['peak_bytes'])} | "
            f"{gb(result['increment_bytes'])} | {gb(formula)} | {result['increment_bytes'] / formula:.2f} | "
            f"{mb(traffic_bytes(config))} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
