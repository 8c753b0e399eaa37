"""The Ray executor against a real local Ray head: a 2-rank gloo job, idempotent start, stop, retry, forgotten
ids."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from faceforge.jobs import (
    CANCELLED,
    FAILED,
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
from faceforge.jobs.executors import ray_jobs
from faceforge.jobs.executors.base import Status
from faceforge.jobs.executors.ray_jobs import RayExecutor, local_head, submission_id
from faceforge.jobs.scheduler import Scheduler

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


def ray_scheduler(ray_address: str, home: Path) -> tuple[JobStore, RayExecutor, Scheduler]:
    store, executor = JobStore(store_path(home)), RayExecutor(ray_address)
    return store, executor, Scheduler(store, {"ray": executor}, home, poll_seconds=0.2)


def scheduled_until_ended(scheduler: Scheduler, executor: RayExecutor, job: Job, timeout: float) -> Job:
    """Tick the scheduler until the job has ended; returns it as stored."""
    deadline = time.monotonic() + timeout
    while not (job := scheduler.store.get(job.id)).terminal:
        assert time.monotonic() < deadline, executor.read_log(job)[0] if job.started_at else "never started"
        scheduler.run_once()
        time.sleep(0.2)
    return job


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
    assert first.entrypoint.startswith(f"exec {shlex.quote(sys.executable)} -m faceforge.train ")  # the venv's Python

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
    # Stopped within a second or two of their submission: Ray's shell had not always forked the trainer yet, and
    # a trainer started after the stop kept training, unseen, after Ray reported the job stopped.
    for _ in range(10):
        assert processes_naming(job.id) == []
        time.sleep(0.5)


def command_line(pid: int | str) -> str:
    """A process's command line, its words joined by spaces; empty once it has ended (a zombie's is empty too)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # not a process, or one that has just ended
        return ""


