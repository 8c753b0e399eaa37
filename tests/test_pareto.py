"""Latency-aware search: a sweep's Pareto front, its plot in MLflow and on the web, NSGA-II through the queue."""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path

import cv2
import pytest
import yaml
from hydra.utils import instantiate
from hydra_plugins.faceforge_queue.config import QueueLauncherConf
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from faceforge import models
from faceforge.jobs import SUCCEEDED, JobStore, make_jobs
from faceforge.registry import (
    Candidate,
    Policy,
    champion,
    log_front,
    pareto_front,
    plot_front,
    prepare_tracking,
    save_policy,
    select_and_register,
    sweep_candidates,
)
from faceforge.registry.pareto import PARETO_TAG
from faceforge.registry.selection import JOB_TAG, SWEEP_TAG
from faceforge.train.tracking import RunTracker

from test_launcher import WAIT, sweep_id_of, tiny, train_multirun
from test_web import BEARER, Server

SWEEP = "sweep-pareto"
TINY = {"embedding_dim": 32, "width": 0.25, "input_size": 56}
ACC, LAT = "eval.accuracy", "model.latency_ms"


def candidate(name: str, metrics: dict[str, float], status: str = "FINISHED") -> Candidate:
    return Candidate(name, name, None, None, status, 0, metrics, None)


def labels(points: list) -> list[str]:
    return [point.candidate.label for point in points]


def test_front_dominance_ties_and_missing_metrics() -> None:
    runs = [
        candidate("slow-best", {ACC: 0.95, LAT: 20.0}),
        candidate("fast", {ACC: 0.90, LAT: 5.0}),
        candidate("fast-twin", {ACC: 0.90, LAT: 5.0}),  # a tie: both stay on the front
        candidate("slower-same", {ACC: 0.90, LAT: 7.0}),  # dominated on latency alone
        candidate("worse", {ACC: 0.85, LAT: 10.0}),
        candidate("fastest-worst", {ACC: 0.60, LAT: 1.0}),
        candidate("no-latency", {ACC: 0.99}),
        candidate("no-eval", {LAT: 0.5}),
        candidate("nan", {ACC: math.nan, LAT: 0.5}),
        candidate("crashed", {ACC: 1.0, LAT: 0.1}, status="FAILED"),
    ]
    front = pareto_front(runs, "accuracy", sweep_id=SWEEP)
    assert front.metric == "accuracy" and front.cost == "model.latency_ms"
    assert labels(front.front) == ["fastest-worst", "fast", "fast-twin", "slow-best"]
    assert labels(front.points) == ["fastest-worst", "fast", "fast-twin", "slower-same", "worse", "slow-best"]
    assert front.skipped == {
        "no-latency": "no model.latency_ms logged",
        "no-eval": "no accuracy logged",
        "nan": "no accuracy logged",
        "crashed": "run failed",
    }
    assert "fast accuracy=0.9000 model.latency_ms=5" in front.describe()
    retried = [candidate("x", {ACC: 0.9, LAT: 1.0}, status="FAILED"), candidate("x", {ACC: 0.9, LAT: math.nan})]
    assert list(pareto_front(retried, "accuracy").skipped.values()) == ["run failed", "no model.latency_ms logged"]

    # An error rate is minimised: the lowest EER wins at each cost.
    errors = [
        candidate("a", {"eval.eer": 0.10, LAT: 5.0}),
        candidate("b", {"eval.eer": 0.20, LAT: 3.0}),
        candidate("c", {"eval.eer": 0.30, LAT: 4.0}),
    ]
    assert labels(pareto_front(errors, "eer").front) == labels(pareto_front(errors, "eval.eer").front) == ["b", "a"]
    assert pareto_front(errors, "eval.eer").lower_is_better
    # Params as the cost; the metric (a FAR no run could measure) falls back to accuracy as selection does.
    by_size = pareto_front(
        [candidate("s", {ACC: 0.8, "model.params": 1e5}), candidate("l", {ACC: 0.7, "model.params": 1e6})],
        "tar_far_1e-04",
        "model.params",
    )
    assert by_size.metric == "accuracy" and labels(by_size.front) == ["s"]
    # Once one run measured it, the front is over that metric and the others are left out, not mixed in.
    mixed = pareto_front([candidate("m", {"eval.tar_far_1e-04": 0.5, LAT: 2.0}), *runs[:2]], "tar_far_1e-04")
    assert labels(mixed.front) == ["m"] and mixed.skipped["fast"] == "no tar_far_1e-04 logged"


