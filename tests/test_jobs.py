"""The job store (atomic leased claims within capacity, priorities, leases, requeues, cancel, retry) and job specs."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from faceforge.jobs import (
    CANCELLED,
    FAILED,
    LOST,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobStore,
    JobStoreBusyError,
    compose_config,
    expand_sweep,
    job_dir,
    make_jobs,
    merge_overrides,
    override_value,
    quoted_path,
    retry,
    spec,
    store_path,
)
from faceforge.jobs.executors import Status
from faceforge.jobs.executors.local import LocalExecutor
from faceforge.jobs.executors.local_runner import RUNNER_FILE
from faceforge.jobs.scheduler import Scheduler
from faceforge.jobs.store import new_id
from faceforge.train.config import ConfigError

from conftest import CLI, waiting_behind

TINY = ["model.width=0.25", "model.input_size=56", "model.embedding_dim=32", "trainer.steps=3", "eval=none"]


@pytest.fixture(scope="module")
def template() -> Job:
    """One composed job; the store tests copy it under new ids, since composing a config takes a while."""
    (job,) = make_jobs(TINY)
    return job


def copies(template: Job, count: int, **changes: object) -> list[Job]:
    return [replace(template, id=new_id(), name=f"job{i}", metrics={}, **changes) for i in range(count)]


def _claim_until_done(path: Path, owner: str, capacity: int, results: multiprocessing.Queue) -> None:
    """One scheduler's worth of claims: take what fits, note the slots in use while holding it, finish it."""
    store = JobStore(path)
    claimed, busiest = [], 0
    while True:
        job = store.claim("local", owner, capacity, lease_seconds=60)
        if job is None:
            if not store.list(states=[QUEUED], limit=1):
                break
            time.sleep(0.001)  # the queue's head does not fit until another claimer finishes
            continue
        claimed.append(job.id)
        busiest = max(busiest, store.used_slots("local"))
        time.sleep(0.002)
        assert store.finish(job.id, owner, SUCCEEDED, exit_code=0)
    results.put((claimed, busiest))


