"""Distillation: frozen teacher, projection kept out of the saved model, losses, feature cache, two ranks, errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import nn

from faceforge import models
from faceforge.data import EvalTransform, open_dataset
from faceforge.distill import (
    Distiller,
    DistillLoss,
    centre_classifier,
    load_teacher,
    teacher_identity,
    teacher_table,
)
from faceforge.distill.cli import distill_overrides
from faceforge.distill.distiller import STATE_FILE, make_projection
from faceforge.heads import margin_spec
from faceforge.jobs.spec import compose_config
from faceforge.parallel import DistContext, ShardedMarginSoftmax, all_reduce_sum
from faceforge.train import ConfigError, TrainConfig, from_dict
from faceforge.train import launch as launch_module
from faceforge.train.checkpoint import load_backbone, resolve_checkpoint, save_checkpoint
from faceforge.train.launch import launch
from faceforge.train.loop import train_transform
from faceforge.train.tracking import RunTracker, create_run

from conftest import REPO, tiny_config
from distributed import run_ranks

TEACHER_DIM, TEACHER_SIZE = 16, 64
ONE_PROCESS = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def save_teacher(directory: Path, seed: int, dim: int = TEACHER_DIM) -> Path:
    """A real backbone checkpoint, wider input than the tiny student (56 px) and by default a narrower embedding."""
    torch.manual_seed(seed)
    model = models.create("mobilefacenet", embedding_dim=dim, width=0.25, input_size=TEACHER_SIZE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(
        directory, 0, model=model, optimizer=optimizer, head=None, head_optimizer=None, train_config={}, is_main=True
    )
    return directory


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher"), seed=1)


def distill_config(
    out: Path, train_root: Path, teacher: Path, *, trainer: dict | None = None, **distill: object
) -> TrainConfig:
    values = tiny_config(out, train_root, None, **(trainer or {})).to_dict()
    values["distill"] = {"teacher": str(teacher), "cache_dir": str(out.parent / "cache"), **distill}
    return from_dict(values)


def state_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def test_teacher_is_frozen_while_the_student_trains(tiny_train_root: Path, teacher: Path, tmp_path: Path) -> None:
    cfg = distill_config(tmp_path / "run", tiny_train_root, teacher, embedding_weight=1.0, centre_weight=1.0)
    dataset = open_dataset(tiny_train_root, train_transform(cfg))
    distiller = Distiller(cfg, dataset, ONE_PROCESS)
    assert distiller.teacher is not None and not distiller.teacher.training
    before = state_snapshot(distiller.teacher)
    student = models.create("mobilefacenet", embedding_dim=32, width=0.25, input_size=56).train()
    head = ShardedMarginSoftmax(dataset.num_classes, 32, margin_spec("arcface"))
    loss_fn = distiller.wrap(head)
    optimizer = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=0.1)
    for step in range(2):
        images, labels = zip(*(dataset[(i, step)] for i in range(8)), strict=True)
        images, labels = torch.stack(images), torch.tensor(labels)
        optimizer.zero_grad()
        loss_fn(student(images), labels, distiller.teacher_features(images, torch.arange(8))).backward()
        optimizer.step()
    assert not distiller.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in distiller.teacher.parameters())
    after = distiller.teacher.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before), "teacher weights or BN statistics moved"
    assert distiller.projection.weight.grad is not None  # 32 -> 16 projection trains with the student


def test_projection_trains_but_is_dropped_from_the_saved_model(
    tiny_train_root: Path, teacher: Path, tmp_path: Path
) -> None:
    cfg = distill_config(tmp_path / "run", tiny_train_root, teacher, trainer={"steps": 2}, embedding_weight=1.0)
    launch(cfg)
    saved = resolve_checkpoint(tmp_path / "run" / "checkpoints")
    model_state = torch.load(saved / "model.pt", weights_only=True)["model"]
    fresh = models.create("mobilefacenet", embedding_dim=32, width=0.25, input_size=56)
    assert model_state.keys() == fresh.state_dict().keys()
    assert load_backbone(saved)(torch.zeros(2, 3, 56, 56)).shape == (2, 32)
    projection = torch.load(saved / STATE_FILE, weights_only=True)["projection"]["weight"]
    assert projection.shape == (TEACHER_DIM, 32)
    assert not torch.equal(projection, make_projection(32, TEACHER_DIM, cfg.seed).weight)

    # A resumed run picks the projection up again and keeps training.
    resumed = distill_config(
        tmp_path / "run", tiny_train_root, teacher, trainer={"steps": 3, "resume": "auto"}, embedding_weight=1.0
    )
    launch(resumed)
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000003"


def test_a_checkpoint_is_published_only_with_its_distillation_state(tmp_path: Path) -> None:
    """`latest` never names a checkpoint that lacks distill.pt (a kill between the two writes used to leave one that
    no resume could load): an extra file that fails to save keeps the checkpoint from being published."""
    model = models.create("mobilefacenet", embedding_dim=8, width=0.25, input_size=56)
    common = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), head=None, head_optimizer=None)
    save_checkpoint(tmp_path, 1, **common, train_config={}, is_main=True, extra={STATE_FILE: {"teacher": "a"}})
    assert torch.load(resolve_checkpoint(tmp_path) / STATE_FILE, weights_only=True) == {"teacher": "a"}
    with pytest.raises(Exception, match="lambda"):  # cannot be pickled: the save fails after model.pt was written
        save_checkpoint(tmp_path, 2, **common, train_config={}, is_main=True, extra={STATE_FILE: {"f": lambda: 0}})
    assert resolve_checkpoint(tmp_path).name == "step_00000001" and sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_00000001",
    ]


def test_resuming_against_a_changed_teacher_is_refused(tiny_train_root: Path, tmp_path: Path) -> None:
    """The teacher is resolved again on resume; weights other than those the projection learnt to match (a checkpoint
    retrained in place, an alias moved) are one line, not a size mismatch deep in the run or a silent switch."""
    teacher = save_teacher(tmp_path / "teacher", seed=1)
    launch(distill_config(tmp_path / "run", tiny_train_root, teacher, trainer={"steps": 2}, embedding_weight=1.0))
    save_teacher(teacher, seed=2)
    resumed = distill_config(
        tmp_path / "run", tiny_train_root, teacher, trainer={"steps": 3, "resume": "auto"}, embedding_weight=1.0
    )
    with pytest.raises(ConfigError, match=r"was distilled from teacher weights-sha256:.* now holds other weights"):
        launch(resumed)
    # A checkpoint from before weight hashes named its teacher by file hash: it resumes, unchecked.
    [checkpoint] = (tmp_path / "run" / "checkpoints").glob("step_*")
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    torch.save(state | {"teacher": "sha256:0123"}, checkpoint / STATE_FILE)
    launch(resumed)
    latest = resolve_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest.name == "step_00000003"
    (latest / STATE_FILE).write_bytes((latest / STATE_FILE).read_bytes()[:200])  # cut short by a full disk
    resumed.trainer.steps = 4
    with pytest.raises(ConfigError, match=r"trainer\.resume: .*distill\.pt is not a readable distillation state"):
        launch(resumed)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_teacher_changed_after_the_launchers_check_is_refused_by_the_rank(
    tiny_train_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, nproc: int
) -> None:
    """The launcher checks its own copy of the teacher; the one the rank loads to train with is checked again, so
    weights that change in between (a teacher still training into its folder) cannot be taken up silently. Ranks
    under torchrun refuse in one line each, as the launcher would, not with their tracebacks and torchrun's."""
    teacher = save_teacher(tmp_path / "teacher", seed=1)
    launch(distill_config(tmp_path / "run", tiny_train_root, teacher, trainer={"steps": 2}, embedding_weight=1.0))
    check = launch_module.check_distill_resume

    def check_then_retrain_teacher(cfg: TrainConfig, path: Path) -> None:
        check(cfg, path)
        save_teacher(teacher, seed=2)

    monkeypatch.setattr(launch_module, "check_distill_resume", check_then_retrain_teacher)
    resumed = distill_config(
        tmp_path / "run",
        tiny_train_root,
        teacher,
        trainer={"steps": 3, "resume": "auto", "nproc": nproc, "threads": 1},
        embedding_weight=1.0,
    )
    refused = r"was distilled from teacher weights-sha256:.* now holds other weights"
    if nproc == 1:
        with pytest.raises(ConfigError, match=refused):
            launch(resumed)
    else:
        capfd.readouterr()
        with pytest.raises(SystemExit, match="training ranks exited with code 2"):
            launch(resumed)
        err = capfd.readouterr().err
        assert re.search(rf"^faceforge train: error: trainer\.resume .*{refused}", err, re.M), err
        assert "Traceback" not in err, err
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000002"