def add_run(
    uri: str, experiment_id: str, name: str, metrics: dict[str, float], job_id: str, logged: bool, sweep_id: str = SWEEP
) -> str:
    """A finished run as the trainer leaves it, with a logged backbone when it may become champion."""
    client = MlflowClient(uri)
    tags = {SWEEP_TAG: sweep_id, JOB_TAG: job_id}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.log_param(run_id, "model.name", "mobilefacenet")
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    if logged:
        RunTracker(uri, run_id).model(models.create("mobilefacenet", **TINY), TINY["input_size"], step=1)
    client.set_terminated(run_id, "FINISHED")
    return run_id


RUNS = {  # name -> (accuracy, latency): `quick` and `accurate` are the front, `accurate` the champion
    "quick": (0.70, 2.0),
    "middling": (0.65, 3.0),
    "accurate": (0.80, 6.0),
    "laggard": (0.60, 9.0),
}


@pytest.fixture(scope="module")
def sweep_home(tmp_path_factory: pytest.TempPathFactory, tiny_train_root: Path) -> Path:
    """A FACEFORGE_HOME with a four-point sweep in the job store and its runs in MLflow, champion registered."""
    home = tmp_path_factory.mktemp("home")
    uri = f"sqlite:///{home}/mlflow.db"
    experiment_id = prepare_tracking(uri)
    jobs = make_jobs(["optim.lr=0.01,0.02,0.03,0.04", *tiny(home, tiny_train_root)], sweep_id=SWEEP)
    JobStore(home / "jobs.db").submit(jobs)
    for job, (name, (accuracy, latency)) in zip(jobs, RUNS.items(), strict=True):
        add_run(uri, experiment_id, name, {ACC: accuracy, LAT: latency}, job.id, logged=name == "accurate")
    select_and_register(uri, SWEEP)
    return home


