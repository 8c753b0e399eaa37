"""faceforge.registry: sweep selection with limits, champion registration, the CLI, and concurrent MLflow writers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from faceforge import models
from faceforge.models.card import count_params
from faceforge.registry import (
    CHAMPION_ALIAS,
    Policy,
    champion,
    prepare_tracking,
    register,
    save_policy,
    saved_policy,
    select,
    select_and_register,
    sweep_candidates,
    versions,
)
from faceforge.registry.champion import registered_version, registry_lock
from faceforge.registry.database import open_database
from faceforge.registry.selection import JOB_TAG, POLICY_TAG, REGISTERED_MODEL_TAG, SWEEP_TAG, Candidate
from faceforge.train.launch import launch
from faceforge.train.tracking import RunTracker

from conftest import REPO, tiny_config

SWEEP = "sweep-test1"
TINY = {"embedding_dim": 32, "width": 0.5, "input_size": 56}  # shufflefacenet is 0.5 wide at least


def faceforge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from faceforge.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def add_run(
    uri: str,
    experiment_id: str,
    name: str,
    backbone: str,
    metrics: dict[str, float],
    status: str = "FINISHED",
    with_model: bool = True,
    sweep_id: str = SWEEP,
) -> str:
    """A run as the trainer leaves it: tagged with its sweep and job, metrics, optionally a logged backbone."""
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name=name, tags={SWEEP_TAG: sweep_id, JOB_TAG: f"job-{name}"})
    run_id = run_id.info.run_id
    client.log_param(run_id, "model.name", backbone)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    if with_model:
        RunTracker(uri, run_id).model(models.create(backbone, **TINY), TINY["input_size"], step=1)
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """One database for the module (creating one takes seconds): five runs of one sweep and one of another.

    Only `fast` and `big` can win outright.
    """
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    experiment_id = prepare_tracking(uri, "tests")
    tied = {"eval.roc_auc": 0.8, "model.macs": 1e6}  # the same AUC, so accuracy breaks the tie
    fast = {"eval.accuracy": 0.90, "eval.tar_far_1e-03": 0.60, "eval.eer": 0.1, "model.latency_ms": 5.0}
    big = {"eval.accuracy": 0.95, "eval.tar_far_1e-03": 0.50, "eval.eer": 0.2, "model.latency_ms": 20.0}
    unlogged = {"eval.accuracy": 0.97, "model.latency_ms": 1.0, "model.params": 1e5}
    runs = {
        "fast": add_run(uri, experiment_id, "fast", "mobilefacenet", fast | tied | {"model.params": 1e6}),
        "big": add_run(uri, experiment_id, "big", "shufflefacenet", big | tied | {"model.params": 2e6}),
        "crashed": add_run(
            uri, experiment_id, "crashed", "mobilefacenet", {"eval.accuracy": 0.99}, status="FAILED", with_model=False
        ),
        "unlogged": add_run(uri, experiment_id, "unlogged", "mobilefacenet", unlogged, with_model=False),
        "no-eval": add_run(uri, experiment_id, "no-eval", "mobilefacenet", {"loss": 1.0}, with_model=False),
        "other": add_run(
            uri, experiment_id, "other", "mobilefacenet", {"eval.accuracy": 1.0}, with_model=False, sweep_id="sweep-x"
        ),
    }
    return uri, runs


def test_processes_that_prepare_a_fresh_database_together_all_get_it(tmp_path: Path) -> None:
    """MLflow migrates a fresh SQLite database on first use without a lock: exports or jobs started together on a
    new home broke each other's migrations ("table _alembic_tmp_experiments already exists")."""
    uri, start = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "start"
    prepare = (
        "import sys, time\nfrom pathlib import Path\nfrom faceforge.registry import prepare_tracking\n"
        "while not Path(sys.argv[2]).exists(): time.sleep(0.01)\n"
        "print(prepare_tracking(sys.argv[1], 'exports'))\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", prepare, uri, str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    time.sleep(3)  # every process imported MLflow and waits at the line
    start.touch()
    answers = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err.decode()[-2000:] for _, err in answers]
    assert len({out for out, _ in answers}) == 1  # one experiment


