"""The trainer end to end: config errors, MLflow logging, bit-identical resume, resharding, accumulation, SIGTERM."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import reduce
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from faceforge import models
from faceforge.data import ImageFolderDataset, VerificationSet, write_bin
from faceforge.distill.cli import distill_overrides
from faceforge.heads import margin_spec
from faceforge.locks import try_lock
from faceforge.parallel import HeadOptimizer, ShardedMarginSoftmax, shard_range
from faceforge.train import TrainConfig, from_dict
from faceforge.train.app import resume_arguments
from faceforge.train.checkpoint import load_backbone, load_checkpoint, resolve_checkpoint, save_checkpoint
from faceforge.train.config import ConfigError, ScheduleConfig
from faceforge.train.launch import TRAIN_LOCK, check_against_disk, launch
from faceforge.train.loop import build_optimizer, forward_backward
from faceforge.train.schedule import lr_at

from conftest import REPO, run_stopped_inside, tiny_config
from distributed import run_ranks

PYTHON = sys.executable


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = resolve_checkpoint(path)
    state = torch.load(path / "model.pt", weights_only=True)
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    for name in json.loads((path / "meta.json").read_text())["head_files"]:
        tensors |= {f"{name}.{k}": v for k, v in torch.load(path / name, weights_only=True).items()}
    return tensors


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "faceforge.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def tiny_cli_run(train_root: Path, out: Path, *overrides: str) -> list[str]:
    """`faceforge train` overrides for a width-0.25, 56 px model on `train_root`, run in `out`, plus `overrides`."""
    tiny = ["eval=none", "model.width=0.25", "model.input_size=56", "data.batch_size=8", "data.num_workers=0"]
    return [f"data.root={train_root}", *tiny, "mlflow.log_model=false", f"hydra.run.dir={out}", *overrides]


def test_platform_folder_never_shadows_the_stdlib() -> None:
    assert not (REPO / "platform" / "__init__.py").exists(), "platform/__init__.py would shadow stdlib platform"
    probe = subprocess.run(
        [PYTHON, "-c", "import platform, torch; print(platform.system())"], cwd=REPO, capture_output=True, text=True
    )
    assert probe.returncode == 0 and probe.stdout.strip(), probe.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=resnet9000"], "unknown backbone 'resnet9000'"),
        (["data.root=/nonexistent/faces", "eval=none"], "data.root /nonexistent/faces does not exist"),
        (["data.batch_size=63", "trainer.nproc=2"], "does not divide"),
        (["trainer.nproc=7", "data.batch_size=70", "eval=none"], "cannot be sharded over trainer.nproc=7"),
        (["data.batch_size=32", "trainer.nproc=2", "eval=none"], "24 images cannot fill one global batch"),
        (["schedule.min_lr_ratio=-1"], "schedule.min_lr_ratio must be between 0 and 1"),
        (["seed=-1"], "seed must be between 0 and 18446744073709551615, got -1"),
        (["head=triplet", "head.p=8", "head.k=1"], "triplet loss needs head.p >= 2 and head.k >= 2"),
        (["model=shufflefacenet", "model.width=0.25"], "model: shufflefacenet width must be one of"),
        (["model.input_size=20"], "model.input_size must be between 32 and 1024, got 20"),
        (["output_dir=/tmp/elsewhere"], "output_dir=/tmp/elsewhere is not the run's folder"),  # --resume reads it
    ],
)
def test_bad_config_is_one_clear_line(overrides: list[str], message: str, tiny_train_root: Path, tmp_path) -> None:
    if not any(o.startswith("data.root") for o in overrides):
        overrides = [*overrides, f"data.root={tiny_train_root}"]
    result = run_cli(*overrides, f"hydra.run.dir={tmp_path}", env={"FACEFORGE_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def config_error(check: Callable[[], object]) -> str:
    """The message of the ConfigError `check` raises, asserted to be one line as the CLI prints it."""
    with pytest.raises(ConfigError) as raised:
        check()
    assert "\n" not in str(raised.value)
    return str(raised.value)


def disk_error(cfg: TrainConfig) -> str:
    """The one-line ConfigError `check_against_disk` raises: what launch reports before any run starts."""
    return config_error(lambda: check_against_disk(cfg))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("min_lr_ratio", -1, "schedule.min_lr_ratio must be between 0 and 1, got -1.0"),
        ("min_lr_ratio", 1.5, "schedule.min_lr_ratio must be between 0 and 1, got 1.5"),
        ("power", -2, "schedule.power must be between 0.01 and 10, got -2.0"),
        ("power", 0, "schedule.power must be between 0.01 and 10, got 0.0"),
        ("warmup_steps", -5, "schedule.warmup_steps must be between 0 and inf, got -5"),
    ],
)
def test_schedule_values_that_would_negate_or_raise_the_lr_are_refused(
    key: str, value: float, message: str, tmp_path: Path
) -> None:
    values = tiny_config(tmp_path / "run", tmp_path, None).to_dict()
    values["schedule"][key] = value
    assert message in config_error(lambda: from_dict(values))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("eval.batch_size", 0, "eval.batch_size must be between 1 and 65536, got 0"),
        ("eval.crop_fraction", 0.0, "eval.crop_fraction must be in (0, 1]"),
        ("trainer.eval_every", -1, "trainer.eval_every must be between 0 and inf, got -1"),
        ("optim.betas", [2.0, 0.999], "optim.betas must be two values in [0, 1), got [2.0, 0.999]"),
        ("optim.betas", [0.9], "optim.betas must be two values in [0, 1), got [0.9]"),
        ("data.augment.jitter", 1.5, "data.augment.jitter must be between 0 and 0.99, got 1.5"),
        ("data.augment.jitter", -0.2, "data.augment.jitter must be between 0 and 0.99, got -0.2"),
        ("seed", 2**64, f"seed must be between 0 and {2**64 - 1}, got {2**64}"),  # torch's seeds are 64-bit
        ("mlflow.experiment", " ", "mlflow.experiment must name an MLflow experiment, got ' '"),
    ],
)
def test_values_that_would_fail_after_training_are_refused_up_front(
    key: str, value: object, message: str, tmp_path: Path
) -> None:
    values = tiny_config(tmp_path / "run", tmp_path, None).to_dict()
    *sections, name = key.split(".")
    reduce(lambda section, part: section[part], sections, values)[name] = value
    assert message in config_error(lambda: from_dict(values))


def test_a_run_resumed_from_its_last_checkpoint_still_gets_its_final_evaluation(
    tiny_train_root: Path, tiny_pairs: Path, tmp_path: Path
) -> None:
    """Killed while evaluating, a run has already saved its last step: resuming evaluates instead of ending bare."""
    out = tmp_path / "run"
    launch(tiny_config(out, tiny_train_root, None, steps=2))  # as far as a run killed in its final evaluation gets
    metrics = launch(tiny_config(out, tiny_train_root, tiny_pairs, steps=2, resume="auto"))
    assert 0.0 <= metrics["accuracy"] <= 1.0 and (out / "roc.png").is_file()
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run((out / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED" and run.data.metrics["eval.accuracy"] == pytest.approx(metrics["accuracy"])


def test_a_dataset_too_small_for_one_step_is_refused_before_training(tiny_train_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_train_root, None)
    cfg.data.root = "???"  # `data=folder` leaves it to the command line
    assert disk_error(cfg) == "data.root is not set: give data.root=<folder or RecordIO directory>"
    cfg.data.root = str(tiny_train_root)
    cfg.data.batch_size = 32
    assert "24 images cannot fill one global batch of data.batch_size=32" in disk_error(cfg)
    cfg.head.type, cfg.head.p, cfg.head.k, cfg.data.batch_size = "triplet", 16, 4, 64
    message = "6 identities cannot fill one triplet step of head.p=16 identities x trainer.nproc=1 ranks"
    assert message in disk_error(cfg)
    cfg.head.p, cfg.trainer.nproc = 4, 2
    assert "head.p=4 identities x trainer.nproc=2 ranks" in disk_error(cfg)


def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_the_run(tiny_train_root: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the run's folder would go")
    with pytest.raises(ConfigError, match=r"^output_dir .*taken cannot be made a folder: File exists$"):
        launch(tiny_config(tmp_path / "taken", tiny_train_root, None))
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run was opened"


def save_untrained_checkpoint(
    directory: Path, cfg: TrainConfig, num_classes: int, identities: str | None = None
) -> Path:
    """A checkpoint of cfg's network and optimizer with a `num_classes` margin head, written without training."""
    model = models.create(**asdict(cfg.model))
    head = ShardedMarginSoftmax(num_classes, cfg.model.embedding_dim, margin_spec("arcface"))
    return save_checkpoint(
        directory,
        1,
        model=model,
        optimizer=build_optimizer(list(model.parameters()), cfg),
        head=head,
        head_optimizer=HeadOptimizer(head, kind=cfg.optim.name),
        train_config=cfg.to_dict(),
        is_main=True,
        identities=identities,
    )


