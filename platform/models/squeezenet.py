"""SqueezeNet 1.1 (Iandola et al., 2016): fire modules, with BN added and the classifier replaced by GDC."""

from __future__ import annotations

import torch
from torch import nn

from faceforge.models._registry import register
from faceforge.models.layers import ConvBNAct, EmbeddingNet, scale_channels

# (squeeze, expand) channels per fire module; "pool" is a 3x3 stride-2 max-pool. Stem + 3 pools = stride 16.
LAYOUT = (
    (16, 64),
    (16, 64),
    "pool",
    (32, 128),
    (32, 128),
    "pool",
    (48, 192),
    (48, 192),
    (64, 256),
    (64, 256),
)


class Fire(nn.Module):
    """1x1 squeeze to few channels, then parallel 1x1 and 3x3 expands, concatenated."""

    def __init__(self, in_ch: int, squeeze: int, expand: int, act: str) -> None:
        super().__init__()
        self.squeeze = ConvBNAct(in_ch, squeeze, 1, act=act)
        self.expand1x1 = ConvBNAct(squeeze, expand, 1, act=act)
        self.expand3x3 = ConvBNAct(squeeze, expand, 3, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat((self.expand1x1(x), self.expand3x3(x)), dim=1)


@register
def squeezenet(*, embedding_dim: int, width: float, input_size: int, act: str) -> nn.Module:
    in_ch = scale_channels(64, width)
    layers: list[nn.Module] = [ConvBNAct(3, in_ch, 3, 2, act=act), nn.MaxPool2d(3, 2, 1)]
    for spec in LAYOUT:
        if spec == "pool":
            layers.append(nn.MaxPool2d(3, 2, 1))
            continue
        squeeze, expand = (scale_channels(c, width) for c in spec)
        layers.append(Fire(in_ch, squeeze, expand, act))
        in_ch = 2 * expand
    return EmbeddingNet(nn.Sequential(*layers), in_ch, embedding_dim=embedding_dim, input_size=input_size)
