"""MobileFaceNet (Chen et al., 2018): inverted residuals sized for 112 px faces, 221M MACs,
1.2M params at 512-d (the paper's 1.0M is at 128-d)."""

from __future__ import annotations

from torch import nn

from faceforge.models._registry import register
from faceforge.models.layers import ConvBNAct, EmbeddingNet, inverted_residual_stages, scale_channels

# (expansion, out_channels, repeats, first stride), paper Table 1. The two stride-2 blocks that raise or keep
# 128 channels expand by 4, the rest by 2: with all 2s the model would have 0.91M params / 203M MACs.
STAGES = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


@register
def mobilefacenet(
    *, embedding_dim: int, width: float, input_size: int, act: str, hidden: list[int] | None = None
) -> nn.Module:
    """`hidden`: per-block expanded widths of a channel-pruned model (faceforge.prune); None for the paper's."""
    stem = scale_channels(64, width)
    # Layers are built input first: the order in which they draw their initial weights is part of a seed's result.
    layers: list[nn.Module] = [ConvBNAct(3, stem, 3, 2, act=act), ConvBNAct(stem, stem, 3, 1, groups=stem, act=act)]
    blocks, in_ch = inverted_residual_stages(STAGES, stem, width, act, hidden)
    layers += blocks
    last = scale_channels(512, width)
    layers.append(ConvBNAct(in_ch, last, 1, act=act))
    return EmbeddingNet(nn.Sequential(*layers), last, embedding_dim=embedding_dim, input_size=input_size)
