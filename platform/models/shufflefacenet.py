"""ShuffleFaceNet (Martínez-Díaz et al., 2019): ShuffleNetV2 units, no max-pool after the stem, GDC head."""

from __future__ import annotations

import torch
from torch import nn

from faceforge.models._registry import register
from faceforge.models.layers import ConvBNAct, EmbeddingNet

# ShuffleNetV2 (Ma et al., 2018) is defined for these widths only: channels of stages 2-4 and the last conv.
STAGE_CHANNELS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}
STAGE_REPEATS = (4, 8, 4)


def channel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """Interleave the two branch halves so information crosses between them in the next unit."""
    b, c, h, w = x.shape
    return x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """Stride 1: half the channels pass through untouched; stride 2: both halves are convolved and halved."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: str) -> None:
        super().__init__()
        branch = out_ch // 2
        self.stride = stride
        if stride == 2:
            self.shortcut = nn.Sequential(
                ConvBNAct(in_ch, in_ch, 3, 2, groups=in_ch, act=None), ConvBNAct(in_ch, branch, 1, act=act)
            )
        main_in = in_ch if stride == 2 else branch
        self.main = nn.Sequential(
            ConvBNAct(main_in, branch, 1, act=act),
            ConvBNAct(branch, branch, 3, stride, groups=branch, act=None),
            ConvBNAct(branch, branch, 1, act=act),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            out = torch.cat((self.shortcut(x), self.main(x)), dim=1)
        else:
            passthrough, convolved = x.chunk(2, dim=1)
            out = torch.cat((passthrough, self.main(convolved)), dim=1)
        return channel_shuffle(out)


@register
def shufflefacenet(*, embedding_dim: int, width: float, input_size: int, act: str) -> nn.Module:
    if width not in STAGE_CHANNELS:
        raise ValueError(f"shufflefacenet width must be one of {', '.join(map(str, STAGE_CHANNELS))}, got {width}")
    *stage_channels, last = STAGE_CHANNELS[width]
    in_ch = 24
    layers: list[nn.Module] = [ConvBNAct(3, in_ch, 3, 2, act=act)]
    for out_ch, repeats in zip(stage_channels, STAGE_REPEATS, strict=True):
        for i in range(repeats):
            layers.append(ShuffleUnit(in_ch, out_ch, 2 if i == 0 else 1, act))
            in_ch = out_ch
    layers.append(ConvBNAct(in_ch, last, 1, act=act))
    return EmbeddingNet(nn.Sequential(*layers), last, embedding_dim=embedding_dim, input_size=input_size)