def test_selection_with_and_without_limits(sweep: tuple[str, dict[str, str]]) -> None:
    uri, runs = sweep
    candidates = sweep_candidates(uri, SWEEP)
    assert {c.run_id for c in candidates} == {runs[k] for k in ("fast", "big", "crashed", "unlogged", "no-eval")}
    assert {c.job_id for c in candidates} == {"job-fast", "job-big", "job-crashed", "job-unlogged", "job-no-eval"}

    best = select(candidates, Policy(), SWEEP)
    assert best.winner is not None and best.winner.run_id == runs["big"] and best.value == pytest.approx(0.95)
    assert "big (shufflefacenet)" in best.reason and "runner-up fast (mobilefacenet) 0.9000" in best.reason
    assert best.excluded == {
        "crashed (mobilefacenet)": "run failed",
        "unlogged (mobilefacenet)": "no logged model to register",
        "no-eval (mobilefacenet)": "no tar_far_1e-04 or accuracy logged",
    }

    fast = select(candidates, Policy(max_latency_ms=10), SWEEP)
    assert fast.winner is not None and fast.winner.run_id == runs["fast"]
    assert fast.excluded["big (shufflefacenet)"] == "latency 20.00 ms > 10 ms"
    assert "latency <= 10 ms" in fast.reason
    small = select(candidates, Policy(max_params=1_500_000), SWEEP)
    assert small.winner is not None and small.winner.run_id == runs["fast"]
    assert small.excluded["big (shufflefacenet)"] == "params 2,000,000 > 1,500,000"
    by_tar = select(candidates, Policy(metric="tar_far_1e-03"), SWEEP)
    assert by_tar.winner is not None and by_tar.winner.run_id == runs["fast"]
    tie = select(candidates, Policy(metric="roc_auc"), SWEEP)
    assert tie.winner is not None and tie.winner.run_id == runs["big"] and "tie broken by accuracy" in tie.reason
    by_eer = select(candidates, Policy(metric="eer"), SWEEP)  # an error rate: the lowest wins
    assert by_eer.winner is not None and by_eer.winner.run_id == runs["fast"] and "lowest eer" in by_eer.reason

    nothing = select(candidates, Policy(max_latency_ms=10, max_params=10), SWEEP)
    assert nothing.winner is None and nothing.reason.startswith("no run qualifies")
    with pytest.raises(ValueError, match="no run qualifies"):
        select_and_register(uri, SWEEP, Policy(max_params=10))
    with pytest.raises(ValueError, match="max_latency_ms must be positive"):
        Policy(max_latency_ms=0)
    with pytest.raises(ValueError, match="bad sweep id"):
        sweep_candidates(uri, "x' OR '1'='1")


def test_the_default_metric_falls_back_to_accuracy_only_where_it_cannot_be_measured() -> None:
    def run(name: str, metrics: dict[str, float]) -> Candidate:
        scores = {f"eval.{key}": value for key, value in metrics.items()}
        return Candidate(name, name, None, "mobilefacenet", "FINISHED", len(name), scores, f"m-{name}")

    # LFW's 3,000 impostor pairs cannot measure a FAR of 1e-4: accuracy decides.
    few_pairs = select([run("a", {"accuracy": 0.9}), run("bb", {"accuracy": 0.95})], Policy(), "s")
    assert few_pairs.winner is not None and few_pairs.winner.run_name == "bb" and few_pairs.value == 0.95
    assert few_pairs.ranked_by == "accuracy" and "logged tar_far_1e-04 (too few pairs for that FAR)" in few_pairs.reason
    measured = [
        run("a", {"accuracy": 0.9, "tar_far_1e-04": 0.5}),
        run("bb", {"accuracy": 0.95, "tar_far_1e-04": 0.4}),
        run("ccc", {"accuracy": 1.0}),
    ]
    by_tar = select(measured, Policy(), "s")
    assert by_tar.winner is not None and by_tar.winner.run_name == "a" and by_tar.ranked_by == "tar_far_1e-04"
    assert by_tar.value == 0.5 and "runner-up bb (mobilefacenet) 0.4000" in by_tar.reason


