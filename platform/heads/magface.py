"""MagFace (Meng et al., CVPR 2021): the feature norm a = |x| sets each sample's additive angular margin.

The margin m(a) grows with the norm, and the regulariser λ_g·g(a) rewards a large norm. A sample can
only afford a large norm, and so a large margin, if it sits close to its class centre: after training
the norm ranks face quality, with no extra model. Both pull on the norm, so their gradients must reach it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MagFaceMargin:
    """m(a) = l_m + (u_m − l_m)·(a − l_a)/(u_a − l_a) and g(a) = a/u_a² + 1/a, with a clamped to [l_a, u_a].

    The paper's guarantees (a unique optimal norm that grows with quality) hold on [l_a, u_a], so as in
    the paper a norm outside it is clamped and gets no gradient from m or g. A BatchNorm-ended embedding
    starts near √D (about 23 at D = 512), inside the default range.
    """

    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0

    def __post_init__(self) -> None:
        values = (self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g)
        if not all(math.isfinite(value) for value in values):
            raise ValueError(f"MagFace parameters must be finite; got l_a, u_a, l_m, u_m, lambda_g = {values}")
        if not 0.0 < self.l_a < self.u_a:
            raise ValueError(f"MagFace needs 0 < l_a < u_a, got l_a={self.l_a} u_a={self.u_a}")
        if not 0.0 <= self.l_m <= self.u_m:
            raise ValueError(f"MagFace needs 0 <= l_m <= u_m, got l_m={self.l_m} u_m={self.u_m}")
        if self.lambda_g < 0.0:
            raise ValueError(f"MagFace needs lambda_g >= 0, got {self.lambda_g}")

    def margin(self, norm: torch.Tensor) -> torch.Tensor:
        """The additive angular margin of each sample, from its feature norm."""
        a = norm.clamp(self.l_a, self.u_a)
        return self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)

    def regularizer(self, norm: torch.Tensor) -> torch.Tensor:
        """λ_g·g(a) of each sample: decreasing on [l_a, u_a], so it pushes norms up against the margin."""
        a = norm.clamp(self.l_a, self.u_a)
        return self.lambda_g * (a / self.u_a**2 + 1.0 / a)