def is_zombie(pid: int) -> bool:
    """Ended, its exit code waiting for its parent: what `Popen.poll` sees. Its main thread shows Z while other
    threads still end, when waitpid does not report it yet, so those must have gone too."""
    ended = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return ended and len(list(Path(f"/proc/{pid}/task").iterdir())) <= 1


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (a job's id is in its trainer's arguments)."""
    commands = (command_line(process.name) for process in Path("/proc").iterdir() if process.name.isdigit())
    return [command for command in commands if text in command]


def test_unknown_submission_is_lost(ray_address: str, home: Path, tiny_train_root: Path) -> None:
    executor = RayExecutor(ray_address)
    job = tiny_job(home, tiny_train_root, nproc=1, steps=1)  # made but never started: Ray has never seen it
    status = executor.status(job)
    assert status.state == LOST and job.id in (status.error or "")
    assert executor.read_log(job, 7) == ("", 7)
    executor.stop(job)  # nothing to stop is not an error


def test_cancelling_a_start_whose_handle_was_not_recorded_stops_it_on_ray(
    ray_address: str, home: Path, tiny_train_root: Path
) -> None:
    """The scheduler died between Ray accepting the submission and recording its handle: the job still runs."""
    store, executor, scheduler = ray_scheduler(ray_address, home)
    (job,) = store.submit([tiny_job(home, tiny_train_root, nproc=1, steps=100_000)])
    claimed = store.claim("ray", scheduler.owner, 2, 30)
    assert claimed is not None and claimed.id == job.id
    executor.start(claimed, job_dir(home, job.id))  # landed on Ray; its handle is never stored
    assert store.get(job.id).handle is None and store.cancel(job.id).cancel_requested
    assert scheduled_until_ended(scheduler, executor, claimed, timeout=90).state == CANCELLED
    assert executor.status(claimed).state == CANCELLED  # Ray's own view: it was stopped, not left running
    assert processes_naming(job.id) == []  # and nothing of it trains on


def test_the_scheduler_copies_a_ray_jobs_log_where_the_web_page_reads_it(
    ray_address: str, home: Path, tiny_train_root: Path
) -> None:
    store, executor, scheduler = ray_scheduler(ray_address, home)
    (job,) = store.submit([tiny_job(home, tiny_train_root, nproc=1, steps=2)])
    job = scheduled_until_ended(scheduler, executor, job, timeout=150)
    assert job.state == SUCCEEDED, job.error
    assert job.log_path == str(job_dir(home, job.id) / f"{job.handle}.log")
    copied = Path(job.log_path).read_text()
    assert copied == executor.read_log(job)[0] and "mlflow:" in copied  # whole, and copied once


def test_a_head_that_dies_in_use_says_why_before_its_logs_go() -> None:
    """Ray's `start --block` ends the whole head when one of its processes dies; the tests that use it then fail
    on "connection refused" alone (CI saw it once), so leaving the head names what died, from head.log, and quotes
    that process's own log, which goes with the temp folder (Ray tails only its .out and .err, here both empty)."""
    died = r"(?s)Ray head exited with code \d+ while in use.*exited unexpectedly"
    with tempfile.TemporaryDirectory(prefix="ffray-") as temp_dir:
        logs = Path(temp_dir) / "session_latest" / "logs"
        with pytest.raises(RuntimeError, match=died) as raised, local_head(Path(temp_dir), num_cpus=1) as address:
            # Picked by its folder: the session's head runs beside it when the module runs whole.
            ours = [pid for pid, _ in ray_jobs._descendants(os.getpid()) if temp_dir in command_line(pid)]
            [head] = [pid for pid in ours if "start --head" in command_line(pid)]
            [dashboard] = [pid for pid in ours if "dashboard/dashboard.py" in command_line(pid)]
            assert _reachable(address)
            os.kill(dashboard, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while not is_zombie(head):  # not an empty command line: a process still exiting has one too
                assert time.monotonic() < deadline, "the head outlived its dashboard"
                time.sleep(0.5)
        own_log = (logs / "dashboard.log").read_text().splitlines()
        message = str(raised.value)
        assert f"the end of {logs / 'dashboard.log'}:\n" in message and message.endswith(own_log[-1])
        assert "dashboard.err" not in message  # empty


def _reachable(address: str) -> bool:
    try:
        ray_jobs.cluster_cpus(address)
    except Exception:  # refused, reset or timed out: whatever a dead head gives
        return False
    return True


def test_a_bare_host_port_address_is_read_as_the_dashboard(ray_address: str) -> None:
    executor = RayExecutor(ray_address.removeprefix("http://"))  # Ray alone would take it for a GCS address
    assert executor.address == ray_address and executor.capacity() == 2
    with pytest.raises(ValueError, match="must be the dashboard's http"):
        RayExecutor("ray://127.0.0.1:10001")


@contextmanager
def fake_head(
    answer: Callable[[str], tuple[int, dict] | None], version: tuple[int, dict] = (200, {"ray_version": "2.60.0"})
) -> Iterator[str]:
    """A real HTTP peer speaking as a Ray dashboard: /api/version as `version` (Ray 2.x), other requests as
    `answer` says (status and JSON body; None: never answer, like a hung head)."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.do_GET()

        def do_GET(self) -> None:
            reply = version if self.path == "/api/version" else answer(f"{self.command} {self.path}")
            if reply is None:
                release.wait(60)
                return
            body = json.dumps(reply[1]).encode()
            self.send_response(reply[0])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_a_hung_head_times_out_as_a_transient_error(
    home: Path, tiny_train_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ray_jobs, "REQUEST_TIMEOUT_SECONDS", 1.0)
    job = tiny_job(home, tiny_train_root, nproc=1, steps=1)
    outcome: list[BaseException | Status] = []
    with fake_head(lambda path: None) as address:
        executor = RayExecutor(address)

        def ask() -> None:
            try:
                outcome.append(executor.status(job))
            except BaseException as err:
                outcome.append(err)

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(15)
        assert outcome and isinstance(outcome[0], OSError), outcome or "status() still waiting after 15 s"


def test_a_server_error_is_transient_and_one_jobs_failure_does_not_stop_the_others(
    home: Path, tiny_train_root: Path
) -> None:
    store = JobStore(store_path(home))
    store.submit([tiny_job(home, tiny_train_root, nproc=1, steps=1) for _ in range(3)])
    owner = "me"
    for _ in range(3):
        claimed = store.claim("ray", owner, 3, 30)
        assert claimed is not None
        store.update(claimed.id, owner, handle=submission_id(claimed))
    polled = store.list(states=[RUNNING])  # the scheduler's order: only the last one's poll answers
    broken, rejected, done = (submission_id(job) for job in polled)

    def answer(path: str) -> tuple[int, dict]:
        if path.endswith(broken):  # "GET /api/jobs/<id>"
            return 503, {"error": "the head is restarting"}
        if path.endswith(rejected):
            return 400, {"error": "bad request"}
        return 200, {"type": "SUBMISSION", "submission_id": done, "status": "SUCCEEDED", "entrypoint": "true"}

    with fake_head(answer) as address:
        with pytest.raises(OSError, match="503"):
            RayExecutor(address).status(polled[0])
        scheduler = Scheduler(store, {"ray": RayExecutor(address)}, home, poll_seconds=0.2)
        scheduler.owner = owner
        scheduler.run_once()
    states = [store.get(job.id).state for job in polled]
    assert states == [RUNNING, RUNNING, SUCCEEDED]  # 5xx: polled again later; 400 logged; the last still recorded


@pytest.mark.parametrize("busy", ["version", "info"])
def test_a_head_that_asks_to_come_back_later_is_transient(home: Path, tiny_train_root: Path, busy: str) -> None:
    """429 to the client's version check raised requests.HTTPError outside the timed requests, and 429 to a
    submission's lookup a RuntimeError: either failed the job for good over a head that was only busy."""
    store = JobStore(store_path(home))
    (job,) = store.submit([tiny_job(home, tiny_train_root, nproc=1, steps=1)])
    later = (429, {"error": "too many requests"})
    version = later if busy == "version" else (200, {"ray_version": "2.60.0"})
    with fake_head(lambda request: later, version) as address:
        scheduler = Scheduler(store, {"ray": RayExecutor(address)}, home, poll_seconds=0.2)
        assert store.claim("ray", scheduler.owner, 1, 30) is not None  # the fake head reports no CPUs to claim by
        scheduler.run_once()
    waiting = store.get(job.id)
    assert (waiting.state, waiting.handle, waiting.error) == (RUNNING, None, None)  # started on a later tick


def test_a_submission_the_head_rejects_fails_the_job_rather_than_retrying_forever(
    home: Path, tiny_train_root: Path
) -> None:
    """Ray answers 500, with a traceback as the body, when its job agent rejects a submission."""
    store = JobStore(store_path(home))
    (job,) = store.submit([tiny_job(home, tiny_train_root, nproc=1, steps=1)])

    def answer(request: str) -> tuple[int, dict]:
        if request == "POST /api/jobs/":
            return 500, {"traceback": "Traceback (most recent call last):\n  ...\nValueError: bad runtime_env"}
        return 404, {"error": "no such submission"}

    with fake_head(answer) as address:
        scheduler = Scheduler(store, {"ray": RayExecutor(address)}, home, poll_seconds=0.2)
        assert store.claim("ray", scheduler.owner, 1, 30) is not None  # the fake head reports no CPUs to claim by
        scheduler.run_once()
    ended = store.get(job.id)
    assert ended.state == FAILED and "could not start" in (ended.error or "") and "500" in (ended.error or "")
