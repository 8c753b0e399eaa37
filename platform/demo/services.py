"""The demo's child servers (`faceforge scheduler`, `faceforge web`) and following queued jobs with a progress bar."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests
import yaml
from tqdm import tqdm

from faceforge.jobs import SUCCEEDED, JobStore

CLI = (sys.executable, "-c", "from faceforge.cli import main; main()")
START_SECONDS = 60.0  # torch, MLflow and FastAPI imports on a busy 2-core machine
STOP_SECONDS = 20.0
# The trainer's tqdm line in a job log: "train:  42%|####      | 210/500 [...]"
TRAIN_PROGRESS = re.compile(r"train:\s+\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")
LOG_TAIL = 8192


class DemoError(ValueError):
    """A stage that cannot go on; one line that names the log to read."""


def free_port(preferred: int) -> int:
    """`preferred` when nothing listens there, else any free port (a second demo, or another server on 8000)."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise DemoError("no free TCP port on 127.0.0.1")


class Child:
    """A `faceforge` command in its own session (Ctrl-C in the terminal reaches the demo, which stops it in order)."""

    def __init__(self, name: str, arguments: Sequence[str], env: dict[str, str], logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.name, self.log = name, logs / f"{name}.log"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*CLI, *arguments], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def check(self) -> None:
        if self.process.poll() is not None:
            raise DemoError(f"faceforge {self.name} exited with code {self.process.returncode}; see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_until_serving(web: Child, url: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while True:
        web.check()
        try:
            if requests.get(f"{url}/healthz", timeout=5).ok:
                return
        except requests.RequestException:  # not listening yet, or too busy starting to answer in time
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"faceforge web did not answer at {url} within {START_SECONDS:.0f} s; see {web.log}")
        time.sleep(0.3)


def train_progress(log_path: str | None) -> tuple[int, int] | None:
    """(step, steps) from the last progress line of a job's log, if it has one yet."""
    if not log_path or not Path(log_path).is_file():
        return None
    with open(log_path, "rb") as log:
        log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL))
        found = TRAIN_PROGRESS.findall(log.read().decode("utf-8", errors="replace"))
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def follow_jobs(store: JobStore, job_ids: Sequence[str], label: str, scheduler: Child) -> None:
    """A bar over the training steps of all `job_ids` until every job ends; DemoError unless all succeeded."""
    jobs = [store.get(job_id) for job_id in job_ids]
    steps = {job.id: int(yaml.safe_load(job.config_yaml)["trainer"]["steps"]) for job in jobs}
    with tqdm(total=sum(steps.values()), desc=label, unit="step", dynamic_ncols=True) as bar:
        while True:
            scheduler.check()
            jobs = [store.get(job_id) for job_id in job_ids]
            done = sum(
                steps[job.id] if job.state == SUCCEEDED else (train_progress(job.log_path) or (0, 0))[0] for job in jobs
            )
            bar.update(done - bar.n)
            bar.set_postfix_str(", ".join(sorted({job.state for job in jobs})))
            if all(job.terminal for job in jobs):
                break
            time.sleep(1.0)
    for job in jobs:
        if job.state != SUCCEEDED:
            raise DemoError(
                f"job {job.id} ({job.name}) {job.state}: {job.error or 'no error recorded'}; log {job.log_path}"
            )
