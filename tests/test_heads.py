"""Margin presets and the pair losses on hand-checkable batches."""

from __future__ import annotations

import math

import pytest
import torch

from faceforge.heads import batch_hard_triplet_loss, contrastive_loss, margin_spec


def test_presets_reduce_to_their_papers() -> None:
    cos = torch.tensor([0.8, 0.1, -0.5], dtype=torch.float64)
    theta = torch.acos(cos)
    torch.testing.assert_close(margin_spec("arcface").target_logit(cos), torch.cos(theta + 0.5))
    torch.testing.assert_close(margin_spec("cosface").target_logit(cos), cos - 0.4)
    sphere = margin_spec("sphereface").target_logit(cos[:1])
    torch.testing.assert_close(sphere, torch.cos(1.5 * theta[:1]))
    assert margin_spec("softmax").target_logit(cos) is cos
    with pytest.raises(ValueError, match="unknown margin head"):
        margin_spec("magic")
    with pytest.raises(ValueError, match="m1 >= 1"):
        margin_spec("arcface", m1=0.5)
    for bad in ({"s": math.nan}, {"s": math.inf}, {"m1": math.nan}, {"m2": math.nan}, {"m3": math.inf}):
        with pytest.raises(ValueError, match="must be finite"):
            margin_spec("arcface", **bad)
    with pytest.raises(ValueError, match="plain softmax has no scale or margin"):
        margin_spec("softmax", s=64.0)


def test_angular_margins_have_finite_gradients_in_half_precision() -> None:
    """A feature on its class centre has cosine 1: the acos clamp must hold in bfloat16 and float16 too."""
    for dtype in (torch.bfloat16, torch.float16):
        for name in ("arcface", "sphereface", "combined"):
            cos = torch.tensor([1.0, 0.999, 0.3], dtype=dtype, requires_grad=True)
            logit = margin_spec(name).target_logit(cos)
            assert logit.dtype == dtype
            logit.sum().backward()
            assert cos.grad is not None and torch.isfinite(cos.grad).all(), (dtype, name, cos.grad)


def _unit(angles_deg: list[float]) -> torch.Tensor:
    rad = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)


def test_batch_hard_triplet_picks_farthest_positive_and_nearest_negative() -> None:
    emb = _unit([0.0, 60.0, 90.0, 180.0])
    labels = torch.tensor([0, 0, 1, 1])
    chord = lambda deg: 2 * math.sin(math.radians(deg) / 2)  # noqa: E731 - distance between unit vectors
    # anchor 0: pos 60°, nearest neg 90°; anchor 1: pos 60°, neg 30°; anchor 2: pos 90°, neg 30°;
    # anchor 3: pos 90°, neg 120°.
    expected = [
        max(0.0, chord(60) - chord(90) + 0.3),
        max(0.0, chord(60) - chord(30) + 0.3),
        max(0.0, chord(90) - chord(30) + 0.3),
        max(0.0, chord(90) - chord(120) + 0.3),
    ]
    loss = batch_hard_triplet_loss(emb, labels, margin=0.3)
    assert float(loss) == pytest.approx(sum(expected) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="positive and a negative"):
        batch_hard_triplet_loss(emb, torch.tensor([0, 1, 2, 3]))


def test_pair_losses_have_finite_gradients_in_float16() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    for loss_fn in (batch_hard_triplet_loss, contrastive_loss):
        emb = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).half().requires_grad_()
        loss_fn(emb, labels).backward()
        assert emb.grad is not None and torch.isfinite(emb.grad).all(), loss_fn.__name__


def test_contrastive_balances_positive_and_negative_pairs() -> None:
    emb = _unit([0.0, 0.0, 180.0])
    labels = torch.tensor([0, 0, 1])
    # positives coincide (d = 0); negatives are 2 apart, beyond the margin: the loss is zero.
    assert float(contrastive_loss(emb, labels, margin=0.5)) == pytest.approx(0.0, abs=1e-5)
    close = _unit([0.0, 90.0, 10.0])
    loss = contrastive_loss(close, torch.tensor([0, 0, 1]), margin=1.0)
    d_pos, d_neg1, d_neg2 = math.sqrt(2), 2 * math.sin(math.radians(5)), 2 * math.sin(math.radians(40))
    want = d_pos**2 + (max(0.0, 1 - d_neg1) ** 2 + max(0.0, 1 - d_neg2) ** 2) / 2  # the 80° pair is past the margin
    assert float(loss) == pytest.approx(want, rel=1e-5)