def test_a_resume_checkpoint_the_config_cannot_load_is_refused_before_training(
    tiny_train_root: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_train_root, None)
    saved = save_untrained_checkpoint(tmp_path / "six", cfg, 6)
    seven = save_untrained_checkpoint(tmp_path / "seven", cfg, 7)
    cfg.trainer.resume = str(tmp_path / "six")
    assert check_against_disk(cfg) == 6  # the matching checkpoint passes

    cases = [
        ("model", "width", 0.5, "holds a different model: width=0.25 (config: 0.5)"),
        ("optim", "name", "adamw", "was trained with optim=sgd, not adamw"),
        ("trainer", "resume", str(tmp_path / "missing"), "trainer.resume: no checkpoint at"),
        ("trainer", "resume", str(seven), "holds a 7-class classifier, data.root has 6 identities"),
    ]
    for section, key, value, message in cases:
        changed = tiny_config(tmp_path / "run", tiny_train_root, None, resume=str(saved))
        setattr(getattr(changed, section), key, value)
        assert message in disk_error(changed)

    state = torch.load(saved / "model.pt", weights_only=True)
    torch.save({key: state[key] for key in ("model_config", "model")}, saved / "model.pt")  # backbone only, as pruned
    message = "model.pt has no optimizer, step: not a FaceForge training checkpoint"
    assert message in disk_error(cfg)


