"""The sharded margin softmax against a single-process full-FC reference, on real gloo process groups."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from faceforge.heads import MarginSpec, margin_spec
from faceforge.parallel import HeadOptimizer, ShardedMarginSoftmax, shard_range

from distributed import run_ranks

NUM_CLASSES, DIM, BATCH = 23, 16, 5  # 23 % W != 0 for W = 2, 3
MARGINS = ["arcface", "cosface", "softmax"]
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def reference_loss(features: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: MarginSpec):
    """Straightforward full-FC margin softmax with ordinary autograd."""
    if margin.normalized:
        cos = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T
        rows = torch.arange(len(labels))
        target = margin.target_logit(cos[rows, labels])
        logits = cos.index_put((rows, labels), target) * margin.scale
    else:
        logits = features @ weight.T
    return F.cross_entropy(logits, labels)


def make_problem(world_size: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(world_size * BATCH, DIM, generator=gen, dtype=dtype)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=gen)
    return features, weight, labels


def check_head_matches_reference(rank: int, world_size: int, margin_name: str, dtype: torch.dtype) -> None:
    margin = margin_spec(margin_name)
    features, weight, labels = make_problem(world_size, dtype)
    ref_features, ref_weight = features.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss = reference_loss(ref_features, ref_weight, labels, margin)
    ref_loss.backward()

    head = ShardedMarginSoftmax(NUM_CLASSES, DIM, margin, dtype=dtype)
    start, end = shard_range(NUM_CLASSES, world_size, rank)
    assert (head.class_start, head.class_end) == (start, end)
    head.weight.copy_(weight[start:end])
    local = slice(rank * BATCH, (rank + 1) * BATCH)
    local_features = features[local].clone().requires_grad_()
    loss = head(local_features, labels[local])
    loss.backward()

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(loss, ref_loss.detach(), **tol)
    # The all-gather's backward scales by W so that DDP's averaging restores the global gradient.
    torch.testing.assert_close(local_features.grad / world_size, ref_features.grad[local], **tol)
    assert head.grad_rows() is None
    torch.testing.assert_close(head.grad, ref_weight.grad[start:end], **tol)


def check_every_margin_and_dtype(rank: int, world_size: int) -> None:
    for margin_name in MARGINS:
        for dtype in (torch.float64, torch.float32):
            check_head_matches_reference(rank, world_size, margin_name, dtype)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_head_matches_full_fc(world_size: int) -> None:
    """ArcFace, CosFace and softmax in float64 and float32 (one process group per W keeps it quick)."""
    run_ranks(check_every_margin_and_dtype, world_size)


def test_shard_range_covers_classes_unevenly() -> None:
    ranges = [shard_range(10, 3, r) for r in range(3)]
    assert ranges == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="classes >= ranks"):
        shard_range(2, 3, 0)


def test_margin_continues_monotonically_past_pi() -> None:
    margin = margin_spec("arcface", m2=0.9)
    cos = torch.cos(torch.linspace(0.0, torch.pi, 2001, dtype=torch.float64))
    psi = margin.target_logit(cos)
    assert torch.all(psi[1:] < psi[:-1]), "ψ must keep decreasing as θ grows, also past θ + m = π"
    # continuity at θ + m = π, where the plain cosine would turn back up
    theta = torch.tensor([torch.pi - 0.9 - 1e-6, torch.pi - 0.9 + 1e-6], dtype=torch.float64)
    assert abs(float(margin.target_logit(torch.cos(theta)).diff())) < 1e-4


def check_partial_fc(rank: int, world_size: int, sample_rate: float) -> None:
    margin = margin_spec("arcface")
    features, weight, labels = make_problem(world_size, torch.float64, seed=1)
    start, end = shard_range(NUM_CLASSES, world_size, rank)
    head = ShardedMarginSoftmax(NUM_CLASSES, DIM, margin, sample_rate=sample_rate, dtype=torch.float64, seed=3)
    head.weight.copy_(weight[start:end])
    rows, _ = head._sample(labels)
    head.steps_sampled = 0  # replay the same draw in forward
    local_positives = torch.unique(labels[(labels >= start) & (labels < end)]) - start
    assert torch.isin(local_positives, rows).all(), "every positive class must be sampled"
    assert len(rows) >= round(sample_rate * head.num_local)

    local = slice(rank * BATCH, (rank + 1) * BATCH)
    local_features = features[local].clone().requires_grad_()
    loss = head(local_features, labels[local])
    loss.backward()

    # Reference: full FC restricted to the union of every rank's sampled classes.
    all_rows = [torch.empty(0, dtype=torch.long)] * world_size
    torch.distributed.all_gather_object(all_rows, rows + start)
    kept = torch.cat(all_rows)
    ref_features, ref_weight = features.clone().requires_grad_(), weight[kept].clone().requires_grad_()
    remap = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    ref_loss = reference_loss(ref_features, ref_weight, remap[labels], margin)
    ref_loss.backward()
    tol = TOLERANCE[torch.float64]
    torch.testing.assert_close(loss, ref_loss.detach(), **tol)
    torch.testing.assert_close(local_features.grad / world_size, ref_features.grad[local], **tol)
    mine = (kept >= start) & (kept < end)
    torch.testing.assert_close(head.grad[rows], ref_weight.grad[mine], **tol)
    expected_rows = None if len(rows) == head.num_local else rows
    got_rows = head.grad_rows()
    assert (got_rows is None) if expected_rows is None else torch.equal(got_rows, expected_rows)


def check_partial_fc_rates(rank: int, world_size: int) -> None:
    for sample_rate in (0.3, 0.999):
        check_partial_fc(rank, world_size, sample_rate)


@pytest.mark.parametrize("world_size", [1, 2])
def test_partial_fc_keeps_positives_and_matches_reference(world_size: int) -> None:
    run_ranks(check_partial_fc_rates, world_size)


Train = Callable[[ShardedMarginSoftmax, HeadOptimizer, torch.Tensor, torch.Tensor], None]


def check_sampling_every_row_equals_dense(margin_name: str, seed: int, world_size: int, train: Train) -> None:
    """r = 1 takes the dense path and r = 0.9999 samples every row through the sparse one: after
    `train(head, optimizer, features, labels)` both must hold the same weight and feature gradient."""
    features, weight, labels = make_problem(world_size, torch.float64, seed=seed)
    results = []
    for rate in (1.0, 0.9999):
        head = ShardedMarginSoftmax(NUM_CLASSES, DIM, margin_spec(margin_name), sample_rate=rate, dtype=torch.float64)
        head.weight.copy_(weight)
        optimizer = HeadOptimizer(head, kind="sgd", momentum=0.9, weight_decay=5e-4)
        feats = features.clone().requires_grad_()
        train(head, optimizer, feats, labels)
        results.append((head.weight.clone(), feats.grad.clone()))
    for dense, sampled in zip(*results, strict=True):
        torch.testing.assert_close(dense, sampled, rtol=1e-12, atol=1e-12)


def test_sample_rate_one_equals_sampling_every_class() -> None:
    def train(head: ShardedMarginSoftmax, optimizer: HeadOptimizer, feats: torch.Tensor, labels: torch.Tensor) -> None:
        for _ in range(2):
            head(feats, labels).backward()
            optimizer.step(lr=0.1)

    check_sampling_every_row_equals_dense("cosface", seed=2, world_size=1, train=train)


def test_labels_outside_the_classes_are_refused() -> None:
    head = ShardedMarginSoftmax(10, 8, margin_spec("arcface"))
    for labels in ([0, 10], [-1, 3]):
        with pytest.raises(ValueError, match="outside the head's 10 classes"):
            head(torch.randn(2, 8), torch.tensor(labels))


def test_pending_steps_each_see_the_other_steps_update() -> None:
    """When two steps are pending and the first one's backward updates the weight, the second must use and update
    the new rows under Partial FC as r = 1 does: reusing rows gathered in its forward would undo the first update."""

    def train(head: ShardedMarginSoftmax, optimizer: HeadOptimizer, feats: torch.Tensor, labels: torch.Tensor) -> None:
        losses = [head(feats[half], labels[half]) for half in (slice(0, BATCH), slice(BATCH, None))]
        for loss in losses:
            optimizer.step_in_next_backward(lr=0.1)
            loss.backward()

    check_sampling_every_row_equals_dense("arcface", seed=5, world_size=2, train=train)


@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_bfloat16_matmuls_stay_close_to_float32(rate: float) -> None:
    """trainer.amp's head: bfloat16 operands, float32 softmax; close to the float32 head but not equal to it."""
    gen = torch.Generator().manual_seed(4)
    num_classes, dim, batch = 2000, 128, 64
    features = torch.randn(batch, dim, generator=gen)
    weight = torch.randn(num_classes, dim, generator=gen)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    results = []
    for matmul_dtype in (torch.float32, torch.bfloat16):
        head = ShardedMarginSoftmax(num_classes, dim, margin_spec("arcface"), rate, matmul_dtype=matmul_dtype)
        head.weight.copy_(weight)
        feats = features.clone().requires_grad_()
        loss = head(feats, labels)
        loss.backward()
        assert head.weight.dtype == head.grad.dtype == loss.dtype == feats.grad.dtype == torch.float32
        rows = head.grad_rows()
        results.append((loss.detach(), feats.grad, head.grad if rows is None else head.grad[rows]))
    (loss32, feats32, weight32), (loss16, feats16, weight16) = results
    torch.testing.assert_close(loss16, loss32, rtol=1e-3, atol=0.0)
    assert not torch.equal(feats16, feats32), "the bfloat16 path must actually round its operands"
    for grad16, grad32 in ((feats16, feats32), (weight16, weight32)):
        assert F.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("rate", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_step_in_backward_equals_step_after_backward(kind: str, rate: float) -> None:
    """The fused step must give the same bits as backward-then-step, for dense and Partial FC steps, and hold
    no gradient buffer; rows span several blocks so the per-block updates are exercised."""
    gen = torch.Generator().manual_seed(3)
    classes, dim, batch = 5000, 24, 12
    features = torch.randn(batch, dim, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    results = []
    for in_backward in (False, True):
        head = ShardedMarginSoftmax(classes, dim, margin_spec("arcface"), sample_rate=rate)
        optimizer = HeadOptimizer(head, kind=kind, momentum=0.9, weight_decay=5e-4)
        feats = features.clone().requires_grad_()
        for step in range(3):
            if in_backward:
                optimizer.step_in_next_backward(lr=0.1 * (step + 1))
            head(feats, labels).backward()
            if not in_backward:
                optimizer.step(lr=0.1 * (step + 1))
        assert not head.has_grad
        results.append((head.weight, feats.grad, optimizer.state, optimizer.step_count, head.grad))
    (weight, grad, state, count, _), (fused_weight, fused_grad, fused_state, fused_count, fused_head_grad) = results
    assert torch.equal(weight, fused_weight) and torch.equal(grad, fused_grad) and count == fused_count == 3
    assert all(torch.equal(state[name], fused_state[name]) for name in state)
    assert fused_head_grad is None


def test_step_in_backward_refuses_a_pending_gradient() -> None:
    head = ShardedMarginSoftmax(NUM_CLASSES, DIM, margin_spec("arcface"))
    optimizer = HeadOptimizer(head)
    head(torch.randn(BATCH, DIM, requires_grad=True), torch.randint(0, NUM_CLASSES, (BATCH,))).backward()
    with pytest.raises(RuntimeError, match="already holds a gradient"):
        optimizer.step_in_next_backward(lr=0.1)


class TinyNet(nn.Module):
    """BN-free backbone so per-rank statistics cannot differ from the single-process run."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 3 * 3, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _training_problem(world_size: int):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    net = TinyNet().double()
    images = torch.randn(world_size * BATCH, 3, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=gen)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen, dtype=torch.float64)
    return net, images, labels, weight


def check_ddp_step(rank: int, world_size: int, kind: str, in_backward: bool) -> None:
    steps, lr = 3, 0.05
    margin = margin_spec("arcface")
    net, images, labels, weight = _training_problem(world_size)

    ref_net, ref_weight = copy.deepcopy(net), nn.Parameter(weight.clone())
    params = [*ref_net.parameters(), ref_weight]
    ref_opt = (
        torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
        if kind == "sgd"
        else torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
    )
    for _ in range(steps):
        ref_opt.zero_grad()
        reference_loss(ref_net(images), ref_weight, labels, margin).backward()
        ref_opt.step()

    ddp = DistributedDataParallel(net)
    head = ShardedMarginSoftmax(NUM_CLASSES, DIM, margin, dtype=torch.float64)
    start, end = shard_range(NUM_CLASSES, world_size, rank)
    head.weight.copy_(weight[start:end])
    opt = (
        torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        if kind == "sgd"
        else torch.optim.AdamW(ddp.parameters(), lr=lr, weight_decay=5e-4)
    )
    head_opt = HeadOptimizer(head, kind=kind, momentum=0.9, weight_decay=5e-4)
    local = slice(rank * BATCH, (rank + 1) * BATCH)
    for _ in range(steps):
        opt.zero_grad()
        if in_backward:
            head_opt.step_in_next_backward(lr)
        head(ddp(images[local]), labels[local]).backward()
        opt.step()
        if not in_backward:
            head_opt.step(lr)

    tol = TOLERANCE[torch.float64]
    for got, want in zip(ddp.module.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(head.weight, ref_weight.detach()[start:end], **tol)


def check_ddp_step_both_optimizers(rank: int, world_size: int) -> None:
    for kind in ("sgd", "adamw"):
        for in_backward in (False, True):
            check_ddp_step(rank, world_size, kind, in_backward)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ddp_plus_sharded_head_equals_single_process_training(world_size: int) -> None:
    run_ranks(check_ddp_step_both_optimizers, world_size)
