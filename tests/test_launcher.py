"""`hydra/launcher=faceforge_queue`: sweeps enqueue at once; waiting sweeps return metrics and crown a champion."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from faceforge.jobs import QUEUED, SUCCEEDED, JobStore
from faceforge.registry import champion, sweep_candidates, versions

from conftest import CLI, CLI_MAIN, REPO, SHARED, run_stopped_inside

QUEUE = ["hydra/launcher=faceforge_queue"]
WAIT = [*QUEUE, "hydra.launcher.wait=true", "hydra.launcher.poll_seconds=0.5"]


def tiny(home: Path, train_root: Path, pairs: Path | None = None, width: float = 0.25) -> list[str]:
    """Overrides of a job that trains for seconds, evaluating on a few LFW pairs when given."""
    evaluation = (
        ["eval=pairs", f"eval.pairs={pairs}", f"eval.root={SHARED / 'lfw'}", "eval.crop_fraction=0.5"]
        if pairs
        else ["eval=none"]
    )
    return [
        f"model.width={width}", "model.input_size=56", "model.embedding_dim=32", "trainer.steps=3", "trainer.nproc=1",
        "trainer.log_every=1", "schedule.warmup_steps=1", f"data.root={train_root}", "data.batch_size=8",
        "data.num_workers=0", "data.crop_fraction=0.8", f"mlflow.tracking_uri=sqlite:///{home}/mlflow.db",
        "mlflow.log_model=false", *evaluation,
    ]  # fmt: skip


def train_multirun(home: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "train", "-m", f"hydra.sweep.dir={home}/sweeps/{len(list(home.glob('sweeps/*')))}", *overrides],
        env={**os.environ, "FACEFORGE_HOME": str(home)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def sweep_id_of(result: subprocess.CompletedProcess) -> str:
    found = re.search(r"sweep (sweep-\w+): \d+ job\(s\) queued", result.stdout)
    assert found, result.stdout + result.stderr
    return found.group(1)


def test_sweep_enqueues_every_point_and_returns_at_once(tiny_train_root: Path, tmp_path: Path) -> None:
    points = ("model=mobilefacenet,shufflefacenet", *tiny(tmp_path, tiny_train_root, width=0.5))
    result = train_multirun(tmp_path, *QUEUE, *points)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = JobStore(tmp_path / "jobs.db").list()
    # No scheduler runs here, so the launcher returned without waiting for any job.
    assert len(jobs) == 2 and all(job.state == QUEUED for job in jobs)
    assert {job.sweep_id for job in jobs} == {sweep_id_of(result)}
    assert sorted(o for job in jobs for o in job.overrides if o.startswith("model=")) == [
        "model=mobilefacenet",
        "model=shufflefacenet",
    ]
    # The MLflow database and experiment exist before any job could start on them.
    assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("faceforge") is not None

    bad = train_multirun(tmp_path, *QUEUE, "optim.lr=0.1,-1", *tiny(tmp_path, tiny_train_root))
    assert bad.returncode == 2 and "optim.lr must be positive" in bad.stderr and "Traceback" not in bad.stderr
    assert len(JobStore(tmp_path / "jobs.db").list()) == 2  # nothing of the bad sweep was enqueued

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "jobs.db").write_bytes(b"not a database, " * 512)
    bad = train_multirun(broken, *QUEUE, *tiny(broken, tiny_train_root))
    assert bad.returncode == 2 and "jobs.db cannot be opened: file is not a database" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr

    (broken / "a_file").write_text("")
    command = [*CLI, "train", "-m", f"hydra.sweep.dir={broken}/a_file/sweep", *QUEUE, *tiny(broken, tiny_train_root)]
    bad = subprocess.run(command, env={**os.environ, "FACEFORGE_HOME": str(broken)}, cwd=REPO, capture_output=True)
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr, bad.stderr
    assert b"error: hydra.sweep.dir " in bad.stderr and b"a_file/sweep: Not a directory" in bad.stderr


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=lambda stop: stop.name)
def test_a_stop_while_a_sweep_waits_says_its_jobs_stay_queued(
    stop: signal.Signals, tiny_train_root: Path, tmp_path: Path
) -> None:
    """Ctrl-C ends only the waiting: the jobs still run, so the user is told how to follow or cancel them."""
    command = ["train", "-m", f"hydra.sweep.dir={tmp_path}/sweep", *WAIT, "optim.lr=0.1,0.05"]
    # No scheduler runs: the stop lands in the polling loop, once it has read a job's state.
    result = run_stopped_inside(
        "faceforge.jobs:JobStore.get",
        stop,
        CLI_MAIN,
        [*command, *tiny(tmp_path, tiny_train_root)],
        after=True,
        env={"FACEFORGE_HOME": str(tmp_path)},
    )
    assert result.returncode == 128 + stop and "Traceback" not in result.stderr, result.stdout + result.stderr
    sweep_id = sweep_id_of(result)
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"faceforge train: stopped by {stop.name} while waiting; sweep {sweep_id}'s 2 ")
    assert f"`faceforge queue list --sweep {sweep_id}`" in line and "`faceforge queue cancel <job-id>`" in line
    jobs = JobStore(tmp_path / "jobs.db").list(sweep_id=sweep_id)
    assert len(jobs) == 2 and all(job.state == QUEUED for job in jobs)


@pytest.mark.slow
def test_waiting_sweep_returns_metrics_and_registers_champion(
    queue_home: Path, tiny_train_root: Path, tiny_pairs: Path
) -> None:
    result = train_multirun(
        queue_home,
        *WAIT,
        "head=arcface,cosface",
        "optim.lr=0.05,0.02",
        *tiny(queue_home, tiny_train_root, tiny_pairs),
        "mlflow.log_model=true",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sweep_id = sweep_id_of(result)
    jobs = JobStore(queue_home / "jobs.db").list(sweep_id=sweep_id)
    assert len(jobs) == 4 and all(job.state == SUCCEEDED for job in jobs), [(j.state, j.error) for j in jobs]

    uri = f"sqlite:///{queue_home}/mlflow.db"
    runs = sweep_candidates(uri, sweep_id)
    assert {run.job_id for run in runs} == {job.id for job in jobs}
    best = champion(uri)
    assert best.sweep_id == sweep_id and best.run_id in {run.run_id for run in runs}
    assert best.value == pytest.approx(max(run.metric("accuracy") for run in runs))
    assert set(best.card) == {"params", "macs", "latency_ms"}
    # The scheduler registers the finished sweep too, with the launcher's saved policy: still one version.
    assert [v.version for v in versions(uri) if v.sweep_id == sweep_id] == [best.version]
    assert f"champion faceforge v{best.version}" in result.stdout


@pytest.mark.slow
def test_optuna_searches_through_the_queue(queue_home: Path, tiny_train_root: Path, tiny_pairs: Path) -> None:
    optuna = [
        "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0", "optim.lr=interval(0.01,0.1)",
    ]  # fmt: skip
    result = train_multirun(queue_home, *WAIT, *optuna, *tiny(queue_home, tiny_train_root, tiny_pairs))
    assert result.returncode == 0, result.stdout + result.stderr
    sweep_id = sweep_id_of(result)
    jobs = JobStore(queue_home / "jobs.db").list(sweep_id=sweep_id)
    assert len(jobs) == 2 and all(job.state == SUCCEEDED for job in jobs)
    lrs = [float(o.split("=")[1]) for job in jobs for o in job.overrides if o.startswith("optim.lr=")]
    assert len(lrs) == 2 and all(0.01 <= lr <= 0.1 for lr in lrs)

    (results_file,) = queue_home.glob("sweeps/*/optimization_results.yaml")
    results = yaml.safe_load(results_file.read_text())
    accuracies = [run.metric("accuracy") for run in sweep_candidates(f"sqlite:///{queue_home}/mlflow.db", sweep_id)]
    assert results["best_value"] == pytest.approx(max(accuracies))
    assert "no champion" in result.stdout and "no logged model to register" in result.stdout


@pytest.mark.slow
def test_a_failed_job_ends_a_waiting_basic_sweep_in_one_line(
    queue_home: Path, tiny_train_root: Path, tmp_path: Path
) -> None:
    """The basic sweeper raises a failed job's error as a traceback; the launcher names the job and its log."""
    damaged = tmp_path / "damaged"
    for person in ("a", "b"):
        (damaged / person).mkdir(parents=True)
        for i in range(2):
            (damaged / person / f"{i}.jpg").write_bytes(b"not a jpeg")
    result = train_multirun(queue_home, *WAIT, *tiny(queue_home, tiny_train_root), f"data.root={damaged}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    (job,) = JobStore(queue_home / "jobs.db").list(sweep_id=sweep_id_of(result))
    assert f"faceforge train: error: sweep {job.sweep_id}: job {job.id} failed" in result.stderr
    assert str(job.log_path) in result.stderr