def test_a_resume_onto_other_people_another_loss_or_damaged_files_is_refused_before_training(
    tiny_train_root: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_train_root, None)
    people = ImageFolderDataset(tiny_train_root)
    saved = save_untrained_checkpoint(tmp_path / "same", cfg, people.num_classes, people.identity_digest)
    others = save_untrained_checkpoint(tmp_path / "others", cfg, people.num_classes, "another-set-of-6")
    cfg.trainer.resume = str(saved)
    assert check_against_disk(cfg) == people.num_classes
    cfg.trainer.resume = str(others)  # six people, not these six: every classifier row would be someone else's
    assert "holds 6 identities but not the ones it trained on" in disk_error(cfg)
    changed = tiny_config(tmp_path / "run", tiny_train_root, None, resume=str(saved))
    changed.head.m2 = 0.3
    assert "was trained with another loss: head m2=0.5 (config: 0.3)" in disk_error(changed)

    cfg.trainer.resume = str(saved)
    for name, damage, message in [
        ("meta.json", b'{"step": 1,', "meta.json is not valid JSON"),
        ("head_0_6.pt", b"PK\x03\x04 cut short", "head_0_6.pt is not a readable classifier shard"),
        ("model.pt", b"cut short", "model.pt is not a readable PyTorch checkpoint"),
    ]:
        whole = (saved / name).read_bytes()
        (saved / name).write_bytes(damage)
        assert message in disk_error(cfg), name
        (saved / name).write_bytes(whole)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_training(tiny_train_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_train_root, None, device="cuda")
    message = "trainer.device=cuda with trainer.nproc=1 needs 1 CUDA device(s), found 0"
    assert message in disk_error(cfg)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"junk" * 64, "model.pt is not a readable PyTorch checkpoint"), (None, "model.pt has no model_config, model")],
)
def test_init_from_a_foreign_checkpoint_is_a_config_error(content: bytes | None, message: str, tmp_path: Path) -> None:
    """A corrupt model.pt, or a plain state dict with no model_config (someone else's weights)."""
    if content is None:
        torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "model.pt")
    else:
        (tmp_path / "model.pt").write_bytes(content)
    values = tiny_config(tmp_path / "run", tmp_path, None).to_dict()
    values["trainer"]["init_from"] = str(tmp_path)
    error = config_error(lambda: from_dict(values))
    assert error.startswith("trainer.init_from: ") and message in error


