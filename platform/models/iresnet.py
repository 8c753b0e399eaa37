"""InsightFace IResNet (Deng et al., ArcFace), the teacher: pre-BN residual blocks, stride-1 stem, 4 stages.

Unlike InsightFace, which flattens the 7x7x512 map into a 25k x 512 fully connected layer, the embedding
comes from the shared GDC head, so the model works at any input size.
"""

from __future__ import annotations

import torch
from torch import nn

from faceforge.models._registry import register
from faceforge.models.layers import ConvBNAct, EmbeddingNet, make_act, scale_channels

STAGE_CHANNELS = (64, 128, 256, 512)


class IBasicBlock(nn.Module):
    """BN-conv-BN-act-conv-BN; the downsampling stride sits on the second conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: str) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            make_act(act, out_ch),
            nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        keeps_shape = stride == 1 and in_ch == out_ch
        self.shortcut = nn.Identity() if keeps_shape else ConvBNAct(in_ch, out_ch, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + self.shortcut(x)


def _iresnet(blocks: tuple[int, ...], *, embedding_dim: int, width: float, input_size: int, act: str) -> nn.Module:
    in_ch = scale_channels(64, width)
    layers: list[nn.Module] = [ConvBNAct(3, in_ch, 3, 1, act=act)]
    for channels, repeats in zip(STAGE_CHANNELS, blocks, strict=True):
        out_ch = scale_channels(channels, width)
        for i in range(repeats):
            layers.append(IBasicBlock(in_ch, out_ch, 2 if i == 0 else 1, act))
            in_ch = out_ch
    layers.append(nn.BatchNorm2d(in_ch))
    return EmbeddingNet(nn.Sequential(*layers), in_ch, embedding_dim=embedding_dim, input_size=input_size)


@register
def iresnet18(*, embedding_dim: int, width: float, input_size: int, act: str) -> nn.Module:
    return _iresnet((2, 2, 2, 2), embedding_dim=embedding_dim, width=width, input_size=input_size, act=act)


@register
def iresnet50(*, embedding_dim: int, width: float, input_size: int, act: str) -> nn.Module:
    return _iresnet((3, 4, 14, 3), embedding_dim=embedding_dim, width=width, input_size=input_size, act=act)
