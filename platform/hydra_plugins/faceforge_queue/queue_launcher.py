"""`hydra/launcher=faceforge_queue`: a Hydra sweep is enqueued as jobs under one sweep id, not run in-process.

By default `launch` returns as soon as the jobs are queued. With `hydra.launcher.wait=true` it blocks until
every job is terminal, returns each job's metric (so the Optuna sweeper can search through the queue), then
selects and registers the sweep's champion. With `hydra.launcher.objectives` each job returns several metrics
for a multi-objective study, and the sweep's Pareto front (quality against cost) is logged to MLflow.
Either way a scheduler (`faceforge scheduler`) runs the jobs; this process never does. faceforge is
imported inside `launch` because Hydra imports every plugin at start-up.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

if TYPE_CHECKING:
    from faceforge.jobs import Job, JobStore
    from faceforge.registry import Candidate, Policy


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
        objectives: Sequence[str] | None,
    ) -> None:
        self.priority, self.executor, self.slots = priority, executor, slots
        self.wait, self.poll_seconds = wait, poll_seconds
        self.metric, self.max_latency_ms, self.max_params = metric, max_latency_ms, max_params
        self.registered_model = registered_model
        self.objectives = None if objectives is None else [str(name) for name in objectives]
        self.directions: list[str] | None = None  # the Optuna sweeper's, when it is the sweeper
        self.sweep_id: str | None = None  # one id for every batch a sweeper launches

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """The task function runs in the queued jobs, not here; only the sweep directory is ours to make, now:
        the sweeper writes into it next (multirun.yaml, Optuna's results), and would fail with a traceback."""
        self.sweep_dir = Path(config.hydra.sweep.dir)
        try:
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"faceforge train: error: hydra.sweep.dir {self.sweep_dir}: {err.strerror}", file=sys.stderr)
            sys.exit(2)
        self.basic_sweeper = OmegaConf.select(config, "hydra.sweeper._target_") == BASIC_SWEEPER
        direction = OmegaConf.select(config, "hydra.sweeper.direction")
        if direction is not None:
            listed = direction if OmegaConf.is_list(direction) else [direction]
            self.directions = [str(getattr(d, "name", d)) for d in listed]  # a Direction enum or its name

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from faceforge.jobs import JobStore, store_path
        from faceforge.registry import Policy, prepare_tracking, save_policy

        try:  # a user's mistake is one line, and nothing of the batch is enqueued
            store = JobStore(store_path())
            if not self.poll_seconds > 0:  # 0 would spin a core while the sweep waits
                raise ValueError(f"hydra.launcher.poll_seconds must be positive, got {self.poll_seconds}")
            self._check_objectives()
            policy = Policy(self.metric or Policy.metric, self.max_latency_ms, self.max_params)
            jobs, tracking_uri, experiment = self._make_jobs(job_overrides, initial_job_idx)
            experiment_id = prepare_tracking(tracking_uri, experiment)
            save_policy(tracking_uri, experiment_id, self.sweep_id, policy, self.registered_model)  # for the scheduler
            store.submit(jobs)
        except (ValueError, OSError) as err:  # OSError: unreadable paths, or the job database stayed locked
            print(f"faceforge train: error: {err}", file=sys.stderr)
            sys.exit(2)
        print(f"sweep {self.sweep_id}: {len(jobs)} job(s) queued in {store.path}", flush=True)
        for job in jobs:
            print(f"  {job.id}  {job.name}  {' '.join(job.overrides)}", flush=True)
        if not self.wait:
            print(
                "a scheduler runs them (`faceforge scheduler`) and registers the champion when the last one ends; "
                f"`faceforge registry select {self.sweep_id}` selects again with other settings",
                flush=True,
            )
            return [_job_return(job, JobStatus.COMPLETED, job.id) for job in jobs]
        finished = self._wait(store, jobs)
        returns = self._results(finished, tracking_uri, policy)
        failures = [r._return_value for r in returns if r.status == JobStatus.FAILED] if self.basic_sweeper else []
        if failures:  # the basic sweeper would raise the first as a traceback; an optimiser goes on past them
            for failure in failures:
                print(f"faceforge train: error: sweep {self.sweep_id}: {failure}", file=sys.stderr)
            sys.exit(1)
        return returns

    def _check_objectives(self) -> None:
        """Mismatches Optuna would only report after a batch had trained, caught before anything is queued."""
        objectives, directions = self.objectives, self.directions
        if objectives is None:
            if directions is not None and len(directions) > 1:
                raise ValueError(
                    f"hydra.sweeper.direction has {len(directions)} entries: set hydra.launcher.objectives to as "
                    "many metrics, e.g. [accuracy,model.latency_ms]"
                )
            return
        if not objectives:
            raise ValueError("hydra.launcher.objectives is empty: name the metrics each job returns")
        if not self.wait:
            raise ValueError("hydra.launcher.objectives needs hydra.launcher.wait=true: only a waiting sweep returns")
        if directions is not None and len(directions) != len(objectives):
            raise ValueError(
                f"hydra.launcher.objectives has {len(objectives)} metric(s) but hydra.sweeper.direction "
                f"has {len(directions)}"
            )

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
        """A stop (Ctrl-C, SIGTERM) ends only the waiting, in one line and no traceback: the jobs stay queued and
        a scheduler still runs them and registers the champion, so the user is told how to follow or cancel them."""

        stopped_by = signal.SIGINT

        def stop(signum: int, frame: object) -> None:
            nonlocal stopped_by
            stopped_by = signal.Signals(signum)
            raise KeyboardInterrupt

        print("waiting for them to finish; a scheduler must be running (`faceforge scheduler`)", flush=True)
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        current, last_summary = jobs, ""
        try:
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
        except KeyboardInterrupt:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        unfinished = sum(not job.terminal for job in current)
        print(
            f"faceforge train: stopped by {stopped_by.name} while waiting; sweep {self.sweep_id}'s {unfinished} "
            "unfinished job(s) stay in the queue, and a scheduler still runs them and registers the champion: "
            f"follow them with `faceforge queue list --sweep {self.sweep_id}`, "
            "cancel each with `faceforge queue cancel <job-id>`",
            file=sys.stderr,
        )
        sys.exit(128 + stopped_by)  # as a shell reports a process stopped by that signal

    def _results(self, jobs: list[Job], tracking_uri: str, policy: Policy) -> list[JobReturn]:
        """Each job's metric from its MLflow run, then the champion of the sweep so far."""
        from faceforge.jobs import SUCCEEDED
        from faceforge.registry import register, select, sweep_candidates

        assert self.sweep_id is not None
        candidates = sweep_candidates(tracking_uri, self.sweep_id)
        runs = {candidate.job_id: candidate for candidate in candidates}  # oldest first: a rerun's latest run wins
        returns = []
        for job in jobs:
            run = runs.get(job.id)
            if job.state != SUCCEEDED:
                why = job.error or f"exit code {job.exit_code}, log {job.log_path}"
                returns.append(_job_return(job, JobStatus.FAILED, RuntimeError(f"job {job.id} {job.state}: {why}")))
            elif self.objectives is None:
                returns.append(_job_return(job, JobStatus.COMPLETED, run.value_for(policy.metric) if run else None))
            else:
                values = [run.metric(name) if run else None for name in self.objectives]
                missing = [name for name, value in zip(self.objectives, values, strict=True) if value is None]
                if missing:
                    failure = RuntimeError(f"job {job.id}: its MLflow run logged no {', '.join(missing)}")
                    returns.append(_job_return(job, JobStatus.FAILED, failure))
                else:
                    returns.append(_job_return(job, JobStatus.COMPLETED, values))
        selection = select(candidates, policy, self.sweep_id)
        if selection.winner is None:
            print(f"sweep {self.sweep_id}: no champion: {selection.reason}", flush=True)
        else:
            version = register(tracking_uri, selection, self.registered_model)
            print(f"sweep {self.sweep_id}: champion {version.name} v{version.version}: {selection.reason}", flush=True)
        if self.objectives is not None and len(self.objectives) >= 2:
            self._log_front(tracking_uri, candidates, selection.winner)
        return returns

    def _log_front(self, tracking_uri: str, candidates: list[Candidate], winner: Candidate | None) -> None:
        """The front of the sweep so far over the first two objectives, when they are a quality and a cost."""
        from faceforge.registry import log_front, pareto_front
        from faceforge.registry.pareto import PLOT
        from faceforge.registry.selection import lower_is_better

        assert self.objectives is not None and self.sweep_id is not None
        metric, cost = self.objectives[:2]
        quality_and_cost = ["minimize" if lower_is_better(metric) else "maximize", "minimize"]
        if self.directions is not None and self.directions[:2] != quality_and_cost:
            print(
                f"sweep {self.sweep_id}: no Pareto plot: it needs direction {quality_and_cost} for {metric}, {cost}",
                flush=True,
            )
            return
        front = pareto_front(candidates, metric, cost, self.sweep_id)
        if not front.points:
            print(f"sweep {self.sweep_id}: no Pareto plot yet: no finished run logged {metric} and {cost}", flush=True)
            return
        run_id = log_front(tracking_uri, front, winner.run_id if winner else None)
        print(f"sweep {self.sweep_id}: {front.describe()}; {PLOT} in MLflow run {run_id}", flush=True)


def _job_return(job: Job, status: JobStatus, value: object) -> JobReturn:
    return JobReturn(overrides=list(job.overrides), task_name=job.name, status=status, _return_value=value)
