"""The combined margin cos(m1·θ + m2) − m3 that covers SphereFace, ArcFace and CosFace, and MagFace.

A margin only changes the target logit of each sample; the classifier that produces the cosines
(and shards them across ranks) lives in `faceforge.parallel`. MagFace adds a per-sample angular margin
m(a) to m2, set by the feature norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from faceforge.heads.magface import MagFaceMargin

# Keeps acos differentiable: its derivative is infinite at ±1.
_COS_CLAMP = 1.0 - 1e-7


@dataclass(frozen=True)
class MarginSpec:
    """Target logit s·ψ(θ) with ψ(θ) = cos(m1·θ + m2) − m3 on L2-normalised features and class centres.

    `normalized=False` is plain softmax: raw inner-product logits, no scale and no margin. With `magface`
    each sample's m2 gains the margin m(a) of its feature norm, and the loss gains MagFace's regulariser.
    """

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    normalized: bool = True
    magface: MagFaceMargin | None = None

    def __post_init__(self) -> None:
        if not all(math.isfinite(value) for value in (self.s, self.m1, self.m2, self.m3)):
            raise ValueError(f"s, m1, m2, m3 must be finite; got s={self.s} m1={self.m1} m2={self.m2} m3={self.m3}")
        if not self.normalized and (self.s, self.m1, self.m2, self.m3) != (1.0, 1.0, 0.0, 0.0):
            raise ValueError(
                f"plain softmax has no scale or margin (they would be ignored); "
                f"got s={self.s} m1={self.m1} m2={self.m2} m3={self.m3}"
            )
        if self.normalized and self.s <= 0:
            raise ValueError(f"margin scale s must be positive, got {self.s}")
        if self.m1 < 1.0 or self.m2 < 0.0 or self.m3 < 0.0:
            raise ValueError(f"margins need m1 >= 1, m2 >= 0, m3 >= 0; got m1={self.m1} m2={self.m2} m3={self.m3}")
        if self.magface is not None and not self.normalized:
            raise ValueError("MagFace needs normalized features: its margin is an angle")

    @property
    def scale(self) -> float:
        return self.s if self.normalized else 1.0

    @property
    def is_identity(self) -> bool:
        no_margin = self.m1 == 1.0 and self.m2 == 0.0 and self.m3 == 0.0 and self.magface is None
        return not self.normalized or no_margin

    def target_logit(self, cos_target: torch.Tensor, sample_margin: torch.Tensor | None = None) -> torch.Tensor:
        """ψ applied to the cosines of the target classes (unscaled); `sample_margin` adds to m2 per sample.

        Past m1·θ + m2 = π the cosine would turn back up and reward a worse angle, so ψ continues as
        SphereFace's (−1)^k·cos(m1·θ + m2) − 2k, which is continuous and keeps decreasing down to θ = π.
        """
        if sample_margin is None and self.is_identity:
            return cos_target
        if sample_margin is None and self.m1 == 1.0 and self.m2 == 0.0:
            return cos_target - self.m3
        # At least float32: in half precision the clamp rounds to 1.0 and acos's gradient there is infinite.
        wide = cos_target.to(torch.promote_types(cos_target.dtype, torch.float32))
        theta = torch.acos(wide.clamp(-_COS_CLAMP, _COS_CLAMP))
        angle = self.m1 * theta + self.m2
        if sample_margin is not None:
            angle = angle + sample_margin
        k = torch.floor(angle / math.pi).detach()
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return (sign * torch.cos(angle) - 2.0 * k - self.m3).to(cos_target.dtype)


MARGIN_PRESETS: dict[str, MarginSpec] = {
    "arcface": MarginSpec(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": MarginSpec(s=64.0, m1=1.0, m2=0.0, m3=0.4),
    "sphereface": MarginSpec(s=64.0, m1=1.5, m2=0.0, m3=0.0),
    "combined": MarginSpec(s=64.0, m1=1.0, m2=0.3, m3=0.2),
    "normface": MarginSpec(s=30.0, m1=1.0, m2=0.0, m3=0.0),
    "softmax": MarginSpec(s=1.0, m1=1.0, m2=0.0, m3=0.0, normalized=False),
    "magface": MarginSpec(s=64.0, m1=1.0, m2=0.0, m3=0.0, magface=MagFaceMargin()),
}


def margin_spec(name: str, **overrides: float) -> MarginSpec:
    """A preset by name, with any of s, m1, m2, m3 (and MagFace's l_a, u_a, l_m, u_m, lambda_g) overridden."""
    if name not in MARGIN_PRESETS:
        raise ValueError(f"unknown margin head {name!r}; choose one of {sorted(MARGIN_PRESETS)}")
    base = MARGIN_PRESETS[name]
    magface_keys = [] if base.magface is None else [field.name for field in fields(MagFaceMargin)]
    allowed = ["s", "m1", "m2", "m3", *magface_keys]
    unknown = set(overrides) - set(allowed)
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for margin head {name!r}; use {', '.join(allowed)}")
    changes: dict[str, object] = {key: value for key, value in overrides.items() if key not in magface_keys}
    if base.magface is not None:
        changes["magface"] = replace(base.magface, **{key: overrides[key] for key in magface_keys if key in overrides})
    return replace(base, **changes)
