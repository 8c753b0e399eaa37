"""The Ray executor against a real local Ray head: a 2-rank gloo job, idempotent start, stop, retry, forgotten
ids."""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from faceforge.jobs import (
    CANCELLED,
    LOST,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Job,
    JobStore,
    job_dir,
    make_jobs,
    retry,
    store_path,
)
from faceforge.jobs.executors.base import Status
from faceforge.jobs.executors.ray_jobs import RayExecutor, local_head, submission_id

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One head for the whole session: starting Ray takes longer than any test here."""
    # A short path: Ray's unix sockets live under the temp dir and their paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="ffray-") as temp_dir, local_head(Path(temp_dir), num_cpus=2) as address:
        yield address


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path))
    return tmp_path


def tiny_job(home: Path, train_root: Path, nproc: int, steps: int) -> Job:
    overrides = [
        "model=mobilefacenet",
        "model.width=0.25",
        "model.input_size=56",
        "model.embedding_dim=32",
        f"trainer.steps={steps}",
        f"trainer.nproc={nproc}",
        f"data.root={train_root}",
        "data.batch_size=8",
        "data.num_workers=0",
        "eval=none",
        "trainer.log_every=1",
        f"mlflow.tracking_uri=sqlite:///{home}/mlflow.db",
        "mlflow.log_model=false",
    ]
    (job,) = make_jobs(overrides, executor="ray")
    return job


def wait_for(executor: RayExecutor, job: Job, done: tuple[str, ...], timeout: float) -> Status:
    deadline = time.monotonic() + timeout
    while (status := executor.status(job)).state not in done:
        assert time.monotonic() < deadline, f"{job.id} still {status} after {timeout} s: {executor.read_log(job)[0]}"
        time.sleep(0.5)
    return status


def test_capacity_is_the_cluster_cpus(ray_address: str) -> None:
    assert RayExecutor(ray_address).capacity() == 2


def test_two_rank_job_runs_to_success_once(ray_address: str, home: Path, tiny_train_root: Path) -> None:
    executor = RayExecutor(ray_address)
    job = tiny_job(home, tiny_train_root, nproc=2, steps=3)
    assert job.slots == 2
    job.handle = executor.start(job, home / "jobs" / job.id)
    assert job.handle == submission_id(job) and job.handle.startswith(job.id)
    first = executor.client.get_job_info(job.handle)

    # At-least-once delivery: a second scheduler starting the same job must find it, not run it twice.
    assert executor.start(job, home / "jobs" / job.id) == job.handle
    assert [info.submission_id for info in executor.client.list_jobs()].count(job.handle) == 1
    assert executor.client.get_job_info(job.handle).start_time == first.start_time

    status = wait_for(executor, job, TERMINAL, timeout=150)
    log, offset = executor.read_log(job)
    assert status == Status(SUCCEEDED, 0), log
    assert first.entrypoint.startswith(shlex.quote(sys.executable) + " -m faceforge.train ")  # the venv's Python

    mlflow = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiments = [experiment.experiment_id for experiment in mlflow.search_experiments()]
    runs = mlflow.search_runs(experiments, filter_string=f"tags.`faceforge.job_id` = '{job.id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert f"run {runs[0].info.run_id}" in log and f"output: {home / 'jobs' / job.id}" in log
    assert (home / "jobs" / job.id / "checkpoints").is_dir()

    assert executor.read_log(job, offset) == ("", offset)
    assert executor.read_log(job, 10) == (log[10:], offset)  # the log is ASCII, so bytes and characters agree


def test_stop_ends_a_running_job_cancelled(ray_address: str, home: Path, tiny_train_root: Path) -> None:
    executor = RayExecutor(ray_address)
    job = tiny_job(home, tiny_train_root, nproc=1, steps=100_000)
    executor.start(job, home / "jobs" / job.id)
    deadline = time.monotonic() + 90
    while "mlflow:" not in executor.read_log(job)[0]:  # the trainer is past its start-up
        assert executor.status(job).state == RUNNING, executor.read_log(job)[0]
        assert time.monotonic() < deadline, executor.read_log(job)[0]
        time.sleep(0.5)
    executor.stop(job)
    status = wait_for(executor, job, TERMINAL, timeout=60)
    assert status.state == CANCELLED, status


def test_a_retried_job_runs_again_as_a_new_submission(ray_address: str, home: Path, tiny_train_root: Path) -> None:
    """Ray keeps the ended submission: the retry's start must not find it and report its ending again."""
    executor, store = RayExecutor(ray_address), JobStore(store_path(home))
    (job,) = store.submit([tiny_job(home, tiny_train_root, nproc=1, steps=100_000)])

    def start() -> Job:
        claimed = store.claim("ray", "me", 2, 30)
        assert claimed is not None and claimed.id == job.id
        store.update(job.id, "me", handle=executor.start(claimed, job_dir(home, job.id)))
        return store.get(job.id)

    first = start()
    executor.stop(first)
    assert wait_for(executor, first, TERMINAL, timeout=60).state == CANCELLED
    assert store.finish(job.id, "me", CANCELLED)
    retry(store, home, job.id)
    second = start()
    assert second.handle != first.handle and executor.status(second).state == RUNNING
    assert executor.status(first).state == CANCELLED  # the first start's record is untouched
    executor.stop(second)
    assert wait_for(executor, second, TERMINAL, timeout=60).state == CANCELLED


def test_unknown_submission_is_lost(ray_address: str, home: Path, tiny_train_root: Path) -> None:
    executor = RayExecutor(ray_address)
    job = tiny_job(home, tiny_train_root, nproc=1, steps=1)  # made but never started: Ray has never seen it
    status = executor.status(job)
    assert status.state == LOST and job.id in (status.error or "")
    assert executor.read_log(job, 7) == ("", 7)
    executor.stop(job)  # nothing to stop is not an error
