"""Structured channel pruning of the expanded (hidden) channels of inverted-residual blocks, to a MAC budget.

What is pruned: inside a block `1x1 expand -> BN -> act -> 3x3 depthwise -> BN -> act -> 1x1 project`, a hidden
channel is one expand filter, its BN and activation entries, its depthwise filter and BN/activation entries, and
one input column of the project conv. Removing it never changes a block's input or output width, so residual
sums, the stem and the GDC head are untouched and every block stays shape-consistent. This is the structure of
MobileFaceNet and MobileNetV2 (their constructors take the kept widths as `hidden`), so those are supported.
Other backbones are refused: MobileNetV1's prunable channels are layer outputs that cross block boundaries and
feed the head, the IResNets' residual sums and ShuffleFaceNet's split/shuffle tie channels across blocks,
and SqueezeNet's fire modules concatenate, so each would need its own rebuild.

Importance of a hidden channel: `bn`, |gamma| of the BN after the expand conv (network slimming, Liu et al.
2017), or `l1`, the L1 norm of its expand filter (Li et al. 2017). Scores are divided by their block's mean
before one global ranking: without sparsity-regularised training the scale of gammas and filter norms differs
from block to block, so a raw global threshold would empty some blocks and leave others whole. Channels are
removed lowest score first until the model fits the budget, keeping at least `min_channels` per block.

A removed channel is not simply dropped: it is replaced by the constant it tends to as its gamma goes to 0,
act(beta) after the expand stage, carried through the depthwise stage (interior value) and folded into the
project BN's running mean. So channels with gamma = beta = 0 are removed exactly, and in eval mode a small
-gamma channel costs less accuracy than a plain cut. In training mode the BN's batch mean absorbs the shift.

MACs are counted with the model cards' counter (torch's FlopCounterMode, FLOPs / 2). A block's MACs are
linear in its hidden width (expand, depthwise and project convs each scale with it), so a block's cost per
channel is its counted MACs divided by its width, and the budget is met exactly as the counter measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from faceforge import models
from faceforge.models.card import count_macs
from faceforge.models.layers import InvertedResidual

SUPPORTED = ("mobilefacenet", "mobilenet_v2")
CRITERIA = ("bn", "l1")


@dataclass
class PrunableBlock:
    """An inverted-residual block with an expand conv, by its position among the model's blocks."""

    position: int
    block: InvertedResidual
    macs_per_channel: int

    @property
    def width(self) -> int:
        return self.block.layers[0][0].out_channels


def inverted_residuals(model: nn.Module) -> list[InvertedResidual]:
    """Every inverted-residual block of a supported backbone, in order (the order of its `hidden` config)."""
    name = getattr(model, "config", {}).get("name")
    if name not in SUPPORTED:
        raise ValueError(f"channel pruning supports {', '.join(SUPPORTED)} (inverted-residual backbones), not {name!r}")
    return [m for m in model.body if isinstance(m, InvertedResidual)]


