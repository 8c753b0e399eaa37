"""Run queue jobs on a Ray cluster through the Ray Jobs API; the SQLite store stays the source of truth.

Ray forgets every submission when its head restarts and fails a job left pending for 15 minutes, so the
scheduler submits only when the job's slots fit in the cluster's CPUs, and a submission Ray no longer knows
is reported lost (the scheduler then requeues it; `trainer.resume=auto` continues from its checkpoints).

The entrypoint runs on a cluster node with the scheduler's Python (`sys.executable`), so every node must have
the same environment at the same path. Paths in overrides should be absolute: the node's working directory is
not the scheduler's.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient
from ray.util.state import list_nodes

from faceforge.jobs.executors.base import ExecutorUnreachableError, Status, threads_per_rank
from faceforge.jobs.paths import faceforge_home
from faceforge.jobs.spec import train_command
from faceforge.jobs.store import CANCELLED, FAILED, LOST, RUNNING, SUCCEEDED, Job

log = logging.getLogger(__name__)

CAPACITY_TTL_SECONDS = 10.0
# A hung head must not stall the scheduler's tick: a request that takes longer is ExecutorUnreachableError.
REQUEST_TIMEOUT_SECONDS = 30.0
# Environment the trainer needs to resolve its config exactly as the scheduler did.
PASSED_ENV = ("FACEFORGE_CONFIGS",)
# `ray start --block` names each of its processes that died in head.log as "dashboard [exit code=-9]", in colour.
DIED_PROCESS = re.compile(r"(\w+) \[exit code=")
COLOUR_CODE = re.compile(r"\x1b\[[0-9;]*m")
STATES = {
    JobStatus.PENDING: RUNNING,
    JobStatus.RUNNING: RUNNING,
    JobStatus.SUCCEEDED: SUCCEEDED,
    JobStatus.FAILED: FAILED,
    JobStatus.STOPPED: CANCELLED,
}


def submission_id(job: Job) -> str:
    """The Ray submission of this start of the job. Ray keeps an ended submission under its id for good, so a
    retried job needs a new one; the lease's start time tells the starts apart and stays the same when another
    scheduler adopts the start (a job never started gets suffix 0)."""
    return f"{job.id}-{round((job.started_at or 0.0) * 1000):x}"


def cluster_cpus(address: str) -> int:
    """CPUs of the live nodes; 0 until the head's own node has registered, a few seconds after its dashboard."""
    nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")])
    return int(sum(node.resources_total.get("CPU", 0) for node in nodes))


def dashboard_url(address: str) -> str:
    """The dashboard URL, "http://" added when missing: Ray reads a bare host:port as a GCS address and stalls
    connecting to it. Raises ValueError for another scheme (ray:// is the Ray Client, not the Jobs API)."""
    url = address if "://" in address else f"http://{address}"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"Ray address {address!r} must be the dashboard's http(s)://host:port")
    return url.rstrip("/")


class TimedJobSubmissionClient(JobSubmissionClient):
    """JobSubmissionClient whose requests time out, and whose server errors are transient: the SDK reports every
    HTTP error as RuntimeError, which would fail a job over a head that is briefly unwell.

    A submission is the exception: Ray answers 500 when its job agent rejects one, which no retry mends, so it
    stays a RuntimeError and the job fails with "could not start".
    """

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", REQUEST_TIMEOUT_SECONDS)
        try:
            response = super()._do_request(method, endpoint, **kwargs)
        except requests.RequestException as err:  # refused, reset or timed out
            raise ExecutorUnreachableError(f"Ray at {self._address} did not answer {method} {endpoint}: {err}") from err
        submission = method == "POST" and endpoint.rstrip("/") == "/api/jobs"
        come_back_later = response.status_code in (408, 429)  # a timeout or too many requests, whatever was asked
        if (response.status_code >= 500 and not submission) or come_back_later:
            last_line = (response.text.strip().splitlines() or [""])[-1]  # the body may be a whole traceback
            raise ExecutorUnreachableError(
                f"Ray at {self._address} answered {method} {endpoint} with {response.status_code}: {last_line}"
            )
        return response


