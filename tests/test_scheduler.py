"""The scheduler and the local executor on real tiny training jobs: capacity, crashes, cancel and the queue CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from faceforge.jobs import CANCELLED, RUNNING, SUCCEEDED, Job, JobStore, make_jobs, store_path
from faceforge.jobs.executors.local import LocalExecutor, job_environment
from faceforge.jobs.executors.local_runner import process_start_time
from faceforge.jobs.scheduler import Scheduler
from faceforge.locks import try_lock
from faceforge.registry import champion
from faceforge.train.launch import TRAIN_LOCK

from conftest import CLI, REPO, SHARED, running_scheduler

pytestmark = pytest.mark.slow


def tiny(home: Path, train_root: Path, steps: int = 2) -> list[str]:
    """Overrides of a job that trains for a few seconds (mostly Python and torch starting up)."""
    return [
        "model=mobilefacenet", "model.width=0.25", "model.input_size=56", "model.embedding_dim=32",
        f"trainer.steps={steps}", "trainer.nproc=1", "trainer.log_every=1", f"data.root={train_root}",
        "data.batch_size=8", "data.num_workers=0", "eval=none", f"mlflow.tracking_uri=sqlite:///{home}/mlflow.db",
        "mlflow.log_model=false",
    ]  # fmt: skip


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path))
    return tmp_path


def drive(scheduler: Scheduler, done: Callable[[], bool], timeout: float) -> None:
    """Tick the scheduler until `done`, as `faceforge scheduler` would."""
    deadline = time.monotonic() + timeout
    while not done():
        jobs = [(job.id, job.state, job.error) for job in scheduler.store.list()]
        assert time.monotonic() < deadline, f"not done after {timeout} s: {jobs}"
        scheduler.run_once()
        time.sleep(scheduler.poll_seconds)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def log_of(job: Job) -> str:
    return Path(job.log_path).read_text() if job.log_path and Path(job.log_path).exists() else ""


def live_jobs(ids: set[str]) -> set[str]:
    """Which of these jobs have a live runner or trainer right now, from /proc: what runs, not what the store says."""
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # ended while we looked
            continue
        found |= {arg.removeprefix("mlflow.job_id=") for arg in args if arg.startswith("mlflow.job_id=")}
    return found & ids


def all_terminal(store: JobStore, jobs: list[Job]) -> Callable[[], bool]:
    return lambda: all(store.get(job.id).terminal for job in jobs)


def test_two_slot_jobs_on_two_slots_run_one_at_a_time_and_succeed(home: Path, tiny_train_root: Path) -> None:
    store = JobStore(store_path())
    jobs = store.submit(make_jobs([*tiny(home, tiny_train_root), "optim.lr=0.1,0.09,0.08,0.07,0.06"], slots=2))
    ids = {job.id for job in jobs}
    assert job_environment(jobs[0])["OMP_NUM_THREADS"] == "2"  # 2 slots, 1 rank: 2 threads
    executor = LocalExecutor(slots=2)
    scheduler = Scheduler(store, {"local": executor}, home, lease_seconds=10, poll_seconds=0.2)

    scheduler.run_once()
    first = store.get(jobs[0].id)
    assert first.state == RUNNING and first.handle and first.attempts == 1
    # Delivered twice (as after a scheduler crash): the live runner is found and nothing starts again.
    assert executor.start(first, home / "jobs" / first.id) == first.handle

    samples: list[tuple[int, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            samples.append((len(store.list(states=[RUNNING])), len(live_jobs(ids))))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        drive(scheduler, all_terminal(store, jobs), timeout=300)
    finally:
        sampling.set()
        sampler.join()
    assert len(samples) > 50
    assert max(running for running, _ in samples) == 1 and max(live for _, live in samples) == 1

    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    for job in (store.get(job.id) for job in jobs):
        assert (job.state, job.exit_code, job.attempts, job.error) == (SUCCEEDED, 0, 1, None), log_of(job)
        run = client.get_run(job.mlflow_run_id)
        assert run.data.tags["faceforge.job_id"] == job.id and run.data.tags["faceforge.sweep_id"] == job.sweep_id
        assert job.metrics["loss"] == run.data.metrics["loss"] and job.metrics["model.params"] > 0
        log = log_of(job)
        assert log.count("starts:") == 1 and "exit code 0" in log and f"run {job.mlflow_run_id}" in log

    # A late repeated delivery of a finished job reports its recorded end; it does not train again.
    done = store.get(first.id)
    assert executor.start(done, home / "jobs" / done.id) == first.handle
    assert executor.status(done).state == SUCCEEDED and log_of(done).count("starts:") == 1


def test_killed_scheduler_and_runner_every_job_ends_with_bounded_duplicates(home: Path, tiny_train_root: Path) -> None:
    store = JobStore(store_path())
    jobs = store.submit(make_jobs([*tiny(home, tiny_train_root, steps=40), "optim.lr=0.1,0.05,0.02"]))
    with (home / "scheduler.log").open("w") as log:
        crashing = subprocess.Popen(
            [*CLI, "scheduler", "--slots", "2", "--lease-seconds", "2", "--poll-seconds", "0.2"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def training() -> list[Job]:
        return [job for job in store.list(states=[RUNNING]) if "mlflow:" in log_of(job)]

    try:
        wait_for(lambda: len(training()) == 2, timeout=120, what="2 jobs training")
    finally:
        os.kill(crashing.pid, signal.SIGKILL)
        crashing.wait()
    victim = training()[0]
    runner = json.loads(victim.handle)
    assert process_start_time(runner["pid"]) == runner["start_time"], "the runner ended before it could be killed"
    os.kill(runner["pid"], signal.SIGKILL)  # its trainer carries on, but no exit code will be recorded

    survivor = Scheduler(store, {"local": LocalExecutor(slots=2)}, home, lease_seconds=2, poll_seconds=0.2)
    drive(survivor, all_terminal(store, jobs), timeout=240)
    final = {job.id: store.get(job.id) for job in jobs}
    assert set(final) == {job.id for job in store.list()}  # none lost from the table
    assert {job.state for job in final.values()} == {SUCCEEDED}, [(j.id, j.error) for j in final.values()]
    # The killed runner's job is the only one started twice, and says why; every start shows in its log.
    assert {job.id: job.attempts for job in final.values()} == {job.id: 1 + (job.id == victim.id) for job in jobs}
    assert final[victim.id].error.startswith("attempt 1 lost: runner pid")
    assert all(log_of(job).count("starts:") == job.attempts for job in final.values())
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    experiment = client.get_experiment_by_name("faceforge").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`faceforge.job_id` = '{victim.id}'")
    assert [run.info.run_id for run in runs] == [final[victim.id].mlflow_run_id]  # the rerun resumed its run


def test_a_job_runs_on_while_torchrun_outlives_its_launcher_killed_with_9(home: Path, tiny_train_root: Path) -> None:
    """torchrun stops its ranks for a few seconds after its launcher is killed with 9 (`kill` of the launcher
    alone). The job runs on until then: shown ended, it would be retried into a folder still being trained in."""
    store = JobStore(store_path())
    [job] = store.submit(make_jobs([*tiny(home, tiny_train_root, steps=100000), "trainer.nproc=2"], slots=2))
    executor = LocalExecutor(slots=2)
    Scheduler(store, {"local": executor}, home, lease_seconds=10, poll_seconds=0.2).run_once()
    wait_for(lambda: "train:" in log_of(store.get(job.id)), timeout=120, what="training")
    job = store.get(job.id)
    runner = json.loads(job.handle)["pid"]
    [launcher] = Path(f"/proc/{runner}/task/{runner}/children").read_text().split()
    os.kill(int(launcher), signal.SIGKILL)
    folder_lock, looks = Path(job.log_path).parent / TRAIN_LOCK, 0
    deadline = time.monotonic() + 90
    while True:
        state = executor.status(job).state
        if (free := try_lock(folder_lock)) is not None:
            os.close(free)
            break
        assert state == RUNNING, "the job was shown ended while torchrun still held its folder"
        looks += 1
        assert time.monotonic() < deadline, "torchrun never stopped"
        time.sleep(0.05)
    assert looks > 0, "torchrun had stopped before the job could be looked at"
    wait_for(lambda: executor.status(job).state != RUNNING, timeout=30, what="end once torchrun stopped")


def faceforge(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FACEFORGE_HOME": str(home)}
    return subprocess.run([*CLI, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_queue_cli_submit_list_show_clone_cancel_and_logs(home: Path, tiny_train_root: Path) -> None:
    store = JobStore(store_path())
    bad = faceforge(home, "queue", "submit", *tiny(home, tiny_train_root), "optim.lr=0.1,-1")
    assert bad.returncode == 2 and "optim.lr must be positive" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and store.list() == []  # one line, nothing enqueued

    forever = tiny(home, tiny_train_root, steps=100_000)
    submitted = faceforge(home, "queue", "submit", *forever, "optim.lr=0.1,0.05", "--priority", "2")
    assert submitted.returncode == 0, submitted.stderr
    (sweep_id,) = re.findall(r"queued 2 job\(s\) in sweep (sweep-\w+)", submitted.stdout)
    (first, one), (second, two) = re.findall(r"(job-\w+)  position (\d+)", submitted.stdout)
    assert (one, two) == ("1", "2")
    listed = faceforge(home, "queue", "list", "--sweep", sweep_id)
    assert listed.returncode == 0 and re.search(rf"{first} .* queued +1 +2 ", listed.stdout), listed.stdout
    assert faceforge(home, "queue", "cancel", second).stdout.strip() == f"{second} cancelled"
    again = faceforge(home, "queue", "cancel", second)
    assert again.returncode == 1 and "already cancelled" in again.stderr and "Traceback" not in again.stderr
    missing = faceforge(home, "queue", "show", "job-missing")
    assert missing.returncode == 1 and "no job 'job-missing'" in missing.stderr

    cloned = faceforge(home, "queue", "clone", first, "optim.lr=0.2", "--priority", "1")
    assert cloned.returncode == 0, cloned.stderr
    (clone_id,) = re.findall(r"(job-\w+)  position 2", cloned.stdout)
    clone, original = store.get(clone_id), store.get(first)
    assert clone.overrides == [o for o in original.overrides if not o.startswith("optim.lr=")] + ["optim.lr=0.2"]
    assert (clone.priority, clone.slots, clone.sweep_id) == (1, 1, None)
    assert faceforge(home, "queue", "cancel", clone_id).returncode == 0

    with running_scheduler(home, "--slots", "1", "--poll-seconds", "0.2"):
        # The job trains "forever"; cancelling it stops it at a step boundary, after a checkpoint.
        wait_for(lambda: re.search(r"\| +[1-9]\d*/100000", log_of(store.get(first))), 120, "training steps")
        asked = faceforge(home, "queue", "cancel", first)
        assert "cancel requested" in asked.stdout, asked.stdout + asked.stderr
        followed = faceforge(home, "queue", "logs", first, "--follow")  # returns once the job has ended
        shown = faceforge(home, "queue", "show", first).stdout
    stopped = store.get(first)
    assert (stopped.state, stopped.exit_code) == (CANCELLED, 1) and stopped.cancelled_at, log_of(stopped)
    assert followed.stdout == log_of(stopped) and followed.stdout.count("starts:") == 1
    assert "stopped by SIGTERM" in followed.stdout and "exit code 1" in followed.stdout
    assert (home / "jobs" / first / "checkpoints" / "latest").exists()
    assert re.search(r"state: +cancelled", shown) and f"mlflow run:       {stopped.mlflow_run_id}" in shown


def test_a_finished_sweep_registers_its_best_run_as_champion(
    home: Path, tiny_train_root: Path, tiny_pairs: Path
) -> None:
    evaluated = [o for o in tiny(home, tiny_train_root) if o not in ("eval=none", "mlflow.log_model=false")]
    evaluated += ["eval=pairs", f"eval.pairs={tiny_pairs}", f"eval.root={SHARED / 'lfw'}", "eval.crop_fraction=0.5"]
    store = JobStore(store_path())
    *jobs, waiting = make_jobs([*evaluated, "optim.lr=0.05,0.02,0.01"])
    waiting.executor = "ray"  # no scheduler here drives it: it waits until cancelled, and ends the sweep then
    store.submit([*jobs, waiting])
    scheduler = Scheduler(store, {"local": LocalExecutor(slots=2)}, home, poll_seconds=0.2)
    drive(scheduler, all_terminal(store, jobs), timeout=300)
    finished = [store.get(job.id) for job in jobs]
    assert {job.state for job in finished} == {SUCCEEDED}, [(job.id, job.error) for job in finished]
    with pytest.raises(ValueError, match="no models:/faceforge@champion in the registry yet"):
        champion(f"sqlite:///{home}/mlflow.db")  # not before the sweep has ended
    store.cancel(waiting.id)
    scheduler.run_once()
    version = champion(f"sqlite:///{home}/mlflow.db")
    best = max(finished, key=lambda job: job.metrics["eval.accuracy"])
    assert version.run_id == best.mlflow_run_id
    assert version.sweep_id == jobs[0].sweep_id and "champion" in version.aliases


def test_cancelling_a_start_whose_handle_was_not_recorded_stops_it(home: Path, tiny_train_root: Path) -> None:
    """The scheduler died between starting the runner and recording its handle: the job still runs."""
    store, executor = JobStore(store_path()), LocalExecutor(slots=1)
    scheduler = Scheduler(store, {"local": executor}, home, poll_seconds=0.2)
    (job,) = store.submit(make_jobs(tiny(home, tiny_train_root, steps=100_000)))
    claimed = store.claim("local", scheduler.owner, 1, 30)
    assert claimed is not None and claimed.id == job.id
    executor.start(claimed, home / "jobs" / job.id)  # running; its handle is never stored
    assert store.get(job.id).handle is None and store.cancel(job.id).cancel_requested
    drive(scheduler, all_terminal(store, [job]), timeout=60)
    assert store.get(job.id).state == CANCELLED
    assert live_jobs({job.id}) == set()  # stopped, not left training on


def test_a_job_larger_than_the_executor_fails_instead_of_blocking_the_queue(home: Path, tiny_train_root: Path) -> None:
    store = JobStore(store_path())
    (big,) = store.submit(make_jobs(tiny(home, tiny_train_root), slots=3))
    (small,) = store.submit(make_jobs(tiny(home, tiny_train_root)))
    scheduler = Scheduler(store, {"local": LocalExecutor(slots=2)}, home, poll_seconds=0.2)
    drive(scheduler, all_terminal(store, [big, small]), timeout=120)
    assert store.get(big.id).state == "failed" and store.get(big.id).error == "needs 3 slots; the local executor has 2"
    assert store.get(small.id).state == SUCCEEDED
