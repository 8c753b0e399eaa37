"""A backbone to a checked ONNX file: BatchNorm folded, channels equalised for int8, dynamic batch, outputs verified."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from faceforge.export.runtime import OnnxEmbedder

DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "embedding"
# Batches the export is checked at: the single-face call of a device and a small server batch.
CHECK_BATCHES = (1, 8)
TOLERANCE = 1e-4
FOLDABLE = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))
POSITIVE_HOMOGENEOUS = (nn.ReLU, nn.PReLU)  # f(x / s) = f(x) / s for s > 0
MAX_EQUALIZATION_SWEEPS = 100
EQUALIZED = 1e-3  # the largest |log scale| of a sweep once the ranges have settled (about 7 sweeps)


@torch.no_grad()
def _fold(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> None:
    """Scale the layer's output channels and add the shift, so layer -> BN becomes one layer (eval mode)."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    if layer.bias is not None:
        shift = shift + layer.bias.double() * scale
    dtype = layer.weight.dtype
    layer.weight.copy_((layer.weight.double() * scale.view(-1, *[1] * (layer.weight.dim() - 1))).to(dtype))
    layer.bias = nn.Parameter(shift.to(dtype))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy in which every BatchNorm right after a conv or linear layer is merged into it.

    Inference then skips a per-channel multiply-add per layer and the quantiser sees one weight tensor
    with the true output range. A BatchNorm that precedes its conv (IResNet's pre-activation blocks) stays:
    with zero padding it cannot be folded exactly.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            layer, bn = module[i], module[i + 1]
            pair = any(isinstance(layer, lt) and isinstance(bn, bt) for lt, bt in FOLDABLE)
            if pair and bn.track_running_stats and bn.running_var is not None:
                _fold(layer, bn)
                module[i + 1] = nn.Identity()
    return folded


def _equalizable(a: nn.Module, b: nn.Module) -> tuple[nn.Conv2d, nn.Conv2d, bool] | None:
    """(conv_a, conv_b, conv_b is depthwise) when `a` is conv -> folded BN -> ReLU/PReLU and `b` starts with a conv."""
    if not (isinstance(a, nn.Sequential) and isinstance(b, nn.Sequential) and len(a) > 1 and len(b) > 0):
        return None
    conv_a, *between = a
    conv_b = b[0]
    if not (isinstance(conv_a, nn.Conv2d) and isinstance(conv_b, nn.Conv2d)):
        return None
    if not (isinstance(between[-1], POSITIVE_HOMOGENEOUS) and all(isinstance(m, nn.Identity) for m in between[:-1])):
        return None
    depthwise = conv_b.groups == conv_b.in_channels == conv_b.out_channels
    return (conv_a, conv_b, depthwise) if depthwise or conv_b.groups == 1 else None


@torch.no_grad()
def equalize_channels(model: nn.Module) -> nn.Module:
    """Cross-layer equalisation (Nagel et al., 2019, data-free quantisation), in place on a folded model.

    ReLU and PReLU commute with a positive per-channel scale, so channel i between conv_a and conv_b can
    be divided by s_i in conv_a and multiplied back in conv_b without changing the function. Choosing
    s_i = sqrt(r_a / r_b) (the channel's weight ranges in the two convs) balances them, which also tames
    the few channels whose activations dwarf the rest after BatchNorm folding: with one int8 scale per
    activation tensor, those would leave the others a handful of levels. Chains (expand -> depthwise ->
    project) share convs, so the pairs are swept until the scales settle.
    """
    pairs = []
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            pairs += filter(None, (_equalizable(module[i], module[i + 1]) for i in range(len(module) - 1)))
    for _ in range(MAX_EQUALIZATION_SWEEPS):
        largest_step = 0.0
        for conv_a, conv_b, depthwise in pairs:
            range_a = conv_a.weight.abs().amax(dim=(1, 2, 3))
            range_b = conv_b.weight.abs().amax(dim=(1, 2, 3) if depthwise else (0, 2, 3))
            usable = (range_a > 0) & (range_b > 0)  # a dead channel keeps its scale
            scale = torch.where(usable, torch.sqrt(range_a / range_b.where(usable, 1.0)), 1.0)
            conv_a.weight.div_(scale.view(-1, 1, 1, 1))
            if conv_a.bias is not None:
                conv_a.bias.div_(scale)
            conv_b.weight.mul_(scale.view(-1, 1, 1, 1) if depthwise else scale.view(1, -1, 1, 1))
            largest_step = max(largest_step, scale.log().abs().max().item())
        if largest_step < EQUALIZED:
            break
    return model


@torch.no_grad()
def output_gap(model: nn.Module, onnx_path: str | Path, input_size: int, batch: int, seed: int = 0) -> float:
    """Largest gap between eval-mode PyTorch and onnxruntime outputs on random inputs in [-1, 1].

    Absolute for outputs within [-1, 1], else relative to the largest output: folding and equalising
    reorder float32 roundings, whose size grows with the outputs (8e-5 on outputs of scale 25).
    """
    x = torch.rand(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    was_training = model.training
    model.eval()
    try:
        expected = model(x)
    finally:
        model.train(was_training)
    actual = torch.from_numpy(OnnxEmbedder(onnx_path)(x))
    return (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def export_onnx(model: nn.Module, input_size: int, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write `path` with a dynamic batch dimension; raises if the graph is invalid or its outputs drift.

    BatchNorm is folded and channels equalised first (the same function, ready for int8). Uses the dynamo
    exporter (torch.export). The platform's PReLU computes relu(x) - a*relu(-x), so the graph holds
    Relu/Neg/Mul/Sub rather than a PRelu node; bench/bench_export.py measures both against ReLU.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folded = equalize_channels(fold_batchnorm(model))
    # Batch 2 in the example: torch.export specialises a dimension whose example size is 1.
    example = torch.zeros(2, 3, input_size, input_size)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # notes on tracing and on skipped torchvision ops: for model authors
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                folded,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    graph = proto.graph
    for value in (*graph.node, *graph.input, *graph.output, *graph.value_info):
        del value.metadata_props[:]  # the exporter's per-node stack traces: a fifth of an int8 MobileFaceNet file
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    for batch in CHECK_BATCHES:
        gap = output_gap(model, path, input_size, batch)
        if not gap <= TOLERANCE:
            raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {gap:.2e} at batch {batch}")
    return path
