"""MagFace in the sharded margin softmax against a single-process full-FC MagFace, on real gloo process groups."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from faceforge.heads import MagFaceMargin, margin_spec
from faceforge.parallel import ShardedMarginSoftmax, shard_range
from faceforge.train import ConfigError

from distributed import run_ranks

NUM_CLASSES, DIM, BATCH = 23, 16, 5  # 23 % W != 0 for W = 2, 3
TOLERANCE = dict(rtol=1e-10, atol=1e-10)


def reference_magface(
    features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, magface: MagFaceMargin
) -> torch.Tensor:
    """MagFace written out from the paper with ordinary autograd: full FC, one process."""
    a = features.norm(dim=1).clamp(magface.l_a, magface.u_a)
    margin = magface.l_m + (magface.u_m - magface.l_m) * (a - magface.l_a) / (magface.u_a - magface.l_a)
    cos = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T
    rows = torch.arange(len(labels))
    angle = torch.acos(cos[rows, labels]) + margin
    assert bool((angle < math.pi).all()), "test data must stay where cos(θ + m) needs no continuation"
    logits = cos.index_put((rows, labels), torch.cos(angle)) * s
    g = a / magface.u_a**2 + 1.0 / a
    return F.cross_entropy(logits, labels) + magface.lambda_g * g.mean()


def make_problem(world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features near their class centres (θ + m < π), with norms spread over both clamps and the range between."""
    gen = torch.Generator().manual_seed(0)
    num = world_size * BATCH
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (num,), generator=gen)
    directions = F.normalize(weight[labels], dim=1) + 0.3 * torch.randn(num, DIM, generator=gen, dtype=torch.float64)
    norms = torch.linspace(5.0, 130.0, num, dtype=torch.float64)[torch.randperm(num, generator=gen)]
    return F.normalize(directions, dim=1) * norms[:, None], weight, labels


def check_against_reference(rank: int, world_size: int, lambda_g: float, sample_rate: float) -> None:
    margin = margin_spec("magface", lambda_g=lambda_g)
    assert margin.magface is not None
    features, weight, labels = make_problem(world_size)
    start, end = shard_range(NUM_CLASSES, world_size, rank)
    head = ShardedMarginSoftmax(NUM_CLASSES, DIM, margin, sample_rate=sample_rate, dtype=torch.float64, seed=3)
    head.weight.copy_(weight[start:end])
    rows, _ = head._sample(labels)
    head.steps_sampled = 0  # replay the same draw in forward
    rows = torch.arange(head.num_local) if rows is None else rows
    local_positives = torch.unique(labels[(labels >= start) & (labels < end)]) - start
    assert torch.isin(local_positives, rows).all(), "every positive class must be sampled"

    local = slice(rank * BATCH, (rank + 1) * BATCH)
    local_features = features[local].clone().requires_grad_()
    loss = head(local_features, labels[local])
    loss.backward()

    # Reference: full FC over the union of every rank's sampled classes (all classes without Partial FC).
    all_rows = [torch.empty(0, dtype=torch.long)] * world_size
    torch.distributed.all_gather_object(all_rows, rows + start)
    kept = torch.cat(all_rows)
    remap = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    ref_features, ref_weight = features.clone().requires_grad_(), weight[kept].clone().requires_grad_()
    ref_loss = reference_magface(ref_features, ref_weight, remap[labels], margin.s, margin.magface)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss.detach(), **TOLERANCE)
    # The all-gather's backward scales by W so that DDP's averaging restores the global gradient.
    grad = local_features.grad / world_size
    torch.testing.assert_close(grad, ref_features.grad[local], **TOLERANCE)
    mine = (kept >= start) & (kept < end)
    torch.testing.assert_close(head.grad[rows], ref_weight.grad[mine], **TOLERANCE)

    # The margin (and g) must move the norm: the radial gradient of an unclamped sample is not zero.
    norms = local_features.detach().norm(dim=1)
    radial = (grad * local_features.detach()).sum(dim=1) / norms
    inside = (norms > margin.magface.l_a) & (norms < margin.magface.u_a)
    assert inside.any()
    assert bool((radial[inside].abs() > 1e-6).all()), "the feature norm received no gradient"
    assert bool((radial[~inside].abs() < 1e-12).all()), "a clamped norm must receive no gradient"


def check_dense_and_partial_fc(rank: int, world_size: int) -> None:
    for lambda_g in (35.0, 0.0):  # with λ_g = 0 the norm's gradient comes from the margin alone
        check_against_reference(rank, world_size, lambda_g, sample_rate=1.0)
    check_against_reference(rank, world_size, 35.0, sample_rate=0.3)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_magface_matches_full_fc(world_size: int) -> None:
    """Loss, feature gradient (through the norm) and weight gradient, dense and under Partial FC, in float64."""
    run_ranks(check_dense_and_partial_fc, world_size)


def test_margin_and_regulariser_follow_the_paper() -> None:
    magface = MagFaceMargin()
    norms = torch.tensor([5.0, 10.0, 60.0, 110.0, 200.0], dtype=torch.float64)
    torch.testing.assert_close(magface.margin(norms), torch.tensor([0.45, 0.45, 0.625, 0.8, 0.8], dtype=torch.float64))
    g = magface.regularizer(torch.linspace(10.0, 110.0, 101, dtype=torch.float64))
    assert bool((g.diff() < 0).all()), "g must decrease on [l_a, u_a] so that it rewards a larger norm"
    torch.testing.assert_close(g[-1], torch.tensor(35.0 * 2.0 / 110.0, dtype=torch.float64))


def test_bad_magface_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="0 < l_a < u_a"):
        margin_spec("magface", l_a=120.0)
    with pytest.raises(ValueError, match="l_m <= u_m"):
        margin_spec("magface", l_m=0.9)
    with pytest.raises(ValueError, match="unknown parameter"):
        margin_spec("arcface", lambda_g=35.0)
    for bad in ({"u_a": math.inf}, {"u_m": math.inf}, {"lambda_g": math.nan}):
        with pytest.raises(ValueError, match="MagFace parameters must be finite"):
            margin_spec("magface", **bad)
    from faceforge.jobs.spec import compose_config  # not at the top: see test_magface_trains_end_to_end

    with pytest.raises(ConfigError, match="head: MagFace needs 0 < l_a < u_a"):
        compose_config(["head=magface", "head.u_a=5"])


def test_magface_trains_end_to_end(tiny_train_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Imported here, not at the top: every spawned rank imports this module, and Hydra and MLflow cost seconds each.
    from mlflow.tracking import MlflowClient

    from faceforge.jobs.spec import compose_config
    from faceforge.train.launch import launch

    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path))
    overrides = [
        "head=magface",
        "head.l_a=2.0",  # a 32-d embedding's norm starts near √32, below the default l_a
        "model=mobilefacenet",
        "model.width=0.25",
        "model.input_size=56",
        "model.embedding_dim=32",
        "trainer.steps=3",
        "trainer.nproc=1",
        f"data.root={tiny_train_root}",
        "data.batch_size=8",
        "data.num_workers=0",
        "eval=none",
        "trainer.log_every=1",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "mlflow.log_model=false",
    ]
    cfg = compose_config(overrides, output_dir=str(tmp_path / "run"))
    assert (cfg.head.preset, cfg.head.l_a, cfg.head.u_m, cfg.head.lambda_g) == ("magface", 2.0, 0.8, 35.0)
    launch(cfg)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    losses = [m.value for m in client.get_metric_history((tmp_path / "run" / "mlflow_run_id").read_text(), "loss")]
    assert len(losses) == 3 and all(math.isfinite(value) for value in losses)