def test_selection_is_not_fooled_by_nan_values_full_metric_keys_or_shared_names() -> None:
    def run(name: str, metrics: dict[str, float], start: int = 0, label: str | None = None) -> Candidate:
        return Candidate(name, label or name, None, "mobilefacenet", "FINISHED", start, metrics, f"m-{name}")

    good = {"eval.accuracy": 0.9, "eval.eer": 0.05, "model.latency_ms": 4.0, "model.params": 1e6}
    nan_latency = run("nan-latency", good | {"eval.accuracy": 0.99, "model.latency_ms": math.nan})
    nan_params = run("nan-params", good | {"eval.accuracy": 0.99, "model.params": math.nan})
    limited = select([nan_latency, nan_params, run("good", good)], Policy(max_latency_ms=5, max_params=2e6), "s")
    assert limited.winner is not None and limited.winner.run_name == "good"
    assert limited.excluded == {
        "nan-latency (mobilefacenet)": "latency nan",
        "nan-params (mobilefacenet)": "params nan",
    }

    by_key = select([run("worse", good | {"eval.eer": 0.3}), run("good", good)], Policy(metric="eval.eer"), "s")
    assert by_key.winner is not None and by_key.winner.run_name == "good" and "lowest eval.eer" in by_key.reason

    tied = [run("nan-accuracy", good | {"eval.accuracy": math.nan}, start=1), run("good", good, start=2)]
    by_eer = select(tied, Policy(metric="eer"), "s")  # equal EER: accuracy breaks the tie, and NaN is no accuracy
    assert by_eer.winner is not None and by_eer.winner.run_name == "good"
    nan_eer = select([run("nan-eer", good | {"eval.eer": math.nan}), run("good", good)], Policy(metric="eer"), "s")
    assert nan_eer.excluded == {"nan-eer (mobilefacenet)": "eer is nan"}

    # Only a FAR the pairs cannot reach falls back to accuracy: a metric no run logged (misspelt) chooses nothing.
    for metric in ("eer", "acuracy"):
        unlogged = select([run("a", {"eval.accuracy": 0.8}), run("b", {"eval.accuracy": 0.9})], Policy(metric), "s")
        assert unlogged.winner is None and unlogged.excluded["b (mobilefacenet)"] == f"no {metric} logged"

    costs = [run("slow", good | {"model.latency_ms": 9.0, "model.macs": 2e8}), run("quick", good | {"model.macs": 1e8})]
    for cost in ("model.latency_ms", "model.macs"):  # costs are minimised, as error rates are
        cheapest = select(costs, Policy(metric=cost), "s")
        assert (
            cheapest.winner is not None and cheapest.winner.run_name == "quick" and f"lowest {cost}" in cheapest.reason
        )

    failed = [replace(run(f"id{i}", good, label="retry"), status="FAILED") for i in range(3)]
    shared = select([*failed, run("good", good)], Policy(), "s")
    assert list(shared.excluded) == [
        "retry (mobilefacenet)",
        "retry (mobilefacenet) [id1]",
        "retry (mobilefacenet) [id2]",
    ]


def test_a_run_that_logged_its_model_again_offers_the_latest(sweep: tuple[str, dict[str, str]]) -> None:
    """A resumed run logs its model at its last step; one killed after logging logs it again at the same step."""
    uri, _ = sweep
    client = MlflowClient(uri)
    run_id = client.create_run(prepare_tracking(uri, "tests"), tags={SWEEP_TAG: "sweep-resumed"}).info.run_id
    backbone = models.create("mobilefacenet", **TINY)
    for step in (3, 1, 3):
        RunTracker(uri, run_id).model(backbone, TINY["input_size"], step=step)
    experiment = client.get_run(run_id).info.experiment_id
    mine = [m for m in client.search_logged_models([experiment]) if m.source_run_id == run_id]
    logged = sorted(mine, key=lambda m: m.creation_timestamp)
    assert len(logged) == 3
    (candidate,) = sweep_candidates(uri, "sweep-resumed")
    assert candidate.model_id == logged[-1].model_id
    client.delete_logged_model(logged[-1].model_id)  # a copy the user cleaned up: the one before it remains
    assert sweep_candidates(uri, "sweep-resumed")[0].model_id == logged[0].model_id