def test_an_evaluation_set_that_cannot_be_scored_is_refused_before_training(
    tiny_train_root: Path, tiny_pairs: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_train_root, tiny_pairs)
    check_against_disk(cfg)  # the 10-fold pairs pass
    header, *lines = tiny_pairs.read_text().splitlines()
    one_fold = tmp_path / "one_fold.txt"
    one_fold.write_text("1\t2\n" + "\n".join(lines[:4]) + "\n")
    missing = tmp_path / "missing.txt"
    name, first, _ = lines[0].split()
    missing.write_text("\n".join([header, f"{name}\t{first}\t9999", *lines[1:]]) + "\n")
    matched_only = tmp_path / "matched.bin"
    folds = np.arange(10)
    write_bin(matched_only, VerificationSet("m", [b"a", b"b"], folds * 0, folds * 0 + 1, folds >= 0, folds))
    impostors_in_one_fold = tmp_path / "one_fold_impostors.bin"
    folds = np.repeat(np.arange(10), 2)
    pairs = VerificationSet("f", [b"a", b"b"], folds * 0, folds * 0 + 1, folds != 9, folds)
    write_bin(impostors_in_one_fold, pairs)

    cases = [
        ({"pairs": str(one_fold)}, "k-fold accuracy needs at least 2 folds, got 1"),
        ({"pairs": str(missing)}, f"{name}_9999.jpg not found"),
        ({"root": None}, "needs eval.root"),
        ({"bin": str(matched_only)}, "hold only genuine pairs"),
        ({"bin": str(impostors_in_one_fold)}, "the folds other than fold 9 hold only genuine pairs"),
    ]
    for changes, message in cases:
        changed = tiny_config(tmp_path / "run", tiny_train_root, tiny_pairs)
        for key, value in changes.items():
            setattr(changed.eval, key, value)
        assert message in disk_error(changed)


def test_learning_rate_schedule() -> None:
    cosine = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 110, 1.0, cosine) == pytest.approx(0.1)
    assert lr_at(9, 110, 1.0, cosine) == pytest.approx(1.0)
    assert lr_at(60, 110, 1.0, cosine) == pytest.approx(0.55)
    poly = ScheduleConfig(name="poly", warmup_steps=0, power=2.0)
    assert lr_at(50, 100, 1.0, poly) == pytest.approx(0.25)