def _is_missing(err: RuntimeError) -> bool:
    """The Jobs SDK reports every HTTP error as RuntimeError; 404 is how Ray says it has no such submission."""
    return "status code 404" in str(err)


class RayExecutor:
    """One Ray cluster, addressed by its dashboard URL. Each start of a job is one submission (`submission_id`).

    start, status and stop raise ExecutorUnreachableError while the head is down, slow or answering 5xx, so the
    scheduler retries on its next tick instead of declaring running jobs lost over a network blip. The submission id
    comes from the job alone, so a start whose handle was never recorded can still be found.
    """

    name = "ray"
    remote_log = True

    def __init__(self, address: str = "http://127.0.0.1:8265") -> None:
        self.address = dashboard_url(address)
        self._client: JobSubmissionClient | None = None
        self._capacity: tuple[float, int] | None = None  # (measured at, CPUs)

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:  # the constructor calls the head, so only connect when first needed
            self._client = TimedJobSubmissionClient(self.address)
        return self._client

    def capacity(self) -> int:
        """CPUs of the cluster's live nodes, cached briefly; 0 while the head is unreachable so jobs keep waiting."""
        now = time.monotonic()
        if self._capacity is not None and now - self._capacity[0] < CAPACITY_TTL_SECONDS:
            return self._capacity[1]
        try:
            cpus = cluster_cpus(self.address)
        except Exception as err:  # the state API raises its own exception types as well as OSError
            log.warning("Ray cluster at %s is unreachable, treating it as full: %s", self.address, err)
            return 0
        self._capacity = (now, cpus)
        return cpus

    def start(self, job: Job, job_dir: Path) -> str:
        """Submit the trainer under this start's `submission_id`, or find the submission a previous scheduler
        already made for it.

        Ray runs the entrypoint through a shell, hence one string. No shell injection is possible: every
        override was validated by compose_config when the job was made, and shlex.join quotes each argument,
        so the shell sees exactly the argv the local executor runs.
        """
        try:
            return self._start(job, job_dir)
        except requests.RequestException as err:  # raised outside _do_request: the SDK's own checks of answers
            raise ExecutorUnreachableError(f"Ray at {self.address} answered unusably: {err}") from err

    def _start(self, job: Job, job_dir: Path) -> str:
        if self._info(job) is not None:
            return submission_id(job)
        job_dir = job_dir.resolve()
        env = {
            "FACEFORGE_HOME": str(faceforge_home().resolve()),
            # One thread per rank per slot: more would oversubscribe the CPUs Ray reserved for the job.
            "OMP_NUM_THREADS": str(threads_per_rank(job)),
            "PYTHONUNBUFFERED": "1",  # so read_log follows training as it happens
            **{key: os.environ[key] for key in PASSED_ENV if key in os.environ},
        }
        try:
            self.client.submit_job(
                # exec: the trainer replaces Ray's shell, so a stop signals the trainer itself. Ray signals the
                # process tree it sees at the stop; a shell whose child was not yet forked left the trainer running.
                entrypoint="exec " + shlex.join(train_command(job, job_dir)),
                submission_id=submission_id(job),
                entrypoint_num_cpus=job.slots,
                runtime_env={"env_vars": env},
                metadata={"faceforge.job_id": job.id, "faceforge.name": job.name},
            )
        except RuntimeError:
            if self._info(job) is None:  # not a lost race with another scheduler submitting the same id
                raise
        return submission_id(job)

    def find(self, job: Job, job_dir: Path) -> str | None:
        return submission_id(job) if self._info(job) is not None else None

    def status(self, job: Job) -> Status:
        info = self._info(job)
        if info is None:
            return Status(
                LOST, error=f"Ray at {self.address} has no submission {submission_id(job)} (did its head restart?)"
            )
        state = STATES[info.status]
        if state == RUNNING:
            return Status(RUNNING)
        exit_code = 0 if state == SUCCEEDED else info.driver_exit_code
        return Status(state, exit_code, None if state == SUCCEEDED else info.message)

    def stop(self, job: Job) -> None:
        """Ray sends SIGTERM (the trainer checkpoints) and kills the process tree after its grace period."""
        try:
            self.client.stop_job(submission_id(job))
        except RuntimeError as err:
            if not _is_missing(err):
                raise

    def read_log(self, job: Job, offset: int = 0) -> tuple[str, int]:
        """Ray serves only the whole log, so slice it here; a forgotten submission has no log left."""
        try:
            data = self.client.get_job_logs(submission_id(job)).encode()
        except RuntimeError as err:
            if _is_missing(err):
                return "", offset
            raise
        return data[offset:].decode(errors="replace"), len(data)

    def _info(self, job: Job) -> JobDetails | None:
        try:
            return self.client.get_job_info(submission_id(job))
        except RuntimeError as err:
            if _is_missing(err):
                return None
            raise


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process under `pid`, from /proc; the start time tells a reused pid apart."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        started[int(entry.name)] = fields[19]
    found, pending = [], list(children.get(pid, []))
    while pending:
        child = pending.pop()
        found.append((child, started[child]))
        pending += children.get(child, [])
    return found


