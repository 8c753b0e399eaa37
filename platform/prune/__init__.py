"""Structured channel pruning of trained backbones to a MAC budget, and `faceforge prune` (prune, then fine-tune)."""

from faceforge.prune.channels import (
    CRITERIA,
    SUPPORTED,
    PrunableBlock,
    apply_pruning,
    channel_importance,
    inverted_residuals,
    prunable_blocks,
    prune,
    select_channels,
)

__all__ = [
    "CRITERIA",
    "SUPPORTED",
    "PrunableBlock",
    "apply_pruning",
    "channel_importance",
    "inverted_residuals",
    "prunable_blocks",
    "prune",
    "select_channels",
]