def prunable_blocks(model: nn.Module) -> list[PrunableBlock]:
    """The blocks with an expand conv (MobileNetV2's first block has none) and their MAC cost per hidden channel."""
    blocks = [(i, b) for i, b in enumerate(inverted_residuals(model)) if len(b.layers) == 3]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        block.register_forward_pre_hook(lambda _, args, i=i: inputs.__setitem__(i, args[0])) for i, block in blocks
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, model.input_size, model.input_size))
            result = []
            for i, block in blocks:
                with FlopCounterMode(display=False) as counter:
                    block(inputs[i])
                macs, width = counter.get_total_flops() // 2, block.layers[0][0].out_channels
                assert macs % width == 0, f"block {i}: {macs} MACs are not linear in its {width} hidden channels"
                result.append(PrunableBlock(i, block, macs // width))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return result


def channel_importance(block: InvertedResidual, criterion: str) -> torch.Tensor:
    """One score per hidden channel: |gamma| of the expand BN (`bn`) or the expand filter's L1 norm (`l1`)."""
    expand_conv, expand_bn = block.layers[0][0], block.layers[0][1]
    if criterion == "bn":
        return expand_bn.weight.detach().abs()
    if criterion == "l1":
        return expand_conv.weight.detach().abs().sum(dim=(1, 2, 3))
    raise ValueError(f"unknown pruning criterion {criterion!r}; expected one of {', '.join(CRITERIA)}")


def select_channels(
    model: nn.Module, target_macs: int, criterion: str = "bn", min_channels: int = 8
) -> dict[int, torch.Tensor]:
    """Sorted indices of the hidden channels to keep, per block position: a greedy global ranking of
    block-normalised importance, removing the least important until the model's MACs are <= target_macs."""
    if min_channels < 1:
        raise ValueError(f"min_channels must be >= 1, got {min_channels}")
    blocks = prunable_blocks(model)
    macs = count_macs(model, model.input_size)
    scores, owners, channels = [], [], []
    for k, entry in enumerate(blocks):
        importance = channel_importance(entry.block, criterion).float()
        scores.append(importance / importance.mean().clamp_min(torch.finfo(torch.float32).tiny))
        owners.append(torch.full((entry.width,), k))
        channels.append(torch.arange(entry.width))
    order = torch.argsort(torch.cat(scores), stable=True)
    owner, channel = torch.cat(owners)[order].tolist(), torch.cat(channels)[order].tolist()
    kept = [torch.ones(entry.width, dtype=torch.bool) for entry in blocks]
    remaining = [entry.width for entry in blocks]
    for k, c in zip(owner, channel, strict=True):
        if macs <= target_macs:
            break
        if remaining[k] > min(min_channels, blocks[k].width):
            kept[k][c] = False
            remaining[k] -= 1
            macs -= blocks[k].macs_per_channel
    if macs > target_macs:
        raise ValueError(
            f"cannot reach {target_macs:,} MACs: with min_channels={min_channels} per block the model keeps {macs:,}"
        )
    return {entry.position: mask.nonzero().flatten() for entry, mask in zip(blocks, kept, strict=True)}


def _removed_channel_output(block: InvertedResidual) -> torch.Tensor:
    """Per hidden channel, the depthwise stage's output when the channel's expand gamma is 0 (a constant map)."""
    (_, expand_bn, expand_act), (dw_conv, dw_bn, dw_act) = block.layers[0], block.layers[1]
    shifted = expand_act(expand_bn.bias.detach().clone().view(1, -1, 1, 1))
    depthwise = shifted * dw_conv.weight.detach().sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
    normalised = F.batch_norm(
        depthwise, dw_bn.running_mean, dw_bn.running_var, dw_bn.weight.detach(), dw_bn.bias.detach(), eps=dw_bn.eps
    )
    return dw_act(normalised).flatten()


def _copy_block(old: InvertedResidual, new: InvertedResidual, keep: torch.Tensor) -> None:
    """The kept channels' weights; the removed channels' constant output moves into the project BN."""
    with torch.no_grad():
        for old_stage, new_stage in zip(old.layers[:2], new.layers[:2], strict=True):
            sliced = {k: v[keep] if v.dim() else v for k, v in old_stage.state_dict().items()}
            new_stage.load_state_dict(sliced)
        (old_project, old_bn), (new_project, new_bn) = old.layers[2], new.layers[2]
        removed = torch.ones(old_project.in_channels, dtype=torch.bool)
        removed[keep] = False
        new_project.weight.copy_(old_project.weight[:, keep])
        new_bn.load_state_dict(old_bn.state_dict())
        shift = old_project.weight[:, removed, 0, 0] @ _removed_channel_output(old)[removed]
        new_bn.running_mean.sub_(shift)


def apply_pruning(model: nn.Module, keep: dict[int, torch.Tensor]) -> nn.Module:
    """A new, smaller model keeping `keep[position]` hidden channels of each prunable block (others as they are).

    Its `config` carries the per-block widths as `hidden`, so `models.create(**config)` rebuilds it.
    """
    old_blocks = inverted_residuals(model)
    hidden = [len(keep[i]) if i in keep else b.layers[-2][0].out_channels for i, b in enumerate(old_blocks)]
    pruned = models.create(**{**model.config, "hidden": hidden})
    position = 0
    for old, new in zip(model.body, pruned.body, strict=True):
        if isinstance(old, InvertedResidual) and position in keep:
            _copy_block(old, new, keep[position])
        else:
            new.load_state_dict(old.state_dict())
        position += isinstance(old, InvertedResidual)
    pruned.head.load_state_dict(model.head.state_dict())
    return pruned.train(model.training)


def prune(
    model: nn.Module,
    *,
    target_macs: int | None = None,
    macs_ratio: float | None = None,
    criterion: str = "bn",
    min_channels: int = 8,
) -> nn.Module:
    """The model pruned to at most target_macs MACs, or macs_ratio of its own; the input model is left as it is."""
    if (target_macs is None) == (macs_ratio is None):
        raise ValueError("give exactly one of target_macs and macs_ratio")
    if macs_ratio is not None:
        if not 0 < macs_ratio <= 1:
            raise ValueError(f"macs_ratio must be in (0, 1], got {macs_ratio}")
        target_macs = int(count_macs(model, model.input_size) * macs_ratio)
    return apply_pruning(model, select_channels(model, target_macs, criterion, min_channels))