def test_switching_distillation_on_or_off_on_resume_is_refused(tiny_train_root: Path, tmp_path: Path) -> None:
    """The projection's parameters are in the optimizer's state: one line instead of a load_state_dict traceback."""
    teacher = save_teacher(tmp_path / "teacher", seed=1)
    launch(tiny_config(tmp_path / "plain", tiny_train_root, None, steps=2))
    resume = {"steps": 3, "resume": "auto"}
    turned_on = distill_config(tmp_path / "plain", tiny_train_root, teacher, trainer=resume, embedding_weight=1.0)
    with pytest.raises(ConfigError, match=r"this run would add a distillation projection, whose weights are in the"):
        launch(turned_on)
    launch(distill_config(tmp_path / "distilled", tiny_train_root, teacher, trainer={"steps": 2}, embedding_weight=1.0))
    turned_off = tiny_config(tmp_path / "distilled", tiny_train_root, None, steps=3, resume="auto")
    with pytest.raises(ConfigError, match=r"this run would drop the distillation projection"):
        launch(turned_off)
    # A teacher as wide as the student needs no projection: distillation may come and go.
    same_width = save_teacher(tmp_path / "same_width", seed=3, dim=32)
    launch(distill_config(tmp_path / "plain", tiny_train_root, same_width, trainer=resume, embedding_weight=1.0))
    launch(tiny_config(tmp_path / "plain", tiny_train_root, None, steps=4, resume="auto"))
    assert resolve_checkpoint(tmp_path / "plain" / "checkpoints").name == "step_00000004"
    (cache_file := tmp_path / "cache_file").write_text("")
    cached = distill_config(tmp_path / "new", tiny_train_root, teacher, embedding_weight=1.0, cache=True)
    cached.distill.cache_dir = str(cache_file)
    with pytest.raises(ConfigError, match=r"distill\.cache_dir .*cache_file is a file, not a folder"):
        launch(cached)
    cached.distill.cache_dir = str(cache_file / "cache")  # before the teacher's pass over the data, not after it
    with pytest.raises(ConfigError, match=r"distill\.cache_dir .*cache_file/cache cannot be made a folder: Not a dir"):
        launch(cached)
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_train_root, damaged)
    (next(damaged.iterdir()) / "zz_broken.jpg").write_bytes(b"not a jpeg")
    cached = distill_config(tmp_path / "new", damaged, teacher, embedding_weight=1.0, cache=True)
    with pytest.raises(SystemExit, match=r"zz_broken\.jpg: not a decodable image.*: the teacher's features need every"):
        launch(cached)


