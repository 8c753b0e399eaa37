"""Step time, memory and traffic of the sharded margin softmax against a replicated full FC.

Each configuration runs in fresh gloo ranks (one thread each), so peak RSS is that configuration's own.
A step is head forward + backward + optimizer step (SGD, momentum 0.9, weight decay 5e-4) on random
features that require grad. Another job on the machine skews the times, so each row also reports how
many cores other processes kept busy while it was timed; a configuration waits for a quiet machine and
is rerun once if another job got in. Run from the repo root:

    .venv/bin/python bench/bench_sharded_head.py                    # the full table, a few minutes
    .venv/bin/python bench/bench_sharded_head.py --classes 1e6 --naive-classes
    .venv/bin/python bench/bench_sharded_head.py --classes 1e5 1e6 --naive-classes --arcface-torch DIR

`--arcface-torch DIR` also times arcface_torch's own PartialFC_V2 and ArcFace, read from DIR (a checkout of
insightface's `recognition/arcface_torch`, which FaceForge neither ships nor imports), in the same ranks and
under the same SGD, so both heads are measured on one machine. Its code calls `.cuda()`; in its ranks
`Tensor.cuda` returns the tensor itself, so it runs on the CPU unchanged otherwise.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and (inherited) in every rank

import argparse
import importlib.util
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from machine import add_malloc_option, apply_malloc, machine_line
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from faceforge.heads import MarginSpec, margin_spec
from faceforge.parallel import HeadOptimizer, ShardedMarginSoftmax

FLOAT_BYTES, LABEL_BYTES = 4, 8
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


@dataclass(frozen=True)
class Config:
    kind: str  # "sharded", "naive" or "arcface_torch"
    classes: int
    sample_rate: float
    world_size: int
    dim: int
    batch: int
    warmup: int
    steps: int
    malloc: str  # "keep": the trainer's allocator settings; "default": glibc's
    head_step: str  # "backward": inside the head's backward, as the trainer does; "after": a separate step
    arcface_torch: Path | None = None  # the arcface_torch folder, for kind "arcface_torch"
    bf16: bool = False  # bfloat16 matmuls: ours via matmul_dtype, arcface_torch via its fp16 flag


@dataclass(frozen=True)
class RankResult:
    median_seconds: float
    peak_bytes: int
    increment_bytes: int  # peak RSS minus RSS just before the head was built
    machine_cpu_seconds: float  # every process on the machine, over the timed window
    own_cpu_seconds: float
    window_seconds: float


def proc_value(path: str, key: str) -> int:
    """First number after `key:` in a /proc file (kB for memory fields)."""
    with open(path) as lines:
        for line in lines:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from {path}")


def busy_cpu_seconds() -> float:
    """CPU time spent by every process on the machine since boot (from /proc/stat)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_busy_cores: float, timeout: float) -> None:
    """Wait (up to `timeout` s) until other jobs keep fewer than `max_busy_cores` cores busy."""
    deadline = time.monotonic() + timeout
    while True:
        start = busy_cpu_seconds()
        time.sleep(2.0)
        if (busy_cpu_seconds() - start) / 2.0 < max_busy_cores or time.monotonic() > deadline:
            return


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


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_step(config: Config) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A closure running one training step of the configured head on a batch."""
    margin = margin_spec("arcface")
    if config.kind == "arcface_torch":
        assert config.arcface_torch is not None
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # its code moves tensors to CUDA; here they stay
        if config.bf16:  # its fp16 flag opens a CUDA autocast; here it becomes the CPU's bfloat16 autocast
            torch.cuda.amp.autocast = lambda enabled=True: torch.autocast("cpu", torch.bfloat16, enabled=enabled)
        pfc = load_module(config.arcface_torch / "partial_fc_v2.py")
        losses = load_module(config.arcface_torch / "losses.py")
        module = pfc.PartialFC_V2(
            losses.ArcFace(64.0, 0.5), config.dim, config.classes, config.sample_rate, fp16=config.bf16
        )
        baseline_optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

        def arcface_torch_step(features: torch.Tensor, labels: torch.Tensor) -> None:
            baseline_optimizer.zero_grad(set_to_none=False)
            module(features, labels).backward()
            baseline_optimizer.step()

        return arcface_torch_step
    if config.kind == "sharded":
        matmul_dtype = torch.bfloat16 if config.bf16 else torch.float32
        head = ShardedMarginSoftmax(
            config.classes, config.dim, margin, sample_rate=config.sample_rate, matmul_dtype=matmul_dtype
        )
        head_optimizer = HeadOptimizer(head, kind="sgd", momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

        def sharded_step(features: torch.Tensor, labels: torch.Tensor) -> None:
            if config.head_step == "backward":
                head_optimizer.step_in_next_backward(LR)
            head(features, labels).backward()
            if config.head_step == "after":
                head_optimizer.step(LR)

        return sharded_step

    model = DistributedDataParallel(ReplicatedArcFace(config.classes, config.dim, margin))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def naive_step(features: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=False)
        model(features, labels).backward()
        optimizer.step()

    return naive_step


def run_rank(rank: int, config: Config, port: int, results: mp.SimpleQueue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    apply_malloc(config.malloc)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=config.world_size)
    try:
        torch.manual_seed(rank)
        rss_before_kib = proc_value("/proc/self/status", "VmRSS")
        step = build_step(config)
        times = []
        for i in range(config.warmup + config.steps):
            features = torch.randn(config.batch, config.dim, requires_grad=True)
            labels = torch.randint(0, config.classes, (config.batch,))
            dist.barrier()
            if i == config.warmup:
                window_start, machine_start, own_start = time.perf_counter(), busy_cpu_seconds(), time.process_time()
            start = time.perf_counter()
            step(features, labels)
            if i >= config.warmup:
                times.append(time.perf_counter() - start)
        dist.barrier()
        window = time.perf_counter() - window_start
        machine_cpu, own_cpu = busy_cpu_seconds() - machine_start, time.process_time() - own_start
        peak_kib = proc_value("/proc/self/status", "VmHWM")
        increment_kib = peak_kib - rss_before_kib
        results.put(
            RankResult(statistics.median(times), peak_kib * 1024, increment_kib * 1024, machine_cpu, own_cpu, window)
        )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(config: Config) -> dict[str, float]:
    """Median s/step (slowest rank), peak and incremental RSS (largest rank), and the cores other jobs
    kept busy while the steps were timed (the machine's CPU time minus the ranks' own, per second)."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(run_rank, args=(config, free_port(), results), nprocs=config.world_size, start_method="spawn")
    ranks: list[RankResult] = [results.get() for _ in range(config.world_size)]
    others_cpu = max(r.machine_cpu_seconds for r in ranks) - sum(r.own_cpu_seconds for r in ranks)
    return {
        "seconds": max(r.median_seconds for r in ranks),
        "peak_bytes": max(r.peak_bytes for r in ranks),
        "increment_bytes": max(r.increment_bytes for r in ranks),
        "other_cores": max(0.0, others_cpu) / max(r.window_seconds for r in ranks),
    }


