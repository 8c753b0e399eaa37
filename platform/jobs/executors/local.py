"""The default executor: a job runs on this machine in a session of its own, under a small runner process.

Whether a job is alive is a file lock, not a pid. `start` takes an flock on job_dir/runner.lock before it
starts the runner, which inherits the lock and hands it on to the trainer, so the lock is held exactly while
either of them lives, whatever was killed with -9 (scheduler, runner or both), and there is no moment in
which a second start could slip in: a held lock means the job already runs, and `start` returns its
handle. The handle is the runner's pid with its start time from /proc, so a later process that reuses the
pid is never taken for the runner. The runner writes the exit code into job_dir, where any scheduler finds
it, even one started after the job ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from faceforge.cores import usable_cores
from faceforge.jobs.executors.base import Status, threads_per_rank
from faceforge.jobs.executors.local_runner import (
    EXIT_CODE_FILE,
    LOCK_FILE,
    LOG_FILE,
    RUNNER_FILE,
    STOP_FILE,
    process_start_time,
    write_atomic,
)
from faceforge.jobs.logs import read_log
from faceforge.jobs.store import CANCELLED, FAILED, LOST, RUNNING, SUCCEEDED, Job
from faceforge.locks import try_lock

RUNNER = Path(__file__).with_name("local_runner.py")
HANDLE_WAIT_SECONDS = 30.0  # how long a runner that another scheduler just started may take to record itself


class LocalExecutor:
    name = "local"
    remote_log = False

    def __init__(self, slots: int | None = None, grace_seconds: float = 30.0) -> None:
        self.slots = usable_cores() if slots is None else slots
        if self.slots < 1:
            raise ValueError(f"the local executor needs at least 1 slot, got {self.slots}")
        self.grace_seconds = grace_seconds
        self._runners: dict[int, subprocess.Popen[bytes]] = {}  # started here; reaped by status, never zombies

    def capacity(self) -> int:
        return self.slots

    def start(self, job: Job, job_dir: Path) -> str:
        from faceforge.jobs.spec import train_command  # spec loads the config machinery (torch): seconds

        job_dir = job_dir.resolve()
        job_dir.mkdir(parents=True, exist_ok=True)
        if (lock := _lock_unless_running(job_dir)) is None:  # its runner or trainer is alive: a repeated delivery
            return _recorded_handle(job_dir)
        try:
            if (job_dir / EXIT_CODE_FILE).exists():  # it ended while no scheduler watched; status() reports how
                return _recorded_handle(job_dir)
            for stale in (RUNNER_FILE, STOP_FILE):
                (job_dir / stale).unlink(missing_ok=True)
            command = [sys.executable, str(RUNNER), str(job_dir), "--lock-fd", str(lock), "--"]
            with open(job_dir / LOG_FILE, "ab") as log:
                runner = subprocess.Popen(
                    [*command, *train_command(job, job_dir)],
                    pass_fds=(lock,),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: outlives the scheduler, stopped as a whole
                    env=job_environment(job),
                )
        finally:
            os.close(lock)  # the runner holds the lock from here on
        self._runners[runner.pid] = runner
        return _handle(runner.pid, process_start_time(runner.pid), job_dir)

    def find(self, job: Job, job_dir: Path) -> str | None:
        job_dir = job_dir.resolve()
        if not job_dir.exists():
            return None
        if (lock := _lock_unless_running(job_dir)) is None:
            return _recorded_handle(job_dir)
        os.close(lock)
        return _recorded_handle(job_dir) if (job_dir / EXIT_CODE_FILE).exists() else None  # it ended unwatched

    def status(self, job: Job) -> Status:
        handle = _parse(job)
        job_dir = Path(handle["job_dir"])
        runner = self._runners.get(handle["pid"])
        if runner is not None and runner.poll() is not None:
            del self._runners[handle["pid"]]
        if not job_dir.is_dir():  # removed under the job, lock and exit code with it: only the runner can tell
            if _runner_alive(handle):
                return Status(RUNNING)
            return Status(LOST, error=f"job folder {job_dir} vanished")
        if _runner_alive(handle) or _lock_held(job_dir):  # the lock outlives a killed runner while its trainer runs
            return Status(RUNNING)
        code = _read_exit_code(job_dir)  # read after the lock check: the runner writes it before letting go
        if code is None:
            return Status(LOST, error=f"runner pid {handle['pid']} ended without recording an exit code")
        if code == 0:
            return Status(SUCCEEDED, 0)
        if job.cancel_requested:
            return Status(CANCELLED, code)
        return Status(FAILED, code, f"exit code {code}; see {job_dir / LOG_FILE}")

    def stop(self, job: Job) -> None:
        """SIGTERM to the job's process group on the first call, SIGKILL on a call grace_seconds later.

        Never blocks: the scheduler calls it on every tick until the job has ended. On SIGTERM the trainer
        saves a checkpoint at the next step boundary and exits, which the grace period leaves time for.
        """
        handle = _parse(job)
        job_dir = Path(handle["job_dir"])
        if not job_dir.is_dir():  # no folder to checkpoint into, nor to keep the grace period's start in
            if _runner_alive(handle):  # its start time proves the group is the job's, not a reused id
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(handle["pid"], signal.SIGKILL)
            return
        if not (_runner_alive(handle) or _lock_held(job_dir)):
            return
        asked_at = (job_dir / STOP_FILE).read_text() if (job_dir / STOP_FILE).exists() else None
        if asked_at is None:
            write_atomic(job_dir / STOP_FILE, str(time.time()))
            sig = signal.SIGTERM
        elif time.time() - float(asked_at) >= self.grace_seconds:
            sig = signal.SIGKILL
        else:
            return
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.killpg(handle["pid"], sig)  # the group outlives its leader while the trainer runs: the id is ours

    def read_log(self, job: Job, offset: int = 0) -> tuple[str, int]:
        return read_log(job.log_path, offset, final=True)


def job_environment(job: Job) -> dict[str, str]:
    """One OpenMP thread per slot and rank: a 2-slot job with trainer.nproc=1 gets 2, with nproc=2 gets 1 each.

    The trainer sets torch's own thread count from trainer.threads; this caps OpenMP everywhere else
    (data loading, OpenCV, evaluation) so that a job stays within the cores it was given.
    """
    return {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(job)), "PYTHONUNBUFFERED": "1"}


def _handle(pid: int, start_time: int | None, job_dir: Path) -> str:
    return json.dumps({"pid": pid, "start_time": start_time, "job_dir": str(job_dir)})


def _parse(job: Job) -> dict[str, Any]:
    if not job.handle:
        raise ValueError(f"job {job.id} has no local handle; it was never started")
    return json.loads(job.handle)


def _recorded_handle(job_dir: Path) -> str:
    """The handle of the runner that job_dir's runner.json records (written by the runner as it starts)."""
    runner = json.loads((job_dir / RUNNER_FILE).read_text())
    return _handle(runner["pid"], runner["start_time"], job_dir)


def _runner_alive(handle: dict[str, Any]) -> bool:
    return handle["start_time"] is not None and process_start_time(handle["pid"]) == handle["start_time"]


def _lock_unless_running(job_dir: Path) -> int | None:
    """A locked fd of job_dir's runner lock, or None when a live runner holds it and has recorded itself (one that
    another scheduler just started gets HANDLE_WAIT_SECONDS to do so)."""
    deadline = time.monotonic() + HANDLE_WAIT_SECONDS
    while (lock := try_lock(job_dir / LOCK_FILE)) is None:
        if (job_dir / RUNNER_FILE).exists():
            return None
        if time.monotonic() > deadline:
            raise RuntimeError(f"{job_dir} is locked by a runner that never recorded itself")
        time.sleep(0.05)
    return lock


def _lock_held(job_dir: Path) -> bool:
    fd = try_lock(job_dir / LOCK_FILE)
    if fd is None:
        return True
    os.close(fd)  # closing the only fd of this open file releases the probe's lock
    return False


def _read_exit_code(job_dir: Path) -> int | None:
    path = job_dir / EXIT_CODE_FILE
    return int(path.read_text()) if path.exists() else None