def test_embedding_loss_decreases_and_is_logged(tiny_train_root: Path, teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    values = distill_config(out, tiny_train_root, teacher, head_weight=0.0, embedding_weight=1.0).to_dict()
    values["data"] |= {"batch_size": 24, "augment": {"flip": False, "lowres_prob": 0.0, "jitter": 0.0}}
    values["optim"] = {"name": "adamw", "lr": 0.01, "weight_decay": 0.0}
    values["trainer"] |= {"steps": 8, "checkpoint_every": 8}
    launch(from_dict(values))  # every step sees all 24 images unaugmented, so the losses are comparable
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = (out / "mlflow_run_id").read_text()
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "distill.embedding"), key=lambda m: m.step)]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses
    params = client.get_run(run_id).data.params
    assert params["distill.teacher"] == str(teacher) and params["distill.embedding_weight"] == "1.0"


def test_feature_cache_is_reused_and_invalidated_by_a_new_teacher(
    tiny_train_root: Path, tmp_path: Path, teacher: Path
) -> None:
    dataset = open_dataset(tiny_train_root)
    cache = tmp_path / "cache"

    def table(source: Path, crop_fraction: float = 0.8):
        model = load_backbone(source)
        return teacher_table(
            model, dataset, crop_fraction, 8, 0, ONE_PROCESS, cache_dir=cache, teacher_id=teacher_identity(model)
        )

    first = table(teacher)
    assert not first.reused and first.path is not None and first.path.is_file()
    image = EvalTransform(TEACHER_SIZE, 0.8)(dataset.read_image(5))[None]
    expected = F.normalize(load_backbone(teacher)(image), dim=1)[0]
    torch.testing.assert_close(torch.from_numpy(first.rows[5].copy()), expected, atol=1e-5, rtol=1e-4)

    again = table(teacher)
    assert again.reused and again.path == first.path
    assert (again.rows == first.rows).all()

    # Retraining into the same folder changes the checkpoint's bytes, hence the key.
    retrained = tmp_path / "teacher"
    shutil.copytree(teacher, retrained)
    assert table(retrained).reused  # a copy of the same weights is the same teacher
    shutil.rmtree(retrained)
    save_teacher(retrained, seed=2)
    changed = table(retrained)
    assert not changed.reused and changed.path != first.path
    assert not table(teacher, crop_fraction=1.0).reused  # the crop is part of the key too
    assert table(teacher).reused and len(list(cache.glob("*.npy"))) == 3

    with open(first.path, "r+b") as cut_short:  # a disk that filled up while another run wrote it
        cut_short.truncate(500)
    with pytest.raises(ConfigError, match=r"distill\.cache_dir: .*\.npy cannot be read .*; delete it"):
        table(teacher)


