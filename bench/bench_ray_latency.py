"""Latency from submit to running through the Ray executor, p50 and p95 (goal: p95 <= 5 s).

Each job is a real one-step training job submitted with `RayExecutor.start` on an otherwise idle cluster, as
the scheduler submits only when the job's slots fit; "running" is the moment Ray reports the entrypoint
RUNNING (its process started), polled every 20 ms. Jobs run one after the other so each submission finds
the cluster free. The scheduler adds at most one poll interval on top. Starts its own one-machine head
unless --address names a running cluster. Run from the repo root:

    .venv/bin/python bench/bench_ray_latency.py              # 10 jobs, ~3 minutes on 2 cores
    .venv/bin/python bench/bench_ray_latency.py --jobs 20 --address http://127.0.0.1:8265
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import ray
from machine import machine_line
from ray.job_submission import JobStatus

from faceforge.jobs import make_jobs
from faceforge.jobs.executors.ray_jobs import RayExecutor, local_head

POLL_SECONDS = 0.02
TINY_JOB = [
    "model=mobilefacenet",
    "model.width=0.25",
    "model.input_size=56",
    "model.embedding_dim=32",
    "trainer.steps=1",
    "data.batch_size=8",
    "data.num_workers=0",
    "eval=none",
    "mlflow.log_model=false",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with ~10 samples, p95 is the slowest run, not an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, round(q / 100 * len(ordered)) - 1)]


def measure(executor: RayExecutor, home: Path, jobs: int) -> tuple[list[float], list[float]]:
    """Seconds from submit to RUNNING, and each job's whole run, for `jobs` jobs in turn."""
    to_running, whole = [], []
    for index in range(jobs):
        (job,) = make_jobs(TINY_JOB, name=f"latency-{index}", executor="ray")
        submitted = time.perf_counter()
        executor.start(job, home / "jobs" / job.id)
        while (status := executor.client.get_job_status(job.id)) == JobStatus.PENDING:
            time.sleep(POLL_SECONDS)
        to_running.append(time.perf_counter() - submitted)
        while not status.is_terminal():
            time.sleep(0.2)
            status = executor.client.get_job_status(job.id)
        whole.append(time.perf_counter() - submitted)
        if status != JobStatus.SUCCEEDED:
            raise RuntimeError(f"job {job.id} ended {status}:\n{executor.read_log(job)[0]}")
        print(f"  job {index + 1}/{jobs}: running after {to_running[-1]:.2f} s, done after {whole[-1]:.1f} s")
    return to_running, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10, help="jobs to submit, one after the other")
    parser.add_argument("--address", help="dashboard address of a running cluster; default: start a local head")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local head")
    args = parser.parse_args()

    print(machine_line(f"ray {ray.__version__}"))
    with tempfile.TemporaryDirectory(prefix="ffray-") as scratch:
        home = Path(scratch)
        os.environ["FACEFORGE_HOME"] = str(home)  # job dirs and the MLflow database stay in the scratch dir
        head = nullcontext(args.address) if args.address else local_head(home, num_cpus=args.cpus)
        with head as address:
            started = time.perf_counter()
            to_running, whole = measure(RayExecutor(address), home, args.jobs)
    print(
        f"\nray submit -> RUNNING over {args.jobs} jobs: p50 {percentile(to_running, 50):.2f} s, "
        f"p95 {percentile(to_running, 95):.2f} s, max {max(to_running):.2f} s "
        f"(whole job: median {statistics.median(whole):.1f} s; {time.perf_counter() - started:.0f} s in all)"
    )


if __name__ == "__main__":
    main()