def test_a_run_whose_model_was_deleted_gives_way_to_the_runner_up(sweep: tuple[str, dict[str, str]]) -> None:
    """Its only logged model deleted, the best run won anyway and registration failed with a traceback, leaving
    the sweep without a champion although another run qualified."""
    uri, _ = sweep
    experiment_id = prepare_tracking(uri, "tests")
    best = add_run(uri, experiment_id, "best", "mobilefacenet", {"eval.accuracy": 0.95}, sweep_id="sweep-deleted")
    ok = add_run(uri, experiment_id, "ok", "mobilefacenet", {"eval.accuracy": 0.9}, sweep_id="sweep-deleted")
    client = MlflowClient(uri)
    client.delete_logged_model(client.get_run(best).outputs.model_outputs[0].model_id)
    selection, version = select_and_register(uri, "sweep-deleted", name="deleted")
    assert selection.excluded == {"best (mobilefacenet)": "no logged model to register"}
    assert version.run_id == ok and CHAMPION_ALIAS in version.aliases

    # Deleted between selection and registration: one line for the CLI, the scheduler and the web app.
    stale = select(sweep_candidates(uri, "sweep-deleted"), Policy(), "sweep-deleted")
    client.delete_logged_model(client.get_run(ok).outputs.model_outputs[0].model_id)
    with pytest.raises(ValueError, match=r"sweep sweep-deleted: could not register ok \(mobilefacenet\): .*not found"):
        register(uri, stale, "deleted-later")


