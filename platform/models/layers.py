"""Building blocks shared by every backbone, and the stride-16 body + GDC head shape they all take.

Every body downsamples by exactly OUTPUT_STRIDE with 3x3/stride-2/pad-1 convs or pools (each maps n to
ceil(n / 2)), so the final map is ceil(input_size / 16): 7x7 at 112 px and 4x4 at 56 or 64 px. One fixed
stride keeps small inputs cheap (4x fewer MACs at 56 px) while the GDC head still sees a spatial map.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = ("prelu", "relu")
OUTPUT_STRIDE = 16
MIN_INPUT_SIZE = 2 * OUTPUT_STRIDE  # keeps the final map at least 2x2


class _PReLUFunction(torch.autograd.Function):
    """PReLU for training in the fewest passes over memory: 1 elementwise op forward, 5 backward.

    The activation is memory-bound on CPU. The forward is aten's fused kernel; aten's fused backward is
    slower than these five ops, and the autograd graph of relu(x) − a·relu(−x) takes 5 ops forward and
    about 8 backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return torch._prelu_kernel(x, _channel_view(weight.to(x.dtype), x))  # bfloat16 x under autocast

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        positive_grad = torch.ops.aten.threshold_backward(grad, x, 0)  # grad where x > 0, else 0
        negative_grad = grad - positive_grad
        grad_x = torch.addcmul(positive_grad, negative_grad, _channel_view(weight.to(x.dtype), x))
        channel_dims = [d for d in range(grad.dim()) if d != 1] if grad.dim() > 1 else []
        grad_weight = negative_grad * x
        if channel_dims:  # summed in the weight's dtype: a float32 slope under bfloat16 autocast stays exact
            grad_weight = grad_weight.sum(channel_dims, dtype=weight.dtype)
        return grad_x, grad_weight.to(weight.dtype)


def _channel_view(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The per-channel slope shaped to broadcast over x (channels on dim 1)."""
    return weight.view(1, -1, *([1] * (x.dim() - 2))) if x.dim() > 1 else weight


class PReLU(nn.PReLU):
    """Per-channel PReLU: the same function and parameter as nn.PReLU, in two faster forms.

    Training uses `_PReLUFunction` (MobileFaceNet trains about 15% faster than with relu(x) − a·relu(−x),
    which was itself 25% faster than nn.PReLU, whose fused backward is slow on CPU; the fused forward took
    another 20% off the activation's time). Inference and export
    use relu(x) − a·relu(−x), which ONNX graphs keep as Relu/Mul/Sub. It does not help int8 export:
    onnxruntime has no int8 Neg/Sub, so for quantised deployment use act=relu (bench/bench_export.py
    measures both).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():  # export traces eval mode, whatever its grad mode
            return _PReLUFunction.apply(x, self.weight)
        return torch.relu(x) - _channel_view(self.weight, x) * torch.relu(-x)


def make_act(act: str, channels: int) -> nn.Module:
    """PReLU (per channel) is the face-recognition default; ReLU for runtimes that lack it."""
    if act == "prelu":
        return PReLU(channels)
    if act == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")


def scale_channels(channels: int, width: float) -> int:
    """Width-multiplied channel count, rounded to a multiple of 8 (vector-unit friendly), at least 8."""
    return max(8, round(channels * width / 8) * 8)


def feature_map_size(input_size: int) -> int:
    return math.ceil(input_size / OUTPUT_STRIDE)


class ConvBNAct(nn.Sequential):
    """Conv (same padding, no bias: BN follows) -> BN -> activation; act=None gives a linear projection."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "prelu",
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(make_act(act, out_ch))
        super().__init__(*layers)


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise then 1x1 pointwise: about 9x fewer MACs than a dense 3x3 conv.

    linear=True drops the last activation, for outputs that feed a residual sum.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, act: str = "prelu", linear: bool = False) -> None:
        super().__init__(
            ConvBNAct(in_ch, in_ch, 3, stride, groups=in_ch, act=act),
            ConvBNAct(in_ch, out_ch, 1, act=None if linear else act),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 project; residual if shape is kept.

    `hidden` overrides the expanded width in_ch * expansion (a channel-pruned block, see faceforge.prune).
    """

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, expansion: int, act: str, hidden: int | None = None
    ) -> None:
        super().__init__()
        hidden = in_ch * expansion if hidden is None else hidden
        if expansion == 1 and hidden != in_ch:
            raise ValueError(f"a block without an expand conv keeps its input width {in_ch}, got hidden={hidden}")
        expand = [ConvBNAct(in_ch, hidden, 1, act=act)] if expansion != 1 else []
        self.layers = nn.Sequential(
            *expand,
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=act),
            ConvBNAct(hidden, out_ch, 1, act=None),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


def inverted_residual_stages(
    stages: tuple[tuple[int, int, int, int], ...], in_ch: int, width: float, act: str, hidden: list[int] | None
) -> tuple[list[nn.Module], int]:
    """The blocks of (expansion, out_channels, repeats, first stride) stages, and their output width.

    `hidden` lists every block's expanded width, in order, for a channel-pruned model; None keeps in_ch * expansion.
    """
    specs = []
    for expansion, channels, repeats, stride in stages:
        out_ch = scale_channels(channels, width)
        for i in range(repeats):
            specs.append((in_ch, out_ch, stride if i == 0 else 1, expansion))
            in_ch = out_ch
    if hidden is None:
        hidden = [block_in * expansion for block_in, _, _, expansion in specs]
    elif len(hidden) != len(specs) or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
        raise ValueError(f"hidden must list {len(specs)} positive ints, one per inverted-residual block: {hidden!r}")
    blocks: list[nn.Module] = [
        InvertedResidual(block_in, out_ch, stride, expansion, act, block_hidden)
        for (block_in, out_ch, stride, expansion), block_hidden in zip(specs, hidden, strict=True)
    ]
    return blocks, in_ch


class GDCHead(nn.Sequential):
    """Global depthwise conv over the whole final map, then a linear projection to the embedding.

    Faces are aligned, so each position gets its own learned weight; global average pooling would treat the
    eye corner and the background alike. Both stages are linear (BN only): the embedding is un-normalised.
    """

    def __init__(self, channels: int, feature_size: int, embedding_dim: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, feature_size, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.Flatten(),
            nn.Linear(channels, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )


class EmbeddingNet(nn.Module):
    """A stride-16 body followed by the GDC head: the common shape of every FaceForge backbone."""

    def __init__(self, body: nn.Module, body_channels: int, *, embedding_dim: int, input_size: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.input_size = input_size
        self.body = body
        self.head = GDCHead(body_channels, feature_map_size(input_size), embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x 3 x input_size x input_size in [-1, 1] -> B x embedding_dim."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            # The GDC kernel is sized for input_size; any other size would silently break the head.
            raise ValueError(f"model expects {self.input_size}x{self.input_size} input, got {tuple(x.shape[-2:])}")
        return self.head(self.body(x))
