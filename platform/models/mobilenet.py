"""MobileNetV1 and V2 with their last stride-2 step removed, so a 112 px face ends on a 7x7 map."""

from __future__ import annotations

from torch import nn

from faceforge.models._registry import register
from faceforge.models.layers import (
    ConvBNAct,
    DepthwiseSeparable,
    EmbeddingNet,
    inverted_residual_stages,
    scale_channels,
)

# MobileNetV1 (Howard et al., 2017): (out_channels, stride) per depthwise-separable layer; the 1024 layer's
# stride 2 is now 1.
V1_LAYERS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 1),
    (1024, 1),
)

# MobileNetV2 (Sandler et al., 2018): (expansion, out_channels, repeats, first stride); the 160 stage's
# stride 2 is now 1.
V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 1),
    (6, 320, 1, 1),
)


@register
def mobilenet_v1(*, embedding_dim: int, width: float, input_size: int, act: str) -> nn.Module:
    in_ch = scale_channels(32, width)
    layers: list[nn.Module] = [ConvBNAct(3, in_ch, 3, 2, act=act)]
    for channels, stride in V1_LAYERS:
        out_ch = scale_channels(channels, width)
        layers.append(DepthwiseSeparable(in_ch, out_ch, stride, act))
        in_ch = out_ch
    return EmbeddingNet(nn.Sequential(*layers), in_ch, embedding_dim=embedding_dim, input_size=input_size)


@register
def mobilenet_v2(
    *, embedding_dim: int, width: float, input_size: int, act: str, hidden: list[int] | None = None
) -> nn.Module:
    """`hidden`: per-block expanded widths of a channel-pruned model (faceforge.prune); None for the paper's."""
    stem = scale_channels(32, width)
    layers: list[nn.Module] = [ConvBNAct(3, stem, 3, 2, act=act)]  # input first: the seed's order of initial weights
    blocks, in_ch = inverted_residual_stages(V2_STAGES, stem, width, act, hidden)
    layers += blocks
    last = scale_channels(1280, width)
    layers.append(ConvBNAct(in_ch, last, 1, act=act))
    return EmbeddingNet(nn.Sequential(*layers), last, embedding_dim=embedding_dim, input_size=input_size)