def test_a_run_whose_model_files_are_missing_gives_way_to_the_runner_up(
    sweep: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """With its model's files cleaned from disk, the best run became a champion that nothing could load."""
    uri, _ = sweep
    experiment_id = prepare_tracking(uri, "tests")
    best = add_run(uri, experiment_id, "best", "mobilefacenet", {"eval.accuracy": 0.95}, sweep_id="sweep-lost")
    ok = add_run(uri, experiment_id, "ok", "mobilefacenet", {"eval.accuracy": 0.9}, sweep_id="sweep-lost")
    client = MlflowClient(uri)
    location = client.get_logged_model(client.get_run(best).outputs.model_outputs[0].model_id).artifact_location
    shutil.rmtree(Path(url2pathname(urlparse(location).path)))
    selection, version = select_and_register(uri, "sweep-lost", name="lost")
    assert selection.excluded == {"best (mobilefacenet)": "its model's files are missing"}
    assert version.run_id == ok

    from faceforge.registry.selection import _files_missing

    spaced = tmp_path / "a model"  # a file URI quotes the space
    spaced.mkdir()
    assert _files_missing(spaced.as_uri()) and _files_missing(str(spaced))
    (spaced / "MLmodel").touch()
    assert not _files_missing(spaced.as_uri()) and not _files_missing(str(spaced))
    assert not _files_missing("s3://bucket/models/m-1/artifacts")  # remote stores are not checked


def test_a_corrupt_database_is_one_line_not_a_traceback(sweep: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """MLflow reads the schema as it opens the database: a damaged one ended the CLI with a SQLAlchemy traceback."""
    garbage, truncated = tmp_path / "garbage.db", tmp_path / "truncated.db"
    garbage.write_text("this is not a database\n")
    shutil.copyfile(sweep[0].removeprefix("sqlite:///"), truncated)
    os.truncate(truncated, 20_000)
    for path, why in ((garbage, "file is not a database"), (truncated, "database disk image is malformed")):
        with pytest.raises(ValueError, match=re.escape(f"{path} is not a readable MLflow database ({why})")):
            open_database(f"sqlite:///{path}")
    for command in (("champion",), ("select", SWEEP)):
        failed = faceforge("registry", "--tracking-uri", f"sqlite:///{garbage}", *command)
        assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr
        error = f"faceforge registry: error: {garbage} is not a readable MLflow database (file is not a database)"
        assert failed.stderr.splitlines()[-1] == error


def test_registration_sets_champion_and_reruns_are_idempotent(sweep: tuple[str, dict[str, str]]) -> None:
    uri, runs = sweep
    selection, first = select_and_register(uri, SWEEP, name="reg")
    assert first.run_id == runs["big"] and CHAMPION_ALIAS in first.aliases
    assert (first.sweep_id, first.metric, first.value) == (SWEEP, "accuracy", pytest.approx(0.95))
    assert first.reason == selection.reason and first.card == {"params": 2e6, "macs": 1e6, "latency_ms": 20.0}

    _, again = select_and_register(uri, SWEEP, name="reg")
    assert again.version == first.version and len(versions(uri, "reg")) == 1

    _, limited = select_and_register(uri, SWEEP, Policy(max_latency_ms=10), "reg")  # a new policy picks a new winner
    assert limited.run_id == runs["fast"] and limited.version != first.version
    assert champion(uri, "reg").version == limited.version
    _, back = select_and_register(uri, SWEEP, Policy(), "reg")  # the default policy again: its version again
    assert back.version == first.version and len(versions(uri, "reg")) == 2
    assert [v.aliases for v in versions(uri, "reg")] == [[], [CHAMPION_ALIAS]]

    # The registered source is the run's logged model and loads for any batch size.
    import mlflow

    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"models:/reg@{CHAMPION_ALIAS}", map_location="cpu").eval()
    with torch.no_grad():
        assert loaded(torch.zeros(3, 3, 56, 56)).shape == (3, TINY["embedding_dim"])

    # Without a policy or a name (as the scheduler selects), those the sweep was launched with.
    save_policy(uri, prepare_tracking(uri, "tests"), SWEEP, Policy(max_latency_ms=10), "reg")
    assert saved_policy(uri, SWEEP) == (Policy(max_latency_ms=10), "reg")
    assert saved_policy(uri, "sweep-x") == (Policy(), None)
    _, launched = select_and_register(uri, SWEEP)
    assert (launched.name, launched.version) == ("reg", limited.version)
    assert champion(uri, "reg").version == limited.version


def test_a_policy_chosen_at_a_selection_is_kept_for_the_next(sweep: tuple[str, dict[str, str]]) -> None:
    """`registry select --max-latency-ms 10` crowned a fast model; when a retried job of the sweep ended, the
    scheduler selected again by the policy the sweep was launched with and crowned a model over that budget."""
    uri, _ = sweep
    experiment_id = prepare_tracking(uri, "tests")
    fast = add_run(uri, experiment_id, "fast", "mobilefacenet", {"eval.accuracy": 0.9, "model.latency_ms": 5.0},
                   sweep_id="sweep-kept")  # fmt: skip
    add_run(uri, experiment_id, "slow", "mobilefacenet", {"eval.accuracy": 0.95, "model.latency_ms": 20.0},
            sweep_id="sweep-kept")  # fmt: skip
    with pytest.raises(ValueError, match="bad registered model name 'bad name'"):
        save_policy(uri, experiment_id, "sweep-kept", Policy(), "bad name")  # the launcher's check, before training
    save_policy(uri, experiment_id, "sweep-kept", Policy(), "kept")  # launched with no budget
    _, chosen = select_and_register(uri, "sweep-kept", Policy(max_latency_ms=10))
    _, again = select_and_register(uri, "sweep-kept")  # what the scheduler runs
    assert chosen.run_id == again.run_id == fast and again.name == "kept"
    assert champion(uri, "kept").run_id == fast


def test_registry_uris_resolve_to_versions_or_a_clear_error(sweep: tuple[str, dict[str, str]]) -> None:
    uri = sweep[0]
    client = MlflowClient(uri)
    _, registered = select_and_register(uri, SWEEP, name="pin")
    by_alias = registered_version(client, f"models:/pin@{CHAMPION_ALIAS}")
    assert by_alias is not None and (by_alias.name, str(by_alias.version)) == ("pin", str(registered.version))
    assert registered_version(client, f"models:/pin/{registered.version}").run_id == registered.run_id
    assert registered_version(client, "models:/pin/latest") is None  # stages and `latest` are not pinned
    assert registered_version(client, f"runs:/{registered.run_id}/model") is None
    for missing in ("models:/pin@staging", "models:/pin/99", "models:/nothing@champion", "models:/nothing/1"):
        with pytest.raises(ValueError, match=f"no {missing} in the registry yet"):
            registered_version(client, missing)
    with pytest.raises(ValueError, match="no models:/nothing@champion"):
        champion(uri, "nothing")
    with pytest.raises(ValueError, match="bad registered model name 'pin/1'"):
        champion(uri, "pin/1")  # not the champion of `pin`


def test_concurrent_registrations_of_a_sweep_add_one_version(sweep: tuple[str, dict[str, str]]) -> None:
    """A waiting launcher and the scheduler may both finish the same sweep at the same moment."""
    uri = sweep[0]
    with ThreadPoolExecutor(4) as pool:
        registered = list(pool.map(lambda _: select_and_register(uri, SWEEP, Policy(), "race")[1], range(4)))
    assert len({version.version for version in registered}) == 1 and len(versions(uri, "race")) == 1


def test_versions_wait_for_a_registration_to_move_the_alias(sweep: tuple[str, dict[str, str]]) -> None:
    """A registration adds the version, then moves the alias; the sweep page, which stops polling once it sees
    a registered version, must never read the version without the alias (it failed this way in CI once)."""
    uri, runs = sweep
    client = MlflowClient(uri)
    client.create_registered_model("midway")
    model_id = client.get_run(runs["fast"]).outputs.model_outputs[0].model_id
    source = client.get_logged_model(model_id).artifact_location
    with ThreadPoolExecutor(1) as reader:
        with registry_lock(uri, exclusive=True):
            mv = client.create_model_version("midway", source, runs["fast"])
            seen = reader.submit(versions, uri, "midway")
            time.sleep(1.0)  # time enough for an unlocked reader to see the version without its alias
            client.set_registered_model_alias("midway", CHAMPION_ALIAS, mv.version)
        assert [v.aliases for v in seen.result(timeout=60)] == [[CHAMPION_ALIAS]]


def test_trained_run_logs_its_card_and_registers(
    sweep: tuple[str, dict[str, str]], tiny_train_root: Path, tiny_pairs: Path, tmp_path: Path
) -> None:
    uri = sweep[0]
    cfg = tiny_config(tmp_path / "run", tiny_train_root, tiny_pairs, steps=2)
    cfg.mlflow.tracking_uri, cfg.mlflow.experiment = uri, "tests"
    cfg.mlflow.log_model, cfg.mlflow.sweep_id = True, "sweep-trained"
    launch(cfg)
    (candidate,) = sweep_candidates(uri, "sweep-trained")
    assert candidate.metrics["model.params"] == count_params(models.create("mobilefacenet", **TINY | {"width": 0.25}))
    assert candidate.metrics["model.macs"] > 0 and candidate.metrics["model.latency_ms"] > 0
    assert 0.0 <= candidate.metric("accuracy") <= 1.0 and candidate.model_id is not None
    _, version = select_and_register(uri, "sweep-trained", name="trained")
    assert version.run_id == candidate.run_id and set(version.card) == {"params", "macs", "latency_ms"}
    # Artifacts live next to the database, not in ./mlruns of whichever directory the job ran in.
    artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
    assert any(artifacts.rglob("config.yaml")) and any(artifacts.rglob("MLmodel"))


def test_cli_champion_select_and_mlflow_ui(sweep: tuple[str, dict[str, str]]) -> None:
    uri, runs = sweep
    uri_args = ("--tracking-uri", uri)
    experiment_id = MlflowClient(uri).get_experiment_by_name("tests").experiment_id
    save_policy(uri, experiment_id, SWEEP, Policy(metric="eer", max_params=1_500_000), "faceforge")
    try:  # an option replaces its part of the sweep's saved policy and keeps the rest
        selected = faceforge("registry", *uri_args, "--name", "faceforge", "select", SWEEP, "--max-latency-ms", "10")
    finally:
        for tag in (POLICY_TAG, REGISTERED_MODEL_TAG):
            MlflowClient(uri).delete_experiment_tag(experiment_id, tag + SWEEP)
    assert selected.returncode == 0, selected.stderr
    assert runs["fast"] in selected.stdout and "latency 20.00 ms > 10 ms" in selected.stdout
    assert "lowest eer with latency <= 10 ms, params <= 1,500,000" in selected.stdout
    shown = faceforge("registry", *uri_args, "champion")
    assert shown.returncode == 0, shown.stderr
    assert runs["fast"] in shown.stdout and "aliases: champion" in shown.stdout and "latency 5.00 ms" in shown.stdout

    typo = f"{uri}.typo"
    for args in (
        ("registry", *uri_args, "--name", "nothing", "champion"),
        ("registry", "--tracking-uri", typo, "champion"),
        ("mlflow-ui", "--tracking-uri", typo),
    ):
        failed = faceforge(*args)
        assert failed.returncode != 0 and "error:" in failed.stderr and "Traceback" not in failed.stderr
    assert not Path(typo.removeprefix("sqlite:///")).exists()  # a mistyped URI creates no empty database

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", "from faceforge.cli import main; main()", "mlflow-ui", *uri_args, "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300  # one worker starts in seconds, or a minute on a busy 2-core machine
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tests"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    served = json.load(response)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not come up"
                time.sleep(1)
        assert served["experiment"]["name"] == "tests"  # the UI serves this very database
        server.terminate()  # `kill PID`: MLflow's workers must go too, not keep the port
        server.wait(timeout=60)
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


WRITER = """
import sys, time
from faceforge.train.config import TrainConfig
from faceforge.train.tracking import RunTracker, create_run, finish_run
uri, start_at, index = sys.argv[1], float(sys.argv[2]), sys.argv[3]
time.sleep(max(0.0, start_at - time.time()))
run_id = create_run(uri, "faceforge", f"writer-{index}", TrainConfig().to_dict(), {"faceforge.sweep_id": "sweep-w"})
tracker = RunTracker(uri, run_id)
for step in range(1, 21):
    tracker.metrics({"loss": 1.0 / step, "lr": 0.1, "img_per_s": 100.0}, step)
finish_run(uri, run_id, True)
"""


@pytest.mark.slow
def test_eight_concurrent_writers_on_one_database(tmp_path: Path) -> None:
    """Like 8 jobs starting together on a database the scheduler created: no lock or migration errors."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepare_tracking(uri)
    start_at = time.time() + 8.0  # after every interpreter has imported mlflow
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, str(start_at), str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for i in range(8)
    ]
    outputs = [writer.communicate(timeout=300) for writer in writers]
    for writer, (_, stderr) in zip(writers, outputs, strict=True):
        text = stderr.decode()
        assert writer.returncode == 0, text
        assert "database is locked" not in text and "alembic" not in text.lower(), text
    runs = sweep_candidates(uri, "sweep-w")
    assert len(runs) == 8 and all(run.status == "FINISHED" for run in runs)
    assert all(run.metrics["loss"] == pytest.approx(1 / 20) for run in runs)
    history = MlflowClient(uri).get_metric_history(runs[0].run_id, "loss")
    assert np.allclose(sorted(m.value for m in history), sorted(1.0 / s for s in range(1, 21)))


def test_a_champion_whose_run_was_garbage_collected_is_still_described(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = prepare_tracking(uri, "tests")
    client = MlflowClient(uri, registry_uri=uri)
    run_id = add_run(uri, experiment_id, "old", "mobilefacenet", {"eval.accuracy": 0.9, "model.latency_ms": 3.0})
    select_and_register(uri, SWEEP)
    assert champion(uri).card == {"latency_ms": 3.0}
    client.delete_run(run_id)
    collected = subprocess.run(
        [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri, "--run-ids", run_id],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collected.returncode == 0, collected.stderr
    kept = champion(uri)  # the version outlives its run: readable, with no card left to show
    assert kept.run_id == run_id and kept.card == {} and "aliases: champion" in kept.describe()
    assert [v.run_id for v in versions(uri)] == [run_id]

    client.delete_experiment(experiment_id)
    with pytest.raises(ValueError, match="experiment 'tests' was deleted: restore it"):
        prepare_tracking(uri, "tests")
