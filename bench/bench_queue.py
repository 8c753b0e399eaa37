"""Job queue overheads with the local executor: submit-to-running latency, enqueueing 1,000 jobs, sweep overhead.

- latency: one tiny job at a time is submitted to an idle `faceforge scheduler` (a subprocess, polling every
  --poll-seconds) at a random moment of its cycle. "claimed" is submit to the job's state turning running
  (the scheduler's leased claim); "started" is submit to its handle being stored, i.e. its runner process
  spawned (seen by polling every 10 ms). Each job is cancelled once it runs and the next is submitted once it
  has ended, so every submission meets an idle scheduler. A first job, not counted, warms the scheduler up
  (its first start imports torch).
- enqueue: one JobStore.submit of 1,000 already composed jobs into a fresh store; composing (Hydra and
  config validation) is timed apart, per point.
- sweep overhead: a sweep of --points tiny jobs (3 steps, evaluation on 40 LFW pairs, model logged) runs
  on --slots slots; then the champion is selected and registered. Overhead = wall time from enqueueing to
  the champion, minus the sum of the jobs' own training time (their MLflow runs) divided by the parallelism.
  What remains is queueing, polling, process and Python start-up, and selection.

Run from the repo root on a quiet machine (a few minutes):

    .venv/bin/python bench/bench_queue.py
    .venv/bin/python bench/bench_queue.py --latency-jobs 10 --points 8 --poll-seconds 0.5
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from machine import machine_line
from mlflow.tracking import MlflowClient

from faceforge.jobs import Job, JobStore, make_jobs, store_path
from faceforge.jobs.store import new_id
from faceforge.registry import Policy, select_and_register

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLI = [sys.executable, "-c", "from faceforge.cli import main; main()"]


def tiny_data(root: Path) -> tuple[Path, Path]:
    """6 identities x 4 images of ../shared/data/celeba_ids, and 40 LFW pairs (2 + 2 per fold)."""
    train = root / "train"
    for identity in sorted(p for p in (SHARED / "celeba_ids").iterdir() if p.is_dir())[:6]:
        (train / identity.name).mkdir(parents=True)
        for image in sorted(identity.glob("*.jpg"))[:4]:
            shutil.copy(image, train / identity.name / image.name)
    lines = (SHARED / "lfw" / "pairs.txt").read_text().splitlines()
    folds, per_fold = (int(x) for x in lines[0].split())
    kept = []
    for fold in range(folds):
        block = lines[1 + fold * 2 * per_fold : 1 + (fold + 1) * 2 * per_fold]
        kept += block[:2] + block[per_fold : per_fold + 2]
    pairs = root / "pairs.txt"
    pairs.write_text(f"{folds}\t2\n" + "\n".join(kept) + "\n")
    return train, pairs


def tiny(home: Path, train: Path, pairs: Path | None, steps: int) -> list[str]:
    evaluation = (
        ["eval=pairs", f"eval.pairs={pairs}", f"eval.root={SHARED / 'lfw'}", "eval.crop_fraction=0.5"]
        if pairs
        else ["eval=none"]
    )
    return [
        "model=mobilefacenet", "model.width=0.25", "model.input_size=56", "model.embedding_dim=32",
        f"trainer.steps={steps}", "trainer.nproc=1", "schedule.warmup_steps=1", f"data.root={train}",
        "data.batch_size=8", "data.num_workers=0", f"mlflow.tracking_uri=sqlite:///{home}/mlflow.db",
        f"mlflow.log_model={'true' if pairs else 'false'}", *evaluation,
    ]  # fmt: skip


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.01)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_latency(store: JobStore, template: Job, count: int, poll_seconds: float) -> None:
    claimed, started = [], []
    for index in range(count + 1):  # the first one warms the scheduler up
        time.sleep(random.uniform(0, poll_seconds))  # submissions come at any moment of the scheduler's cycle
        (job,) = store.submit([replace(template, id=new_id(), name=f"latency-{index}")])
        wait_until(lambda job=job: store.get(job.id).handle is not None, 120, f"start of {job.id}")
        seen = time.time()
        running = store.get(job.id)
        store.cancel(job.id)
        wait_until(lambda job=job: store.get(job.id).terminal, 120, f"end of {job.id}")
        if index:
            claimed.append(running.started_at - running.created_at)
            started.append(seen - running.created_at)
    for name, values in (("claimed (queued -> running)", claimed), ("started (queued -> runner spawned)", started)):
        print(
            f"  {name}: p50 {statistics.median(values):.2f} s, p95 {percentile(values, 0.95):.2f} s, "
            f"max {max(values):.2f} s over {len(values)} jobs"
        )


def bench_enqueue(template: Job, count: int, repeats: int = 5) -> None:
    start = time.perf_counter()
    make_jobs(template.overrides)
    compose = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as temp:
            store = JobStore(Path(temp) / "jobs.db")
            jobs = [replace(template, id=new_id(), name=f"bulk-{i}") for i in range(count)]
            start = time.perf_counter()
            store.submit(jobs)
            times.append(time.perf_counter() - start)
    print(
        f"  {count} jobs in one submit: median {statistics.median(times) * 1000:.0f} ms, "
        f"max {max(times) * 1000:.0f} ms over {repeats} fresh stores (composing a point: {compose * 1000:.0f} ms)"
    )


def bench_sweep(store: JobStore, home: Path, train: Path, pairs: Path, points: int, slots: int) -> None:
    rates = ",".join(f"{0.1 - 0.005 * i:.3f}" for i in range(points))
    tracking = f"sqlite:///{home}/mlflow.db"
    start = time.time()
    jobs = store.submit(make_jobs([*tiny(home, train, pairs, steps=3), f"optim.lr={rates}"]))
    wait_until(lambda: all(store.get(job.id).terminal for job in jobs), 1800, "end of the sweep")
    selection, version = select_and_register(tracking, jobs[0].sweep_id, Policy())
    wall = time.time() - start
    finished = [store.get(job.id) for job in jobs]
    client = MlflowClient(tracking)
    runs = [client.get_run(job.mlflow_run_id) for job in finished if job.mlflow_run_id]
    training = sum((run.info.end_time - run.info.start_time) / 1000 for run in runs)
    processes = sum(job.finished_at - job.started_at for job in finished)
    parallelism = min(slots, points)
    states = sorted({job.state for job in finished})
    print(f"  {points} points on {slots} slots: {', '.join(states)}; champion v{version.version}: {selection.reason}")
    print(f"  enqueue -> champion registered: {wall:.1f} s")
    print(f"  training (MLflow runs): {training:.1f} s in all; job processes: {processes:.1f} s in all")
    print(f"  overhead = {wall:.1f} - {training:.1f} / {parallelism} = {wall - training / parallelism:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=20)
    parser.add_argument("--enqueue-jobs", type=int, default=1000)
    parser.add_argument("--points", type=int, default=8, help="sweep points (at least 8 for the issue's goal)")
    parser.add_argument("--slots", type=int, default=os.cpu_count(), help="the scheduler's local slots")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="the scheduler's poll interval")
    args = parser.parse_args()
    if args.points < 2:
        parser.error("a sweep needs at least 2 points")
    if not (SHARED / "celeba_ids").is_dir():
        sys.exit(f"bench_queue: error: {SHARED} is missing")
    print(machine_line())
    print(f"scheduler: local executor, {args.slots} slots, poll every {args.poll_seconds} s")

    with tempfile.TemporaryDirectory(prefix="bench-queue-") as temp:
        home = Path(temp)
        os.environ["FACEFORGE_HOME"] = str(home)
        train, pairs = tiny_data(home / "data")
        store = JobStore(store_path())
        (template,) = make_jobs(tiny(home, train, None, steps=1))
        print("enqueue:")
        bench_enqueue(template, args.enqueue_jobs)
        with (home / "scheduler.log").open("w") as log:
            scheduler = subprocess.Popen(
                [*CLI, "scheduler", "--slots", str(args.slots), "--poll-seconds", str(args.poll_seconds)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            print("submit to running:")
            bench_latency(store, template, args.latency_jobs, args.poll_seconds)
            print("sweep overhead:")
            bench_sweep(store, home, train, pairs, args.points, args.slots)
        finally:
            scheduler.terminate()
            scheduler.wait(timeout=60)


if __name__ == "__main__":
    main()
