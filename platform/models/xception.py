"""Xception (Chollet, 2017) built from depthwise-separable residual blocks, scaled for 112 px faces.

Entry flow: stride-2 stem and three stride-2 blocks (stride 16, 7x7 at 112 px); middle flow: 8 blocks at
728 channels; exit flow: the 1024 block keeps its resolution (its stride 2 is dropped), then 1536 and 2048.
"""

from __future__ import annotations

import torch
from torch import nn

from faceforge.models._registry import register
from faceforge.models.layers import ConvBNAct, DepthwiseSeparable, EmbeddingNet, scale_channels

ENTRY_CHANNELS = (128, 256, 728)
MIDDLE_BLOCKS = 8


class XceptionBlock(nn.Module):
    """`convs` separable convs (the last linear), an optional stride-2 max-pool, plus a projected shortcut."""

    def __init__(self, in_ch: int, out_ch: int, convs: int, stride: int, act: str) -> None:
        super().__init__()
        layers = [
            DepthwiseSeparable(in_ch if i == 0 else out_ch, out_ch, act=act, linear=i == convs - 1)
            for i in range(convs)
        ]
        if stride == 2:
            layers.append(nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(*layers)
        keeps_shape = stride == 1 and in_ch == out_ch
        self.shortcut = nn.Identity() if keeps_shape else ConvBNAct(in_ch, out_ch, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + self.shortcut(x)


@register
def xception(*, embedding_dim: int, width: float, input_size: int, act: str) -> nn.Module:
    stem = scale_channels(32, width)
    in_ch = scale_channels(64, width)
    layers: list[nn.Module] = [ConvBNAct(3, stem, 3, 2, act=act), ConvBNAct(stem, in_ch, 3, 1, act=act)]
    for channels in ENTRY_CHANNELS:
        out_ch = scale_channels(channels, width)
        layers.append(XceptionBlock(in_ch, out_ch, 2, 2, act))
        in_ch = out_ch
    layers += [XceptionBlock(in_ch, in_ch, 3, 1, act) for _ in range(MIDDLE_BLOCKS)]
    exit_ch, sep1, sep2 = (scale_channels(c, width) for c in (1024, 1536, 2048))
    layers += [
        XceptionBlock(in_ch, exit_ch, 2, 1, act),
        DepthwiseSeparable(exit_ch, sep1, act=act),
        DepthwiseSeparable(sep1, sep2, act=act),
    ]
    return EmbeddingNet(nn.Sequential(*layers), sep2, embedding_dim=embedding_dim, input_size=input_size)