def test_concurrent_claimers_take_each_job_once_within_capacity(template: Job, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    jobs = store.submit(copies(template, 20, slots=1) + copies(template, 20, slots=2))
    context = multiprocessing.get_context("fork")  # the claimers only use sqlite3; fork starts them in ms
    results = context.Queue()
    claimers = [
        context.Process(target=_claim_until_done, args=(store.path, f"claimer{i}", 3, results)) for i in range(4)
    ]
    for claimer in claimers:
        claimer.start()
    outcomes = [results.get(timeout=120) for _ in claimers]
    for claimer in claimers:
        claimer.join(timeout=30)
        assert claimer.exitcode == 0
    claimed = [job_id for ids, _ in outcomes for job_id in ids]
    assert sorted(claimed) == sorted(job.id for job in jobs)  # every job, none twice
    assert max(busiest for _, busiest in outcomes) <= 3
    assert sum(1 for ids, _ in outcomes if ids) > 1  # the claimers really competed
    assert {(job.state, job.attempts) for job in store.list()} == {(SUCCEEDED, 1)}


def test_priority_then_fifo_positions_and_a_head_that_does_not_fit(template: Job, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    low1, high1, low2, high2 = store.submit(
        [replace(job, priority=priority) for job, priority in zip(copies(template, 4), (0, 5, 0, 5), strict=True)]
    )
    assert store.positions() == {high1.id: 1, high2.id: 2, low1.id: 3, low2.id: 4}
    assert [store.claim("local", "me", 10, 30).id for _ in range(2)] == [high1.id, high2.id]
    assert store.positions() == {low1.id: 1, low2.id: 2}
    assert store.claim("ray", "me", 10, 30) is None  # queues are per executor

    # A 2-slot job at the head blocks the 1-slot job behind it rather than being starved by it.
    big, small = store.submit([*copies(template, 1, slots=2, priority=9), *copies(template, 1, priority=9)])
    assert store.claim("local", "me", 3, 30) is None  # 2 slots used, 1 free: big does not fit
    assert store.finish(high1.id, "me", SUCCEEDED, exit_code=0)
    assert store.claim("local", "me", 3, 30).id == big.id
    assert store.claim("local", "me", 4, 30).id == small.id
    assert store.used_slots("local") == 4


def test_lease_expiry_lets_another_scheduler_adopt(template: Job, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    (job,) = store.submit(copies(template, 1))
    assert store.claim("local", "first", 4, lease_seconds=30).id == job.id
    assert store.adopt_expired("local", "second", 30) == []  # still leased
    # Shortened only now: a short first lease could run out before the check above on a loaded machine.
    assert store.heartbeat(job.id, "first", 0.3)
    time.sleep(0.4)
    (adopted,) = store.adopt_expired("local", "second", 30)
    assert (adopted.id, adopted.state, adopted.lease_owner, adopted.attempts) == (job.id, RUNNING, "second", 1)
    assert not store.heartbeat(job.id, "first", 30)  # the first scheduler learns it lost the job
    assert not store.finish(job.id, "first", SUCCEEDED, exit_code=0)
    assert store.finish(job.id, "second", SUCCEEDED, exit_code=0)
    assert store.get(job.id).state == SUCCEEDED


def test_requeue_until_max_attempts_then_lost(template: Job, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    (job,) = store.submit(copies(template, 1, max_attempts=2))
    store.claim("local", "me", 4, 30)
    again = store.requeue(job.id, "me", "attempt 1 lost")
    assert (again.state, again.attempts, again.handle, again.error) == (QUEUED, 1, None, "attempt 1 lost")
    assert store.claim("local", "me", 4, 30).attempts == 2
    final = store.requeue(job.id, "me", "attempt 2 lost")
    assert (final.state, final.attempts, final.error) == (LOST, 2, "attempt 2 lost") and final.finished_at
    assert store.claim("local", "me", 4, 30) is None
    with pytest.raises(KeyError):
        store.requeue(job.id, "someone else", "not theirs")


def test_cancel_queued_at_once_and_running_on_request(template: Job, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    running, queued = store.submit(copies(template, 2))
    store.claim("local", "me", 1, 30)
    cancelled = store.cancel(queued.id)
    assert (cancelled.state, cancelled.cancel_requested) == (CANCELLED, True)
    assert cancelled.cancelled_at and cancelled.finished_at
    asked = store.cancel(running.id)
    assert (asked.state, asked.cancel_requested, asked.cancelled_at) == (RUNNING, True, None)
    assert store.finish(running.id, "me", CANCELLED, exit_code=1)
    assert store.get(running.id).cancelled_at
    assert store.claim("local", "me", 1, 30) is None
    with pytest.raises(KeyError):
        store.cancel("job-missing")


def test_a_cancel_that_lands_before_the_start_or_during_a_requeue_is_kept(template: Job, tmp_path: Path) -> None:
    """A job leased but not started yet (its scheduler died, or the executor was unreachable), or whose lost run is
    being requeued, must end cancelled: never start after the user cancelled it."""
    store = JobStore(store_path(tmp_path))
    (leased,) = store.submit(copies(template, 1, slots=1))
    scheduler = Scheduler(store, {"local": LocalExecutor(slots=1)}, tmp_path)
    assert store.claim("local", scheduler.owner, 2, 30).id == leased.id  # as if its start had failed
    store.cancel(leased.id)
    scheduler.run_once()
    assert store.get(leased.id).state == CANCELLED and not job_dir(tmp_path, leased.id).exists()

    (lost,) = store.submit(copies(template, 1, slots=1))
    assert store.claim("local", "me", 2, 30).id == lost.id
    store.cancel(lost.id)
    ended = store.requeue(lost.id, "me", "attempt 1 lost")
    assert (ended.state, ended.error) == (CANCELLED, "attempt 1 lost") and ended.finished_at and ended.cancelled_at
    assert store.claim("local", "me", 2, 30) is None


def test_a_job_whose_tracking_database_cannot_be_made_fails_instead_of_holding_its_slots(
    template: Job, tmp_path: Path
) -> None:
    (tmp_path / "a_file").write_text("")
    config = yaml.safe_load(template.config_yaml)
    config["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/a_file/mlflow.db"  # a folder inside a file
    store = JobStore(store_path(tmp_path))
    (stuck,) = store.submit(copies(template, 1, slots=1, config_yaml=yaml.safe_dump(config)))
    scheduler = Scheduler(store, {"local": LocalExecutor(slots=1)}, tmp_path)
    scheduler.run_once()
    failed = store.get(stuck.id)
    assert failed.state == FAILED and failed.error.startswith("could not start: ") and "a_file" in failed.error
    assert store.used_slots("local") == 0 and not job_dir(tmp_path, stuck.id).exists()


def test_a_job_the_local_executor_cannot_start_fails_and_the_next_one_runs(template: Job, tmp_path: Path) -> None:
    """Every OSError from a start was taken for an unreachable cluster and retried each tick: a job whose folder
    cannot be made stayed running for good, holding its slot. Only an unreachable executor is retried now."""
    (tmp_path / "jobs").write_text("a file where the job folders go")
    store = JobStore(tmp_path / "jobs.db")
    first, second = store.submit(copies(template, 2, slots=1))
    scheduler = Scheduler(store, {"local": LocalExecutor(slots=1)}, tmp_path)
    scheduler.run_once()
    for job in (first, second):
        failed = store.get(job.id)
        assert failed.state == FAILED and failed.error.startswith("could not start: "), failed.error
        assert str(tmp_path / "jobs") in failed.error
    assert store.used_slots("local") == 0


def test_processes_opening_one_new_database_take_turns(tmp_path: Path) -> None:
    """Two processes turning one new file to WAL at once: one could fail at once with "locked" (2 of 300 openings
    by two processes at a time), so `faceforge web` and `faceforge scheduler` started together could exit."""
    with waiting_behind(tmp_path / "jobs.db.lock", lambda: JobStore(tmp_path / "jobs.db")) as opening:
        assert opening.is_alive() and not (tmp_path / "jobs.db").exists(), "it waits for the other to finish"
    assert opening.error is None and JobStore(tmp_path / "jobs.db").list() == []


def test_a_damaged_database_is_one_line(template: Job, tmp_path: Path) -> None:
    """A malformed page raised sqlite3.DatabaseError, a traceback from every command; it is an OSError naming the
    file now, which the CLI, the scheduler and the web form report in one line."""
    store = JobStore(tmp_path / "jobs.db")
    store.submit(copies(template, 300))
    data = bytearray((tmp_path / "jobs.db").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8192] = bytes(range(256)) * 32
    (tmp_path / "jobs.db").write_bytes(data)
    with pytest.raises(OSError, match=r"job database .*jobs\.db cannot be opened: database disk image is malformed"):
        store.list()
    listed = subprocess.run([*CLI, "queue", "list"], env={**os.environ, "FACEFORGE_HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert listed.returncode != 0 and "Traceback" not in listed.stderr, listed.stderr[-2000:]
    assert "jobs.db cannot be opened: database disk image is malformed" in listed.stderr


def test_a_sweep_is_up_for_its_champion_once_no_job_of_it_is_left_to_run(template: Job, tmp_path: Path) -> None:
    """However its last job ends: here a cancel while queued, which no scheduler sees end (the champion was only
    chosen when a scheduler recorded a finished run). Claimed once per try, kept once chosen, up again on a retry
    or a new batch; the sweeps of a database from before this ended before it and are never chosen again."""
    store = JobStore(tmp_path / "jobs.db")
    finished, waiting = store.submit(copies(template, 2, sweep_id="sweep-a"))
    store.submit(copies(template, 1, sweep_id="sweep-b"))  # still queued
    store.claim("local", "me", 2, 30)
    assert store.finish(finished.id, "me", SUCCEEDED, exit_code=0)
    assert store.claim_ended_sweeps(retry_seconds=30) == []
    store.cancel(waiting.id)
    [up] = store.claim_ended_sweeps(retry_seconds=30)
    assert (up.sweep_id, up.id) == ("sweep-a", waiting.id)
    assert store.claim_ended_sweeps(retry_seconds=30) == [], "claimed: another scheduler does not take it"
    assert [job.sweep_id for job in store.claim_ended_sweeps(retry_seconds=0)] == ["sweep-a"], "a failed try"
    store.sweep_selected("sweep-a")
    assert store.claim_ended_sweeps(retry_seconds=0) == []
    store.retry(waiting.id)
    assert store.claim_ended_sweeps(retry_seconds=0) == []
    store.cancel(waiting.id)
    [up] = store.claim_ended_sweeps(retry_seconds=0)
    store.sweep_selected("sweep-a")
    (batch,) = store.submit(copies(template, 1, sweep_id="sweep-a"))  # an optimiser's next batch
    assert store.claim_ended_sweeps(retry_seconds=0) == []
    store.cancel(batch.id)
    assert [job.id for job in store.claim_ended_sweeps(retry_seconds=0)] == [batch.id]

    old = tmp_path / "old.db"
    shutil.copy(tmp_path / "jobs.db", old)
    with contextlib.closing(sqlite3.connect(old)) as db:
        db.execute("DROP TABLE sweep_selections")
        db.commit()
    assert JobStore(old).claim_ended_sweeps(retry_seconds=0) == []


def test_a_sweep_whose_tracking_database_is_gone_ends_without_a_champion(template: Job, tmp_path: Path) -> None:
    """Not a failed tick, with its traceback, again every lease for good."""
    config = yaml.safe_load(template.config_yaml)
    config["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/gone/mlflow.db"
    store = JobStore(tmp_path / "jobs.db")
    (job,) = store.submit(copies(template, 1, sweep_id="sweep-gone", config_yaml=yaml.safe_dump(config)))
    store.cancel(job.id)
    Scheduler(store, {"local": LocalExecutor(slots=1)}, tmp_path).run_once()
    assert store.claim_ended_sweeps(retry_seconds=0) == []


def test_a_locked_database_reports_itself(template: Job, tmp_path: Path) -> None:
    """When BEGIN times out, the error names the database and says it was locked (not that there was nothing to
    roll back); it is an OSError, which the CLI, the sweep launcher and the web form report in one line."""
    store = JobStore(tmp_path / "jobs.db", busy_seconds=0.2)
    holder = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(JobStoreBusyError, match=r"jobs\.db stayed locked by another process for 0\.2 s") as busy:
            store.submit(copies(template, 1))
        assert isinstance(busy.value, OSError)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.list() == []  # nothing half-written


def test_retry_queues_an_ended_job_again_under_its_own_id(template: Job, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    running, done = store.submit(copies(template, 2))
    store.claim("local", "me", 2, 30)
    store.claim("local", "me", 2, 30)
    store.cancel(running.id)
    assert store.finish(running.id, "me", CANCELLED, exit_code=1, error="stopped by SIGTERM")
    assert store.finish(done.id, "me", SUCCEEDED, exit_code=0)
    again = store.retry(running.id)
    assert (again.state, again.cancel_requested, again.exit_code, again.error) == (QUEUED, False, None, None)
    assert (again.lease_owner, again.handle, again.finished_at, again.cancelled_at) == (None, None, None, None)
    assert store.claim("local", "me", 2, 30).id == running.id
    for job_id in (running.id, done.id, "job-missing"):  # running again, succeeded, unknown
        with pytest.raises(ValueError, match="has not ended in cancelled, failed or lost"):
            store.retry(job_id)


def test_a_retried_job_that_ended_runs_again_under_the_local_executor(
    template: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its last run's exit code in the job directory must not pass for the ending of the new start."""
    runs = tmp_path / "runs"
    count_and_fail_first = (
        f"import pathlib, sys; runs = pathlib.Path({str(runs)!r}); runs.open('a').write('run\\n'); "
        "sys.exit(0 if runs.read_text().count('run') > 1 else 3)"
    )
    monkeypatch.setattr(spec, "train_command", lambda job, job_dir: [sys.executable, "-c", count_and_fail_first])
    store, executor = JobStore(store_path(tmp_path)), LocalExecutor(slots=1)
    (job,) = store.submit(copies(template, 1, slots=1))

    def run_to_the_end() -> Status:
        claimed = store.claim("local", "me", 1, 30)
        assert claimed is not None and claimed.id == job.id
        store.update(job.id, "me", handle=executor.start(claimed, job_dir(tmp_path, job.id)))
        deadline = time.monotonic() + 60
        while (status := executor.status(store.get(job.id))).state == RUNNING:
            assert time.monotonic() < deadline, "the job did not end"
            time.sleep(0.1)
        assert store.finish(job.id, "me", status.state, status.exit_code)
        return status

    assert run_to_the_end().state == FAILED
    assert retry(store, tmp_path, job.id).state == QUEUED
    assert run_to_the_end() == Status(SUCCEEDED, 0) and runs.read_text() == "run\nrun\n"
    for job_id, error in ((job.id, ValueError), ("job-missing", KeyError)):  # succeeded, unknown
        with pytest.raises(error):
            retry(store, tmp_path, job_id)


def test_a_job_whose_folder_is_removed_can_still_be_cancelled(
    template: Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its runner lock went with the folder: the process group tells whether it runs, and cancel ends it."""
    monkeypatch.setattr(
        spec, "train_command", lambda job, job_dir: [sys.executable, "-c", "import time; time.sleep(120)"]
    )
    store, executor = JobStore(store_path(tmp_path)), LocalExecutor(slots=1)
    (job,) = store.submit(copies(template, 1, slots=1))
    store.claim("local", "me", 1, 30)
    directory = job_dir(tmp_path, job.id)
    store.update(job.id, "me", handle=executor.start(store.get(job.id), directory))
    deadline = time.monotonic() + 60
    while not (directory / RUNNER_FILE).exists():  # a runner whose folder goes before it records itself fails
        assert time.monotonic() < deadline, "the runner never recorded itself"
        time.sleep(0.05)
    shutil.rmtree(directory)
    assert executor.status(store.get(job.id)).state == RUNNING
    store.cancel(job.id)
    executor.stop(store.get(job.id))
    deadline = time.monotonic() + 30
    while (status := executor.status(store.get(job.id))).state == RUNNING:
        assert time.monotonic() < deadline, "the job was not stopped"
        time.sleep(0.1)
    assert status == Status(LOST, error=f"job folder {directory.resolve()} vanished")  # recorded as cancelled
    # A handle whose runner is long gone names a process group id that may be another program's now.
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        stale = replace(store.get(job.id), handle=json.dumps({"pid": other.pid, "start_time": 1, "job_dir": "/gone"}))
        assert executor.status(stale).state == LOST
        executor.stop(stale)
        assert other.poll() is None, "stop() killed a process group that was not the job's"
    finally:
        other.kill()
        other.wait()


def test_a_thousand_jobs_in_one_submit(template: Job, tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    jobs = store.submit(copies(template, 1000))
    assert len(store.list(limit=5000)) == 1000
    positions = store.positions()
    assert [positions[job.id] for job in jobs] == list(range(1, 1001))


def test_sweep_expands_to_one_job_per_point_under_one_sweep_id() -> None:
    points = expand_sweep(["model=mobilefacenet", "optim.lr=0.1,0.05", "head=arcface,cosface"])
    assert points == [
        ["model=mobilefacenet", "optim.lr=0.1", "head=arcface"],
        ["model=mobilefacenet", "optim.lr=0.1", "head=cosface"],
        ["model=mobilefacenet", "optim.lr=0.05", "head=arcface"],
        ["model=mobilefacenet", "optim.lr=0.05", "head=cosface"],
    ]
    assert len(expand_sweep(["optim.lr=choice(0.1,0.2,0.3)", "trainer.steps=range(1,3)"])) == 6
    jobs = make_jobs([*TINY, "optim.lr=0.1,0.05"], priority=3)
    assert len(jobs) == 2 and len({job.sweep_id for job in jobs}) == 1 and jobs[0].sweep_id.startswith("sweep-")
    assert [job.name for job in jobs] == ["mobilefacenet-arcface-0", "mobilefacenet-arcface-1"]
    assert ["lr: 0.1" in jobs[0].config_yaml, "lr: 0.05" in jobs[1].config_yaml] == [True, True]
    assert {(job.priority, job.slots) for job in jobs} == {(3, 1)}
    (single,) = make_jobs(TINY)
    assert single.sweep_id is None


def test_quoted_paths_reach_the_config_as_written() -> None:
    """Paths the platform writes into overrides (datasets, checkpoints, the tracking URI) may hold Hydra's syntax."""
    backslashes = ["/ends/in\\", "/m/a\\'b", "/x/\\${oc.env:HOME}", "/x/\\\\${y}"]  # escapes, not interpolations
    for path in ["/a,b c/it's", "/x/${y}", "/q/[1]{2}=:", '/d/"q"', *backslashes]:
        override = f"data.root={quoted_path(path)}"
        assert expand_sweep([override]) == [[override]]
        assert override_value(override) == path
        assert compose_config([*TINY, override]).data.root == path
    assert override_value("data.root=null") is None


def test_a_sweep_past_the_cap_is_refused_before_it_is_listed() -> None:
    assert len(expand_sweep(["optim.lr=range(0,10)", "trainer.steps=range(1,101)"])) == spec.MAX_SWEEP_POINTS
    for overrides in [
        ["optim.lr=range(0,10)", "trainer.steps=range(1,102)"],
        ["optim.lr=range(0,100000)", "trainer.steps=range(1,100000)"],  # 10^10 points
        ["trainer.steps=shuffle(range(1,10000000000))"],  # Hydra would list all of them to shuffle them
    ]:
        with pytest.raises(ConfigError, match=f"more than {spec.MAX_SWEEP_POINTS} points"):
            expand_sweep(overrides)
    with pytest.raises(ConfigError, match="the sweep has no points"):
        expand_sweep(["trainer.steps=range(1,1)"])


def test_numbers_past_the_store_limit_are_refused(template: Job, tmp_path: Path) -> None:
    """The CLI and the web form both submit through the store, which SQLite would refuse with an OverflowError."""
    store = JobStore(tmp_path / "jobs.db")
    for changes in ({"priority": 2**63}, {"priority": -(2**31)}, {"slots": 2**40}):
        with pytest.raises(ValueError, match="must be within"):
            store.submit(copies(template, 1, **changes))
    assert store.list() == []


@pytest.mark.parametrize(
    ("overrides", "slots", "message"),
    [
        (["model=nonexistent"], None, "nonexistent"),
        (["optim.lr=0.1,-1"], None, "optim.lr must be positive"),
        (["optim.lr=((("], None, "bad override"),
        (["output_dir=/tmp/elsewhere"], None, "set by the queue"),
        (["++hydra={output_subdir:/tmp/escaped}"], None, "hydra is set by the queue"),  # whole: logging handlers
        (["+hydra.job.env_set.X=1"], None, "hydra.job.env_set.X is set by the queue"),
        (["hydra/job_logging=disabled"], None, "hydra/job_logging is set by the queue"),
        (["trainer.nproc=2"], 1, "needs at least as many slots"),
        (["optim.lr=interval(0,1)"], None, "interval.*not a sweep the queue can run"),
        (["optim.lr=glob(*)"], None, "glob.*not a sweep the queue can run"),
        (["trainer.steps=range(1,9,0)"], None, "not a sweep the queue can run"),
        (["head=contrastive", "head.margin=-1", "data.batch_size=64"], None, "needs a positive head.margin, got -1"),
        (["head=triplet", "head.margin=nan", "data.batch_size=64"], None, "triplet loss needs a positive head.margin"),
    ],
)
def test_bad_overrides_raise_one_line(overrides: list[str], slots: int | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        make_jobs([*TINY, *overrides], slots=slots)
    assert "\n" not in str(raised.value)


def test_merge_overrides_replaces_the_same_keys() -> None:
    base = ["model=mobilefacenet", "optim.lr=0.1", "trainer.steps=3", "+tag=a"]
    merged = merge_overrides(base, ["optim.lr=0.05", "model=iresnet18", "+extra=1"])
    assert merged == ["trainer.steps=3", "+tag=a", "optim.lr=0.05", "model=iresnet18", "+extra=1"]
    with pytest.raises(ConfigError, match="bad override"):
        merge_overrides(base, ["optim.lr=((("])
