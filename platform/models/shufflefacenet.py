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


def concat_shuffle(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Channel shuffle of the two halves' concatenation, which interleaves them (channel 2i from `first`, 2i + 1
    from `second`) so information crosses between them in the next unit.

    Written as one stack in the memory format of `first` instead of cat, view, transpose and reshape: that was two
    copies per unit plus, in channels_last, a fall back to NCHW that the next convolution converted again.
    """
    n, c, h, w = first.shape
    if first.stride(1) < first.stride(3):  # channels innermost: channels_last, or a channel slice of it
        pair = torch.stack((first.permute(0, 2, 3, 1), second.permute(0, 2, 3, 1)), dim=4)
        return pair.view(n, h, w, 2 * c).permute(0, 3, 1, 2)
    return torch.stack((first, second), dim=2).view(n, 2 * c, h, w)


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
            return concat_shuffle(self.shortcut(x), self.main(x))
        passthrough, convolved = x.chunk(2, dim=1)
        return concat_shuffle(passthrough, self.main(convolved))


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