def test_plot_is_written_and_logged_to_a_sweep_level_run(sweep_home: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{sweep_home}/mlflow.db"
    candidates = sweep_candidates(uri, SWEEP)
    front = pareto_front(candidates, "accuracy", sweep_id=SWEEP)
    assert labels(front.front) == ["quick (mobilefacenet)", "accurate (mobilefacenet)"]
    champion = next(c for c in candidates if c.run_name == "accurate")

    image = cv2.imread(str(plot_front(front, tmp_path / "front.png", champion.run_id)))
    assert image is not None and image.shape == (440, 640, 3) and image.std() > 10  # drawn, not blank

    run_id = log_front(uri, front, champion.run_id)
    client = MlflowClient(uri)
    assert {artifact.path for artifact in client.list_artifacts(run_id)} == {"pareto.png", "pareto.json"}
    table = json.loads(Path(client.download_artifacts(run_id, "pareto.json", str(tmp_path))).read_text())
    on_front = {row["label"].split()[0]: row["on_front"] for row in table["runs"]}
    assert on_front == {"quick": True, "middling": False, "accurate": True, "laggard": False}
    assert [row["label"].split()[0] for row in table["runs"] if row["champion"]] == ["accurate"]
    run = client.get_run(run_id)
    assert run.data.tags[PARETO_TAG] == SWEEP and run.info.status == "FINISHED"
    # Logging again refreshes the same run, which never competes in the sweep's selection.
    assert log_front(uri, front, champion.run_id) == run_id
    assert {c.run_id for c in sweep_candidates(uri, SWEEP)} == {c.run_id for c in candidates}
    with pytest.raises(ValueError, match=r"no finished run has both accuracy and model\.params"):
        log_front(uri, pareto_front(candidates, "accuracy", "model.params", SWEEP))


def test_web_pages_show_the_front_with_the_champion(sweep_home: Path, tiny_train_root: Path) -> None:
    server = Server(sweep_home, [tiny_train_root])
    try:
        for path in ("/models", f"/sweeps/{SWEEP}"):
            page = server.get(path)
            assert page.status_code == 200, page.text
            (chart,) = re.findall(r'<svg class="chart pareto".*?</svg>', page.text, re.S)
            assert "2 of 4 run(s) on the front" in chart
            front_dots = re.findall(r'<circle class="run front"[^>]*><title>([^<]*)</title>', chart)
            assert [tip.split(":")[0] for tip in front_dots] == ["quick (mobilefacenet)", "accurate (mobilefacenet)"]
            assert len(re.findall(r'<circle class="run"', chart)) == 2  # middling and laggard
            (ring,) = re.findall(r'<circle class="champion"[^>]*><title>([^<]*)</title>', chart)
            assert ring.startswith("champion: accurate (mobilefacenet): accuracy 0.8000, model.latency_ms 6")
        assert f'<a href="/sweeps/{SWEEP}">' in server.get("/models").text
    finally:
        server.stop()


def test_the_register_button_keeps_the_sweeps_limits_and_model_name(sweep_home: Path, tiny_train_root: Path) -> None:
    """A sweep where no run met the launch budget has no champion; the page's button must not register one over it."""
    uri, budget = f"sqlite:///{sweep_home}/mlflow.db", "sweep-budget"
    experiment_id = prepare_tracking(uri)
    save_policy(uri, experiment_id, budget, Policy(metric="accuracy", max_latency_ms=3.0), "edge")
    store = JobStore(sweep_home / "jobs.db")
    jobs = make_jobs(["optim.lr=0.01,0.02", *tiny(sweep_home, tiny_train_root)], sweep_id=budget)
    store.submit(jobs)
    for job, (name, accuracy, latency) in zip(jobs, [("fast", 0.7, 2.0), ("slow", 0.9, 40.0)], strict=True):
        add_run(uri, experiment_id, name, {ACC: accuracy, LAT: latency}, job.id, logged=True, sweep_id=budget)
    while (claimed := store.claim("local", "test", 100, 60)) is not None:  # the earlier sweep's points end too
        store.finish(claimed.id, "test", SUCCEEDED, 0)
    server = Server(sweep_home, [tiny_train_root])
    try:
        page = server.get(f"/sweeps/{budget}").text
        assert "latency &lt;= 3 ms" in page and "excluded slow (mobilefacenet): latency 40.00 ms &gt; 3 ms" in page
        assert "best <code>accuracy</code>" in server.get(f"/sweeps/{budget}", params={"metric": ""}).text
        assert server.post(f"/sweeps/{budget}/register", data={"metric": "accuracy"}, headers=BEARER).status_code == 303
        assert champion(uri, "edge").run_id == sweep_candidates(uri, budget)[0].run_id  # `fast`, within budget
        assert "Register as champion" not in server.get(f"/sweeps/{budget}").text  # registered, under its own name
    finally:
        server.stop()


def test_launcher_rejects_objectives_that_cannot_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Caught before anything is queued: Optuna would only fail the trials after they had trained."""
    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path))
    cases = [  # objectives, wait, the sweeper's directions, poll seconds, the error
        (None, True, ["maximize", "minimize"], 2, "set hydra.launcher.objectives to as many metrics"),
        (["accuracy"], True, ["maximize", "minimize"], 2, "1 metric(s) but hydra.sweeper.direction has 2"),
        (["accuracy", "model.latency_ms"], False, None, 2, "objectives needs hydra.launcher.wait=true"),
        ([], True, None, 2, "hydra.launcher.objectives is empty"),
        (None, True, None, 0, "hydra.launcher.poll_seconds must be positive, got 0"),
    ]
    for objectives, wait, directions, poll, message in cases:
        settings = QueueLauncherConf(wait=wait, objectives=objectives, poll_seconds=poll)
        launcher = instantiate(OmegaConf.structured(settings))
        hydra = {"sweep": {"dir": str(tmp_path / "sweep")}, "sweeper": {"direction": directions}}
        launcher.setup(hydra_context=None, task_function=lambda _: None, config=OmegaConf.create({"hydra": hydra}))
        with pytest.raises(SystemExit) as stopped:
            launcher.launch([["optim.lr=0.1"]], initial_job_idx=0)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert JobStore(tmp_path / "jobs.db").list() == []


@pytest.mark.slow
def test_nsga2_searches_accuracy_against_latency_through_the_queue(
    queue_home: Path, tiny_train_root: Path, tiny_pairs: Path
) -> None:
    optuna = [
        "hydra/sweeper=optuna", "hydra/sweeper/sampler=nsgaii", "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.direction=[maximize,minimize]",
        "hydra.launcher.objectives=[accuracy,model.latency_ms]",
        "model=mobilefacenet,shufflefacenet", "model.input_size=choice(56,64)",
    ]  # fmt: skip
    fixed = [o for o in tiny(queue_home, tiny_train_root, tiny_pairs, width=0.5) if not o.startswith("model.input")]
    fixed.append("optim.lr=0.01")  # at the default 0.1 a 0.5-wide ShuffleFaceNet collapses to zero features in 3 steps
    result = train_multirun(queue_home, *WAIT, *optuna, *fixed)
    assert result.returncode == 0, result.stdout + result.stderr
    sweep_id = sweep_id_of(result)
    jobs = JobStore(queue_home / "jobs.db").list(sweep_id=sweep_id)
    assert len(jobs) == 2 and all(job.state == SUCCEEDED for job in jobs), [(j.state, j.error) for j in jobs]

    uri = f"sqlite:///{queue_home}/mlflow.db"
    runs = sweep_candidates(uri, sweep_id)
    measured = {(run.metric("accuracy"), run.metric("model.latency_ms")) for run in runs}
    assert len(measured) == 2 and all(latency > 0 for _, latency in measured)
    # Optuna's Pareto solutions are exactly the runs our front keeps, with both objectives as returned.
    (results_file,) = queue_home.glob("sweeps/*/optimization_results.yaml")
    solutions = yaml.safe_load(results_file.read_text())["solutions"]
    front = pareto_front(runs, "accuracy", sweep_id=sweep_id)
    assert sorted(tuple(s["values"]) for s in solutions) == sorted((p.value, p.cost) for p in front.front)
    assert {s["params"]["model"] for s in solutions} <= {"mobilefacenet", "shufflefacenet"}

    client = MlflowClient(uri)
    experiment_id = client.get_run(runs[0].run_id).info.experiment_id
    (pareto_run,) = client.search_runs([experiment_id], filter_string=f"tags.`{PARETO_TAG}` = '{sweep_id}'")
    assert {a.path for a in client.list_artifacts(pareto_run.info.run_id)} == {"pareto.png", "pareto.json"}
    assert "Pareto front of 2 run(s) over accuracy and model.latency_ms" in result.stdout


def test_a_finished_sweep_page_marks_the_registered_run_and_stops_polling(
    sweep_home: Path, tiny_train_root: Path
) -> None:
    """Last in this file: it finishes the sweep's jobs and logs an EER that another run leads."""
    uri, store = f"sqlite:///{sweep_home}/mlflow.db", JobStore(sweep_home / "jobs.db")
    client = MlflowClient(uri)
    by_name = {c.run_name: c for c in sweep_candidates(uri, SWEEP)}
    for name, eer in (("quick", 0.1), ("middling", 0.2), ("accurate", 0.3), ("laggard", 0.4)):
        client.log_metric(by_name[name].run_id, "eval.eer", eer)
    (alone,) = make_jobs(tiny(sweep_home, tiny_train_root), sweep_id="sweep-never-registered")
    store.submit([alone])
    while (job := store.claim("local", "test", 100, 60)) is not None:
        store.finish(job.id, "test", SUCCEEDED, 0)
    server = Server(sweep_home, [tiny_train_root])
    try:
        page = server.get(f"/sweeps/{SWEEP}", params={"metric": "eval.eer"}).text  # `quick` leads by EER
        (marked,) = re.findall(r'<tr class="champion">\s*<td><a href="/jobs/([\w-]+)"', page)
        assert marked == by_name["accurate"].job_id  # the registered champion, as the chart's ring says
        assert "Selection: lowest <code>eval.eer</code>" in page and 'hx-trigger="every 2s"' not in page
        unregistered = server.get("/sweeps/sweep-never-registered").text
        assert 'hx-trigger="every 2s"' in unregistered  # just ended: the scheduler may still register one
        with sqlite3.connect(sweep_home / "jobs.db") as db:
            db.execute("UPDATE jobs SET finished_at = finished_at - 3600 WHERE id = ?", (alone.id,))
        assert 'hx-trigger="every 2s"' not in server.get("/sweeps/sweep-never-registered").text
    finally:
        server.stop()