def test_registered_teacher_is_frozen_and_its_identity_follows_its_weights_not_its_name(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client, cpu = MlflowClient(uri), torch.device("cpu")

    def identity(source: str) -> str:
        return teacher_identity(load_teacher(source, uri, cpu))

    run_id = create_run(uri, "tests", "teacher", {}, {})
    RunTracker(uri, run_id).model(load_backbone(save_teacher(tmp_path / "ckpt", seed=1)), TEACHER_SIZE, step=1)
    for _ in range(2):
        mlflow.register_model(f"runs:/{run_id}/model", "teacher")
    client.set_registered_model_alias("teacher", "champion", "1")
    teacher = load_teacher("models:/teacher@champion", uri, cpu)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    first = identity("models:/teacher@champion")
    assert first == teacher_identity(load_backbone(tmp_path / "ckpt")) == identity(f"runs:/{run_id}/model")
    client.set_registered_model_alias("teacher", "champion", "2")
    assert identity("models:/teacher@champion") == first  # another version of the same weights: the same features

    # A resumed run logs its model again under the same runs:/ URI; a model registered anew restarts at version 1.
    RunTracker(uri, run_id).model(load_backbone(save_teacher(tmp_path / "ckpt", seed=2)), TEACHER_SIZE, step=1)
    relogged = identity(f"runs:/{run_id}/model")
    assert relogged != first
    client.delete_registered_model("teacher")
    assert str(mlflow.register_model(f"runs:/{run_id}/model", "teacher").version) == "1"
    assert identity("models:/teacher/1") == relogged != first
    with pytest.raises(ConfigError, match=r"distill\.teacher: models:/teacher@nope: .*alias nope not found"):
        load_teacher("models:/teacher@nope", uri, torch.device("cpu"))
    (tmp_path / "foreign").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "foreign" / "model.pt")  # another project's checkpoint
    with pytest.raises(ConfigError, match=r"distill\.teacher: .*foreign/model\.pt .*not a FaceForge"):
        load_teacher(str(tmp_path / "foreign"), uri, torch.device("cpu"))


def _distiller_on_rank(rank: int, world_size: int, train_root: Path, teachers: list[Path], out: Path) -> None:
    """A Distiller built on this rank from `teachers[rank]`; what it said is written to out/rank_<rank>."""
    cfg = distill_config(out / "run", train_root, teachers[rank], embedding_weight=1.0)
    ctx = DistContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    try:
        Distiller(cfg, open_dataset(train_root, train_transform(cfg)), ctx)
        said = "built"
    except ConfigError as err:
        said = str(err)
    (out / f"rank_{rank}").write_text(said)


def test_ranks_that_loaded_different_teachers_all_refuse_to_train(tiny_train_root: Path, tmp_path: Path) -> None:
    """Each rank loads the teacher itself; one re-pointed or retrained between their loads would have ranks distil
    from different teachers, unseen. Every rank refuses, so none waits on the others in a collective."""
    same = save_teacher(tmp_path / "same", seed=1)
    run_ranks(_distiller_on_rank, 2, tiny_train_root, [same, same], tmp_path)
    assert [(tmp_path / f"rank_{rank}").read_text() for rank in range(2)] == ["built", "built"]
    other = save_teacher(tmp_path / "other", seed=2)
    run_ranks(_distiller_on_rank, 2, tiny_train_root, [same, other], tmp_path)
    for rank in range(2):
        assert "the ranks loaded different weights from distill.teacher" in (tmp_path / f"rank_{rank}").read_text()


