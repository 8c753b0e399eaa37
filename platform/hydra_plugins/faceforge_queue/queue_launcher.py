"""`hydra/launcher=faceforge_queue`: a Hydra sweep is enqueued as jobs under one sweep id, not run in-process.

By default `launch` returns as soon as the jobs are queued. With `hydra.launcher.wait=true` it blocks until
every job is terminal, returns each job's metric (so the Optuna sweeper can search through the queue), then
selects and registers the sweep's champion. Either way a scheduler (`faceforge scheduler`) runs the jobs; this
process never does. faceforge is imported inside `launch` because Hydra imports every plugin at start-up.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

if TYPE_CHECKING:
    from faceforge.jobs import Job, JobStore
    from faceforge.registry import Policy


class QueueLauncher(Launcher):
    def __init__(
        self,
        priority: int,
        executor: str,
        slots: int | None,
        wait: bool,
        poll_seconds: float,
        metric: str | None,
        max_latency_ms: float | None,
        max_params: int | None,
        registered_model: str,
    ) -> None:
        self.priority, self.executor, self.slots = priority, executor, slots
        self.wait, self.poll_seconds = wait, poll_seconds
        self.metric, self.max_latency_ms, self.max_params = metric, max_latency_ms, max_params
        self.registered_model = registered_model
        self.sweep_id: str | None = None  # one id for every batch a sweeper launches

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """The task function runs in the queued jobs, not here; only the sweep directory is ours to make."""
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from faceforge.jobs import JobStore, store_path
        from faceforge.registry import Policy, prepare_tracking, save_policy

        self.sweep_dir.mkdir(parents=True, exist_ok=True)  # sweepers write their results there (Optuna's)
        store = JobStore(store_path())
        try:  # a user's mistake is one line, and nothing of the batch is enqueued
            policy = Policy(self.metric or Policy.metric, self.max_latency_ms, self.max_params)
            jobs, tracking_uri, experiment = self._make_jobs(job_overrides, initial_job_idx)
            experiment_id = prepare_tracking(tracking_uri, experiment)
            save_policy(tracking_uri, experiment_id, self.sweep_id, policy)  # the scheduler selects with it too
            store.submit(jobs)
        except ValueError as err:
            print(f"faceforge train: error: {err}", file=sys.stderr)
            sys.exit(2)
        print(f"sweep {self.sweep_id}: {len(jobs)} job(s) queued in {store.path}", flush=True)
        for job in jobs:
            print(f"  {job.id}  {job.name}  {' '.join(job.overrides)}", flush=True)
        if not self.wait:
            print(
                "a scheduler runs them (`faceforge scheduler`); when they are done, "
                f"`faceforge registry select {self.sweep_id}` registers the champion",
                flush=True,
            )
            return [_job_return(job, JobStatus.COMPLETED, job.id) for job in jobs]
        finished = self._wait(store, jobs)
        return self._results(finished, tracking_uri, policy)

    def _make_jobs(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[list[Job], str, str]:
        """One job per point under this launcher's sweep id, and the MLflow database and experiment they share."""
        import yaml

        from faceforge.jobs import make_jobs
        from faceforge.jobs.store import new_id
        from faceforge.train.config import ConfigError

        self.sweep_id = self.sweep_id or new_id("sweep")
        jobs = []
        for index, point in enumerate(job_overrides, start=initial_job_idx):
            (job,) = make_jobs(
                list(point), priority=self.priority, slots=self.slots, executor=self.executor, sweep_id=self.sweep_id
            )
            job.name = f"{job.name}-{index}"
            jobs.append(job)
        mlflow_configs = [yaml.safe_load(job.config_yaml)["mlflow"] for job in jobs]
        targets = {(config["tracking_uri"], config["experiment"]) for config in mlflow_configs}
        if len(targets) > 1:
            raise ConfigError("a sweep logs to one MLflow database and experiment; do not sweep mlflow.*")
        ((tracking_uri, experiment),) = targets
        return jobs, tracking_uri, experiment

    def _wait(self, store: JobStore, jobs: list[Job]) -> list[Job]:
        print("waiting for them to finish; a scheduler must be running (`faceforge scheduler`)", flush=True)
        last_summary = ""
        while True:
            current = [store.get(job.id) for job in jobs]
            counts = sorted(Counter(job.state for job in current).items())
            summary = ", ".join(f"{count} {state}" for state, count in counts)
            if summary != last_summary:
                print(f"sweep {self.sweep_id}: {summary}", flush=True)
                last_summary = summary
            if all(job.terminal for job in current):
                return current
            time.sleep(self.poll_seconds)

    def _results(self, jobs: list[Job], tracking_uri: str, policy: Policy) -> list[JobReturn]:
        """Each job's metric from its MLflow run, then the champion of the sweep so far."""
        from faceforge.jobs import SUCCEEDED
        from faceforge.registry import register, select, sweep_candidates

        assert self.sweep_id is not None
        candidates = sweep_candidates(tracking_uri, self.sweep_id)
        runs = {candidate.job_id: candidate for candidate in candidates}  # oldest first: a rerun's latest run wins
        returns = []
        for job in jobs:
            if job.state == SUCCEEDED:
                run = runs.get(job.id)
                returns.append(_job_return(job, JobStatus.COMPLETED, run.value_for(policy.metric) if run else None))
            else:
                why = job.error or f"exit code {job.exit_code}, log {job.log_path}"
                failure = RuntimeError(f"job {job.id} {job.state}: {why}")
                returns.append(_job_return(job, JobStatus.FAILED, failure))
        selection = select(candidates, policy, self.sweep_id)
        if selection.winner is None:
            print(f"sweep {self.sweep_id}: no champion: {selection.reason}", flush=True)
        else:
            version = register(tracking_uri, selection, self.registered_model)
            print(f"sweep {self.sweep_id}: champion {version.name} v{version.version}: {selection.reason}", flush=True)
        return returns


def _job_return(job: Job, status: JobStatus, value: object) -> JobReturn:
    return JobReturn(overrides=list(job.overrides), task_name=job.name, status=status, _return_value=value)