def state_bytes(config: Config) -> int:
    """Weight + gradient + momentum held per rank: C/W · D · 4 bytes × 3 (replicated: C · D · 4 × 3); a sharded
    head stepping inside its backward holds no gradient buffer, so × 2."""
    in_backward = config.kind == "sharded" and config.head_step == "backward"
    rows = config.classes if config.kind == "naive" else config.classes / config.world_size
    return int(rows * config.dim * FLOAT_BYTES * (2 if in_backward else 3))


def traffic_bytes(config: Config) -> int:
    """Collective payload per step and rank, from tensor sizes (gathered buffers, reduced tensors)."""
    global_batch = config.world_size * config.batch
    if config.kind == "naive":
        return config.classes * config.dim * FLOAT_BYTES  # the gradient all-reduce
    gather = global_batch * (config.dim * FLOAT_BYTES + LABEL_BYTES)  # features + labels
    softmax_reduces = 3 * global_batch * FLOAT_BYTES  # max logit, target logit, sum of exponentials
    feature_grad = global_batch * config.dim * FLOAT_BYTES  # the all-gather's backward
    return gather + softmax_reduces + feature_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=float, nargs="*", default=[1e4, 1e5, 1e6])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--naive-classes", type=float, nargs="*", default=[1e5, 1e6])
    parser.add_argument("--arcface-torch", type=Path, help="also time arcface_torch's PartialFC_V2 from this folder")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    add_malloc_option(parser)
    parser.add_argument(
        "--head-step", choices=["backward", "after"], default="backward", help="where the head's SGD step runs"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="bfloat16 matmuls in the sharded head (and arcface_torch's fp16 path)"
    )
    parser.add_argument("--max-other", type=float, default=0.2, help="cores other jobs may use before a rerun")
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--quiet-timeout", type=float, default=120.0, help="seconds to wait for a quiet machine")
    args = parser.parse_args()

    threads = "OMP_NUM_THREADS=" + os.environ["OMP_NUM_THREADS"]
    print("machine: " + machine_line(f"torch {torch.__version__}", threads))
    print(
        f"W={args.world_size} gloo ranks, D={args.dim}, B={args.batch}/rank, ArcFace (s=64, m=0.5), "
        f"malloc={args.malloc}, the sharded head steps {'in' if args.head_step == 'backward' else 'after'} its "
        f"backward, {'bfloat16' if args.bf16 else 'float32'} matmuls"
    )
    print(f"step = forward + backward + SGD(momentum {MOMENTUM}, wd {WEIGHT_DECAY}); median of {args.steps}")
    print("memory: peak RSS per rank; increment = peak minus RSS just before the head was built;")
    print("        formula = weight + grad + momentum per rank (no grad when the step is in the backward);")
    print("        ratio = increment / formula")
    print("comm: collective payload per step from tensor sizes; other: cores busy with other jobs meanwhile\n")
    print("| head | C | r | s/step | peak RSS (GB) | increment (GB) | formula (GB) | ratio | comm/step (MB) | other |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    common = dict(world_size=args.world_size, dim=args.dim, batch=args.batch, warmup=args.warmup, steps=args.steps)
    common.update(malloc=args.malloc, head_step=args.head_step, bf16=args.bf16)
    runs = [Config("sharded", int(c), r, **common) for c in args.classes for r in args.rates]
    if args.arcface_torch:
        runs += [
            Config("arcface_torch", int(c), r, **common, arcface_torch=args.arcface_torch.resolve())
            for c in args.classes
            for r in args.rates
        ]
    runs += [Config("naive", int(c), 1.0, **common) for c in sorted(args.naive_classes)]
    naive_bytes_per_class = None
    for config in runs:
        if config.kind == "naive" and naive_bytes_per_class is not None:
            needed = naive_bytes_per_class * config.classes * config.world_size
            available = proc_value("/proc/meminfo", "MemAvailable") * 1024
            if needed > 0.75 * available:
                print(
                    f"| naive | {config.classes:.0e} | 1 | skipped: needs ~{needed / 1e9:.1f} GB on "
                    f"{config.world_size} ranks (scaled from the smaller run), {available / 1e9:.1f} GB free |"
                    " | | | | | |"
                )
                continue
        for _attempt in range(1 + args.retries):
            wait_for_quiet(args.max_other, args.quiet_timeout)
            result = measure(config)
            if result["other_cores"] <= args.max_other:
                break
        if config.kind == "naive":
            naive_bytes_per_class = result["increment_bytes"] / config.classes
        formula = state_bytes(config)
        print(
            f"| {config.kind} | {config.classes:.0e} | {config.sample_rate:g} | {result['seconds']:.3f} | "
            f"{result['peak_bytes'] / 1e9:.2f} | {result['increment_bytes'] / 1e9:.2f} | {formula / 1e9:.2f} | "
            f"{result['increment_bytes'] / formula:.2f} | {traffic_bytes(config) / 1e6:.2f} | "
            f"{result['other_cores']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
