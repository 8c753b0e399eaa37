"""The loop that drives the queue: claim jobs that fit, start them, watch them, record how they ended.

Any number of schedulers may share one store; each owns the jobs it leased and renews those leases at a
third of their length. When a scheduler dies, its leases expire and another adopts the jobs: it asks the
executor first (still running: keep watching; ended: record; lost: requeue), and restarts only jobs whose
start never took place. Starting is idempotent per job id, so a job is started again only when its run
was truly lost, at most max_attempts times, each start counted in `attempts` and its loss kept in `error`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import yaml

from faceforge.jobs.executors import Executor, ExecutorUnreachableError, Status
from faceforge.jobs.executors.local_runner import EXIT_CODE_FILE, LOG_FILE
from faceforge.jobs.paths import job_dir
from faceforge.jobs.store import CANCELLED, FAILED, LOST, RETRYABLE, RUNNING, Job, JobStore

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        store: JobStore,
        executors: dict[str, Executor],
        home: Path,
        lease_seconds: float = 30.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.store, self.executors, self.home = store, executors, home.resolve()
        self.lease_seconds, self.poll_seconds = lease_seconds, poll_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._last_heartbeat = 0.0
        self._tracking_ready: set[tuple[str, str]] = set()

    def run_forever(self, stop_event: threading.Event) -> None:
        log.info(
            "scheduler %s: %s", self.owner, ", ".join(f"{n} ({e.capacity()} slots)" for n, e in self.executors.items())
        )
        while not stop_event.is_set():
            try:
                self.run_once()
            except Exception:  # a busy database or an unreachable cluster must not stop the queue
                log.exception("scheduler tick failed; trying again in %.1f s", self.poll_seconds)
            stop_event.wait(self.poll_seconds)

    def run_once(self) -> None:
        self._heartbeat()
        for name in self.executors:
            for job in self.store.adopt_expired(name, self.owner, self.lease_seconds):
                log.warning("adopted %s: the scheduler that leased it stopped renewing the lease", job.id)
        for job in self._owned():
            try:
                self._poll(job)
            except Exception:  # one job the executor cannot answer about must not stop the others being watched
                log.exception("could not poll %s; trying again next tick", job.id)
        for name, executor in self.executors.items():
            capacity = executor.capacity()
            if capacity > 0:  # 0: the cluster is unreachable, so nothing can be judged too big
                for job in self.store.fail_oversized(name, capacity):
                    log.error("%s failed: %s", job.id, job.error)
            while (job := self.store.claim(name, self.owner, capacity, self.lease_seconds)) is not None:
                self._start(job, executor)
        for job in self.store.claim_ended_sweeps(retry_seconds=self.lease_seconds):
            if select_champion(job):
                self.store.sweep_selected(job.sweep_id or "")

    def _owned(self) -> list[Job]:
        return [job for job in self.store.list(states=[RUNNING]) if job.lease_owner == self.owner]

    def _heartbeat(self) -> None:
        if time.monotonic() - self._last_heartbeat < self.lease_seconds / 3:
            return
        self._last_heartbeat = time.monotonic()
        for job in self._owned():
            self.store.heartbeat(job.id, self.owner, self.lease_seconds)

    def _start(self, job: Job, executor: Executor) -> None:
        directory = job_dir(self.home, job.id)
        try:
            self._prepare_tracking(job)  # this machine's files: an unusable database path does not heal by waiting
        except Exception as err:
            self._fail_start(job, err)
            return
        try:
            handle = executor.start(job, directory)
        except ExecutorUnreachableError as err:  # e.g. a cluster head that is briefly down: the next tick tries again
            log.warning("could not start %s yet: %s", job.id, err)
            return
        except Exception as err:  # one job that cannot start must not stop the others
            self._fail_start(job, err)
            return
        self._record_start(job, executor, directory, handle)
        log.info("started %s (%s, attempt %d) in %s", job.id, job.name, job.attempts, directory)

    def _record_start(self, job: Job, executor: Executor, directory: Path, handle: str) -> None:
        # A remote log is copied per start: each Ray submission's log begins again at byte 0.
        log_path = directory / (f"{handle}.log" if executor.remote_log else LOG_FILE)
        self.store.update(job.id, self.owner, handle=handle, log_path=str(log_path))

    def _fail_start(self, job: Job, err: Exception) -> None:
        log.error("could not start %s: %s", job.id, err)
        self.store.finish(job.id, self.owner, FAILED, error=f"could not start: {err}")

    def _poll(self, job: Job) -> None:
        executor = self.executors.get(job.executor)
        if executor is None:  # owned through a lease, but this scheduler does not drive that executor
            return
        if job.handle is None:  # leased, but the start never finished (or its scheduler died first)
            if job.cancel_requested:
                self._cancel_unrecorded(job, executor)
            else:
                self._start(job, executor)
            return
        try:
            if job.cancel_requested:
                executor.stop(job)
            status = executor.status(job)
            if executor.remote_log:  # after the status, so an ended job's copy is complete before it is recorded
                self._copy_log(job, executor)
        except OSError as err:
            log.warning("cannot reach the %s executor about %s: %s", job.executor, job.id, err)
            return
        if status.state != RUNNING:
            self._record(job, status)

    @staticmethod
    def _copy_log(job: Job, executor: Executor) -> None:
        """Append what the executor's log holds past the local copy's end."""
        if not job.log_path:
            return
        path = Path(job.log_path)
        text, _ = executor.read_log(job, path.stat().st_size if path.exists() else 0)
        if text:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as copy:
                copy.write(text.encode())

    def _cancel_unrecorded(self, job: Job, executor: Executor) -> None:
        """Cancel a job whose start may have landed before its handle was recorded: a start the executor finds
        gets its handle now, and the next tick stops it like any other running job."""
        directory = job_dir(self.home, job.id)
        try:
            handle = executor.find(job, directory)
        except OSError as err:
            log.warning("cannot reach the %s executor to cancel %s: %s", job.executor, job.id, err)
            return
        if handle is None:  # never started, so nothing needs stopping
            self.store.finish(job.id, self.owner, CANCELLED)
        else:
            self._record_start(job, executor, directory, handle)

    def _record(self, job: Job, status: Status) -> None:
        if status.state == LOST and not job.cancel_requested:
            try:
                requeued = self.store.requeue(job.id, self.owner, f"attempt {job.attempts} lost: {status.error}")
            except KeyError:  # another scheduler took the lease over meanwhile
                return
            log.warning("%s lost (%s); now %s after %d attempt(s)", job.id, status.error, requeued.state, job.attempts)
            return
        state = CANCELLED if status.state == LOST else status.state  # killed after its grace period
        run_id, metrics = mlflow_result(job)
        if run_id is not None:
            self.store.update(job.id, self.owner, mlflow_run_id=run_id, metrics=metrics)
        # An earlier attempt's loss stays in `error`, so a job that succeeded on a second start shows why.
        self.store.finish(job.id, self.owner, state, status.exit_code, status.error or job.error)
        log.info("%s %s (exit code %s)", job.id, state, status.exit_code)

    def _prepare_tracking(self, job: Job) -> None:
        """Create the MLflow database and experiment here, once, before jobs use them concurrently."""
        mlflow = yaml.safe_load(job.config_yaml)["mlflow"]
        target = (mlflow["tracking_uri"], mlflow["experiment"])
        if target in self._tracking_ready or not target[0].startswith("sqlite:///"):
            return
        from faceforge.registry import prepare_tracking

        prepare_tracking(*target)
        self._tracking_ready.add(target)


def retry(store: JobStore, home: Path, job_id: str) -> Job:
    """Queue a cancelled, failed or lost job again under its own id, so its trainer resumes from the checkpoints
    in its directory (jobs run with trainer.resume=auto).

    The last run's exit code goes first, or the local executor would take the new start for a repeated delivery
    of the run that ended, and report that ending again. Raises KeyError for an unknown job, ValueError for one
    that has not ended in cancelled, failed or lost.
    """
    if store.get(job_id).state in RETRYABLE:  # ended: no runner is left to write the file meanwhile
        (job_dir(home, job_id) / EXIT_CODE_FILE).unlink(missing_ok=True)
    return store.retry(job_id)


def select_champion(job: Job) -> bool:
    """Once no job of `job`'s sweep is left to run, register its best run as the champion. False when MLflow could
    not be asked, to try again later.

    The policy is the one the sweep was launched with (saved by the Hydra launcher), else the default policy.
    """

    from mlflow.exceptions import MlflowException

    from faceforge.registry import select_and_register

    tracking_uri = yaml.safe_load(job.config_yaml)["mlflow"]["tracking_uri"]
    try:
        selection, version = select_and_register(tracking_uri, job.sweep_id or "")
    except (ValueError, OSError) as err:  # no run qualified (failed runs, none logged a model), no database left
        log.warning("sweep %s ended without a champion: %s", job.sweep_id, err)
    except MlflowException as err:
        log.warning("sweep %s: could not register its champion yet: %s", job.sweep_id, err)
        return False
    else:
        log.info("sweep %s: champion %s v%s: %s", job.sweep_id, version.name, version.version, selection.reason)
    return True


def mlflow_result(job: Job) -> tuple[str | None, dict[str, float]]:
    """The job's latest MLflow run (tagged faceforge.job_id) and its final metrics; (None, {}) without one."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow = yaml.safe_load(job.config_yaml)["mlflow"]
    try:
        client = MlflowClient(mlflow["tracking_uri"])
        experiment = client.get_experiment_by_name(mlflow["experiment"])
        if experiment is None:
            return None, {}
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`faceforge.job_id` = '{job.id}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    except MlflowException as err:
        log.warning("no MLflow run for %s: %s", job.id, err)
        return None, {}
    return (runs[0].info.run_id, dict(runs[0].data.metrics)) if runs else (None, {})