def test_two_rank_training_logs_to_mlflow_and_resumes_bit_identically(
    tiny_train_root: Path, tiny_pairs: Path, tmp_path: Path
) -> None:
    full = tiny_config(tmp_path / "full", tiny_train_root, tiny_pairs, nproc=2)
    metrics = launch(full)
    assert 0.0 <= metrics["accuracy"] <= 1.0

    client = MlflowClient(full.mlflow.tracking_uri)
    run = client.get_run((tmp_path / "full" / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mobilefacenet" and run.data.params["trainer.nproc"] == "2"
    assert {"loss", "lr", "img_per_s", "eval.accuracy", "eval.tar_far_1e-01"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"roc.png", "config.yaml"} <= artifacts
    beside_database = Path(full.mlflow.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts"
    assert run.info.artifact_uri.startswith(beside_database.resolve().as_uri())  # not ./mlruns of the cwd

    # Second half again from the step-2 checkpoint, in a fresh output directory.
    half = tmp_path / "full" / "checkpoints" / "step_00000002"
    resumed = tiny_config(tmp_path / "resumed", tiny_train_root, tiny_pairs, nproc=2, resume=str(half))
    launch(resumed)
    want = checkpoint_tensors(tmp_path / "full" / "checkpoints")
    got = checkpoint_tensors(tmp_path / "resumed" / "checkpoints")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs after resume"

    # A different world size re-shards the classifier and keeps training.
    one_rank = tiny_config(tmp_path / "one", tiny_train_root, None, nproc=1, steps=6, resume=str(half))
    launch(one_rank)
    final = resolve_checkpoint(tmp_path / "one" / "checkpoints")
    assert final.name == "step_00000006"
    assert json.loads((final / "meta.json").read_text())["head_files"] == ["head_0_6.pt"]
    assert load_backbone(final)(torch.zeros(2, 3, 56, 56)).shape == (2, 32)


def check_reshard(rank: int, world_size: int, saved_dir: str, num_classes: int) -> None:
    head = ShardedMarginSoftmax(num_classes, 8, margin_spec("arcface"), dtype=torch.float64)
    optimizer = HeadOptimizer(head, kind="adamw")
    model = nn.Linear(2, 2)
    model.config = {}
    backbone_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    load_checkpoint(Path(saved_dir), model=model, optimizer=backbone_opt, head=head, head_optimizer=optimizer)
    reference = torch.load(Path(saved_dir) / "reference.pt", weights_only=True)
    start, end = shard_range(num_classes, world_size, rank)
    assert torch.equal(head.weight, reference["weight"][start:end])
    for name, tensor in optimizer.state.items():
        assert torch.equal(tensor, reference[name][start:end])
    assert optimizer.step_count == 7


def save_sharded(rank: int, world_size: int, out_dir: str, num_classes: int) -> None:
    gen = torch.Generator().manual_seed(0)
    full = {name: torch.randn(num_classes, 8, generator=gen, dtype=torch.float64) for name in ("weight", "a", "b")}
    head = ShardedMarginSoftmax(num_classes, 8, margin_spec("arcface"), dtype=torch.float64)
    optimizer = HeadOptimizer(head, kind="adamw")
    optimizer.step_count = 7
    head.weight.copy_(full["weight"][head.class_start : head.class_end])
    optimizer.state["exp_avg"].copy_(full["a"][head.class_start : head.class_end])
    optimizer.state["exp_avg_sq"].copy_(full["b"][head.class_start : head.class_end])
    model = nn.Linear(2, 2)
    model.config = {}
    backbone_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    final = save_checkpoint(
        Path(out_dir),
        3,
        model=model,
        optimizer=backbone_opt,
        head=head,
        head_optimizer=optimizer,
        train_config={},
        is_main=rank == 0,
    )
    if rank == 0:
        torch.save({"weight": full["weight"], "exp_avg": full["a"], "exp_avg_sq": full["b"]}, final / "reference.pt")


@pytest.mark.parametrize("load_world", [1, 3])
def test_checkpoint_written_by_two_ranks_reshards_to_any_world_size(tmp_path: Path, load_world: int) -> None:
    run_ranks(save_sharded, 2, str(tmp_path), 11)
    saved = resolve_checkpoint(tmp_path)
    assert sorted(p.name for p in saved.glob("head_*.pt")) == ["head_0_6.pt", "head_6_11.pt"]
    run_ranks(check_reshard, load_world, str(saved), 11)


def test_gradient_accumulation_averages_over_micro_batches() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))  # BN-free: micro-batches change nothing but the sum
    images, labels = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))
    grads = []
    for accumulate in (1, 4):
        head = ShardedMarginSoftmax(5, 8, margin_spec("cosface"), seed=1)
        net.zero_grad()
        loss = forward_backward(net, head, images, labels, accumulate, torch.autocast("cpu", enabled=False))
        grads.append((loss, net[1].weight.grad.clone(), head.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("killed", ["launcher", "group"])
def test_ranks_never_outlive_a_launcher_killed_with_9(tiny_train_root: Path, tmp_path: Path, killed: str) -> None:
    """`kill -9` of the launcher alone, or of its whole group (the queue's SIGKILL after a cancel's grace period):
    ranks left behind would train on, and race a resume into the same checkpoints."""
    out = tmp_path / "run"
    args = ["trainer.nproc=2", *tiny_cli_run(tiny_train_root, out, "trainer.steps=100000")]
    env = {**os.environ, "FACEFORGE_HOME": str(tmp_path)}
    command = [PYTHON, "-m", "faceforge.train", *args]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and "train:" not in (line := proc.stderr.readline()):
        assert line or proc.poll() is None, "training exited early"
    if killed == "launcher":
        proc.kill()
    else:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun too; each rank has a session of its own
    proc.wait()
    deadline = time.time() + 90
    while rogue := subprocess.run(["pgrep", "-f", str(out / "config.yaml")], capture_output=True, text=True).stdout:
        assert time.time() < deadline, f"ranks outlived their launcher: {rogue}"
        time.sleep(0.5)
    # A process killed with 9 drops its command line before its files, so pgrep can miss it for a moment while it
    # still holds the lock; the lock must come free for a resume soon after.
    deadline = time.time() + 10
    while (lock := try_lock(out / TRAIN_LOCK)) is None:
        assert time.time() < deadline, "the training lock outlived the ranks"
        time.sleep(0.1)
    os.close(lock)


def test_one_run_trains_in_a_folder_and_resumes_only_its_own_mlflow_run(tiny_train_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_train_root, None, steps=2)
    (tmp_path / "run").mkdir()
    with (tmp_path / "run" / TRAIN_LOCK).open("w") as held:  # another launcher's
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another run is training in this folder"):
            launch(cfg)
    launch(cfg)
    resumed = tiny_config(tmp_path / "run", tiny_train_root, None, steps=3, resume="auto")
    resumed.mlflow.tracking_uri = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    with pytest.raises(
        ConfigError, match=r"mlflow_run_id names MLflow run \w+, which sqlite:///.*elsewhere.* does not"
    ):
        launch(resumed)
    MlflowClient(cfg.mlflow.tracking_uri).delete_run((tmp_path / "run" / "mlflow_run_id").read_text())
    resumed.mlflow.tracking_uri = cfg.mlflow.tracking_uri
    with pytest.raises(ConfigError, match=r"mlflow_run_id names MLflow run \w+, which was deleted: restore it"):
        launch(resumed)


@pytest.mark.parametrize(
    ("nproc", "stop", "whole_group"),
    [(1, signal.SIGTERM, True), (2, signal.SIGTERM, False), (2, signal.SIGINT, True), (2, signal.SIGHUP, True)],
)
def test_sigterm_writes_a_resumable_checkpoint_and_ends_the_run(
    tiny_train_root: Path, tmp_path: Path, nproc: int, stop: signal.Signals, whole_group: bool
) -> None:
    """The queue signals a job's process group, `kill` the launcher alone, a terminal's Ctrl-C (pressed twice here)
    and hangup its foreground group. Every way the ranks checkpoint and the MLflow run is ended, not left RUNNING:
    torchrun, which gets a group's signal and the launcher's SIGTERM, acts on the first and ignores the rest.
    A single rank runs in the group with its DataLoader workers, which must not die of the stop mid-checkpoint."""
    out = tmp_path / "run"
    args = tiny_cli_run(tiny_train_root, out, "trainer.steps=100000", "trainer.checkpoint_every=100000")
    args = [f"trainer.nproc={nproc}", *args, f"data.num_workers={2 if nproc == 1 else 0}"]
    env = {**os.environ, "FACEFORGE_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [PYTHON, "-m", "faceforge.train", *args],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and "train:" not in (line := proc.stderr.readline()):
        assert line or proc.poll() is None, "training exited early"
    time.sleep(3)
    try:
        if whole_group:
            os.killpg(proc.pid, stop)
            if stop == signal.SIGINT:
                time.sleep(0.3)
                os.killpg(proc.pid, stop)
        else:
            proc.send_signal(stop)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert f"stopped by {stop.name}" in err and "Traceback" not in err, err[-3000:]
    stopped = resolve_checkpoint(out / "checkpoints")
    step = json.loads((stopped / "meta.json").read_text())["step"]
    assert step > 0
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run((out / "mlflow_run_id").read_text())
    assert run.info.status == "FAILED"
    if nproc > 1:
        return  # resuming is the same code for any nproc, and is tested below and in the resharding test

    # The run's folder is all a resume needs: its width, input size and data come from what Hydra recorded.
    assert f"faceforge train --resume {out}" in err
    result = run_cli("--resume", str(out), f"trainer.steps={step + 2}", env={"FACEFORGE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert resolve_checkpoint(out / "checkpoints").name == f"step_{step + 2:08d}"
    assert (out / "mlflow_run_id").read_text() == run.info.run_id
    assert TrainConfig.load(out / "config.yaml").model.width == 0.25


@pytest.mark.parametrize(
    ("nproc", "stopped_in", "status", "said"),
    [
        (1, "faceforge.train.launch:create_run", "FAILED", "stopped by SIGTERM; resume with"),
        (1, "faceforge.train.loop:build_optimizer", "FAILED", "stopped by SIGTERM; resume with"),
        (1, "faceforge.train.tracking:finish_run", "FINISHED", "stopped by SIGTERM as the run ended"),
        (2, "faceforge.train.tracking:finish_run", "FINISHED", "stopped by SIGTERM as the run ended"),
    ],
)
def test_a_stop_outside_the_steps_still_ends_the_mlflow_run(
    tiny_train_root: Path, tmp_path: Path, nproc: int, stopped_in: str, status: str, said: str
) -> None:
    """The default SIGTERM would kill the launcher and leave its MLflow run RUNNING for good. A stop while the run is
    created (its params logged) or during set-up ends the run as FAILED with the resume hint; one that lands while
    the launcher records how the run ended waits for that record, then ends the launcher. Each stop lands inside
    `stopped_in`, after the run exists."""
    cfg = tiny_config(tmp_path / "run", tiny_train_root, None, steps=2, nproc=nproc, threads=1)
    cfg.save(config := tmp_path / "config.yaml")
    launcher = (
        "import sys\n"
        "from faceforge.train.config import TrainConfig\n"
        "from faceforge.train.launch import launch\n"
        "launch(TrainConfig.load(sys.argv[1]))\n"
        "print('carried on after the stop', flush=True)\n"
    )
    after = stopped_in.endswith(":create_run")  # once the run exists
    result = run_stopped_inside(stopped_in, signal.SIGTERM, launcher, [str(config)], after=after)
    assert result.returncode == 1 and "carried on" not in result.stdout, result.stderr[-3000:]
    assert said in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run((tmp_path / "run" / "mlflow_run_id").read_text())
    assert run.info.status == status


def test_torchrun_stops_once_when_stops_arrive_together(tmp_path: Path) -> None:
    """A hangup, the launcher's SIGTERM and a Ctrl-C that land before torchrun's handler has run: the first stops the
    ranks, the others are dropped without CPython's "ignored due to race condition" traceback (CI saw it once)."""
    rank = tmp_path / "rank.py"
    rank.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(print('rank stopped', flush=True)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [PYTHON, "-m", "faceforge.train.torchrun", "--nproc-per-node=1", str(rank)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        for stop in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "rank stopped" in out and "Traceback" not in err, err[-3000:]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--resume"], "--resume needs the run's folder"),
        (["--resume", "{empty}"], "not a training run's folder"),
        (["--resume={run}", "-m", "optim.lr=0.1,0.2"], "cannot be a sweep"),
        (["--resume", "{run}", "hydra.run.dir=/elsewhere"], "drop hydra.run.dir=/elsewhere"),
    ],
)
def test_a_resume_is_refused_in_one_line_when_it_cannot_continue_the_run(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text("- model.width=0.25\n")
    (tmp_path / "empty").mkdir()
    argv = [word.format(run=tmp_path / "run", empty=tmp_path / "empty") for word in arguments]
    result = run_cli(*argv)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("faceforge train: error: ") and message in line


def test_a_resume_before_the_runs_first_checkpoint_starts_from_where_the_run_did(tmp_path: Path) -> None:
    """A run started from another run's checkpoint and stopped before its own first one: a resume from random
    weights would silently lose what it was started from."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    started_from = f"trainer.resume={tmp_path}/other/checkpoints/step_00000002"
    (run / ".hydra" / "overrides.yaml").write_text(f"- model.width=0.25\n- {started_from}\n")
    assert started_from in resume_arguments(["--resume", str(run)])
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_00000040")
    arguments = resume_arguments(["--resume", str(run)])
    assert "trainer.resume=auto" in arguments and started_from not in arguments


def test_a_resumed_distillation_keeps_its_recorded_preset() -> None:
    assert distill_overrides(["--resume", "runs/train/x"]) == ["--resume", "runs/train/x"]


@contextlib.contextmanager
def small_disk(where: Path, size: int) -> Iterator[Path]:
    """A real filesystem of `size` bytes (tmpfs) at `where`: how a test fills a disk. Needs root, as CI runs."""
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(tiny_train_root: Path, tmp_path: Path) -> None:
    sized = run_cli(*tiny_cli_run(tiny_train_root, tmp_path / "sized", "trainer.steps=2"))
    assert sized.returncode == 0, sized.stderr[-3000:]
    one_checkpoint = sum(f.stat().st_size for f in (tmp_path / "sized" / "checkpoints").rglob("*") if f.is_file())
    with small_disk(tmp_path / "disk", one_checkpoint * 3 // 2 + 256 * 1024) as disk:  # step 2 fits, step 4 not
        out = disk / "run"
        result = run_cli(*tiny_cli_run(tiny_train_root, out, "trainer.steps=4", "trainer.checkpoint_every=2"))
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("step 4's checkpoint was not written: ") and "is the disk full?" in last, last
        assert last.endswith(f"resume with: faceforge train --resume {out}")
        assert resolve_checkpoint(out / "checkpoints").name == "step_00000002"
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_an_unreadable_training_image_stops_every_rank_with_a_checkpoint(
    nproc: int, tiny_train_root: Path, tmp_path: Path
) -> None:
    """The rank that meets the file and its peers stop at the same step (a peer would otherwise wait in the next
    collective), the steps done are checkpointed, and once the file is fixed the run resumes from them."""
    root = tmp_path / "faces"
    shutil.copytree(tiny_train_root, root)
    corrupt = sorted(root.iterdir())[2] / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a JPEG")
    cfg = tiny_config(tmp_path / "run", root, None, nproc=nproc, steps=30, checkpoint_every=1000)
    # With torchrun the ranks report the file above the launcher's line.
    reported = "training ranks exited with code 1" if nproc > 1 else r"corrupt\.jpg: not a decodable image"
    with pytest.raises(SystemExit, match=reported):
        launch(cfg)
    stopped = resolve_checkpoint(tmp_path / "run" / "checkpoints")
    step = json.loads((stopped / "meta.json").read_text())["step"]
    assert step < 30
    shutil.copy(next(corrupt.parent.glob("0*.jpg")), corrupt)
    cfg.trainer.resume = "auto"
    launch(cfg)
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000030"


@pytest.mark.parametrize("keep", [False, True])
def test_keep_freed_memory_stops_freed_activations_going_back_to_the_kernel(keep: bool) -> None:
    """A freed 64 MiB block stays resident only with the trainer's malloc settings (glibc would munmap it)."""
    script = f"""
import os
import torch
from faceforge.train.allocator import keep_freed_memory
if {keep}:
    assert keep_freed_memory()
def resident() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
torch.ones(16).sum()  # torch's lazy start-up allocations, outside the measurement
before = resident()
block = torch.ones(16 * 2**20)  # 64 MiB, written so that it is resident
del block
print((resident() - before) / 2**20)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    kept_mib = float(result.stdout)
    assert (kept_mib > 60) if keep else (kept_mib < 32), kept_mib


def test_mixed_precision_training_runs_to_a_checkpoint(tiny_train_root: Path, tmp_path: Path) -> None:
    """trainer.amp=true: bfloat16 autocast and head matmuls; the weights, head shard included, stay float32."""
    out = tmp_path / "run"
    args = tiny_cli_run(tiny_train_root, out, "trainer.steps=3", "trainer.amp=true")
    result = run_cli(*args, env={"FACEFORGE_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    tensors = checkpoint_tensors(out / "checkpoints")
    floats = {name: t for name, t in tensors.items() if t.is_floating_point()}
    assert floats and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in floats.values())