def _distill_loss_grads(
    rank: int, world_size: int, out: str, student: nn.Linear, projection: nn.Module, centres: torch.Tensor
) -> None:
    """Backbone and projection gradients of the combined loss on this rank's share of one global batch."""
    torch.manual_seed(0)
    features, labels, teacher = torch.randn(8, 12), torch.randint(0, 5, (8,)), F.normalize(torch.randn(8, 6), dim=1)
    share = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    head = ShardedMarginSoftmax(5, 8, margin_spec("cosface"))
    head.weight.copy_(torch.randn(5, 8)[head.class_start : head.class_end])  # the same classifier at any W
    loss_fn = DistillLoss(
        head_loss=head,
        head_weight=1.0,
        projection=projection,
        embedding_weight=2.0,
        embedding_loss="l2",
        centres=centre_classifier(centres, s=16.0, m=0.3),
        centre_weight=0.5,
    )
    loss_fn(student(features[share]), labels[share], teacher[share]).backward()
    grads = [p.grad for module in (student, projection) for p in module.parameters()]
    for grad in grads:  # what DDP does for the backbone and Distiller.sync_gradients for the projection
        all_reduce_sum(grad).div_(world_size)
    if rank == 0:
        torch.save(grads, Path(out) / f"grads_{world_size}.pt")


def test_distill_loss_gradients_match_between_one_and_two_ranks(tmp_path: Path) -> None:
    torch.manual_seed(1)
    student, projection = nn.Linear(12, 8), make_projection(8, 6, seed=0)
    centres = F.normalize(torch.randn(5, 6), dim=1)
    _distill_loss_grads(0, 1, str(tmp_path), student, projection, centres)
    student.zero_grad()
    projection.zero_grad()
    run_ranks(_distill_loss_grads, 2, str(tmp_path), student, projection, centres)
    one, two = torch.load(tmp_path / "grads_1.pt"), torch.load(tmp_path / "grads_2.pt")
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_rank_distill_run_with_cache_and_centres(tiny_train_root: Path, teacher: Path, tmp_path: Path) -> None:
    cfg = distill_config(
        tmp_path / "run",
        tiny_train_root,
        teacher,
        trainer={"nproc": 2, "steps": 3, "checkpoint_every": 3},
        embedding_weight=1.0,
        centre_weight=1.0,
        cache=True,
    )
    launch(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run((tmp_path / "run" / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED"
    assert {"loss", "distill.head", "distill.embedding", "distill.centre"} <= set(run.data.metrics)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    saved = resolve_checkpoint(tmp_path / "run" / "checkpoints")
    assert (saved / STATE_FILE).is_file() and load_backbone(saved)(torch.zeros(1, 3, 56, 56)).shape == (1, 32)


def test_faceforge_distill_is_train_with_a_preset() -> None:
    assert distill_overrides(["distill.teacher=t"]) == ["distill=embedding", "distill.teacher=t"]
    assert distill_overrides(["distill=arcdistill", "distill.teacher=t"]) == ["distill=arcdistill", "distill.teacher=t"]


def test_bad_teacher_is_one_clear_line(tiny_train_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"distill\.teacher must be set"):
        compose_config(["distill=embedding", f"data.root={tiny_train_root}"])
    # What `faceforge distill <overrides>` runs.
    command = "import sys; from faceforge.distill.cli import main; main(sys.argv[1:])"
    result = subprocess.run(
        [sys.executable, "-c", command, "distill.teacher=/nonexistent/teacher", f"data.root={tiny_train_root}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "FACEFORGE_HOME": str(tmp_path)},
        timeout=300,
    )
    assert result.returncode == 2
    assert "distill.teacher: no checkpoint at /nonexistent/teacher" in result.stderr
    mislabelled = save_teacher(tmp_path / "mislabelled", seed=1)
    model_file = resolve_checkpoint(mislabelled) / "model.pt"
    state = torch.load(model_file, weights_only=True)
    state["model_config"]["embedding_dim"] = 999  # a config that does not fit the weights
    torch.save(state, model_file)
    with pytest.raises(ConfigError, match=r"distill\.teacher: .*size mismatch"):
        load_teacher(str(mislabelled), None, torch.device("cpu"))
    assert result.stderr.strip().count("\n") == 0, result.stderr