def _kill_if_same(pid: int, start_time: str) -> None:
    try:
        if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19] == start_time:
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError):
        pass


@contextmanager
def local_head(temp_dir: Path, num_cpus: int, timeout: float = 120.0) -> Iterator[str]:
    """A one-machine Ray cluster for tests and benchmarks; yields its dashboard address.

    Every port is picked free so it never collides with another cluster on the machine, and shutdown ends
    only the processes this head started (never `ray stop`, which ends every Ray process of the machine).
    """
    dashboard_port = _free_port()
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir.resolve()}",
        f"--port={_free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    address = f"http://127.0.0.1:{dashboard_port}"
    head_log = temp_dir / "head.log"
    with head_log.open("wb") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    died_in_use = None
    try:
        deadline = time.monotonic() + timeout
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with code {head.returncode}; see {head_log}")
            try:
                if cluster_cpus(address) >= num_cpus:
                    break
            except Exception:  # the dashboard is not serving yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray head at {address} not up after {timeout:.0f} s; see {head_log}")
            time.sleep(1.0)
        yield address
        died_in_use = head.poll()
    finally:
        started = _descendants(head.pid)
        head.terminate()  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        for pid, start_time in started:  # whatever outlived the graceful stop, job entrypoints included
            _kill_if_same(pid, start_time)
    if died_in_use is not None:  # `ray start --block` ends the head when one of its processes dies: say why
        raise RuntimeError(f"the Ray head exited with code {died_in_use} while in use; {_last_words(temp_dir)}")


def _last_words(temp_dir: Path, lines: int = 40) -> str:
    """The end of head.log, which names the processes that died, then the end of each one's own non-empty logs:
    they go with the temp folder, and Ray quotes only their .out and .err (the dashboard writes to its .log)."""
    head_log, logs = temp_dir / "head.log", temp_dir / "session_latest" / "logs"
    head_text = COLOUR_CODE.sub("", head_log.read_text(errors="replace"))
    quotes = [(head_log, head_text)]
    for name in dict.fromkeys(DIED_PROCESS.findall(head_text)):
        for path in (logs / f"{name}.log", logs / f"{name}.out", logs / f"{name}.err"):
            if path.is_file() and path.stat().st_size:
                quotes.append((path, COLOUR_CODE.sub("", path.read_text(errors="replace"))))
    return "\n".join(f"the end of {path}:\n" + "\n".join(text.splitlines()[-lines:]) for path, text in quotes)
