"""`faceforge prune MODEL --macs-ratio 0.5 [train overrides]`: prune a trained backbone, then fine-tune it.

The pruned backbone is written as a checkpoint directory (model.pt: weights, model config with the kept widths,
and how it was pruned); fine-tuning is `faceforge train ++trainer.init_from=<that directory> <overrides>`, so it
runs, logs to MLflow and resumes like any training run. Give data.root and the recipe (steps, lr, head) as
overrides, as for `faceforge train`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from torch import nn


def save_pruned(model: nn.Module, directory: Path, record: dict[str, Any]) -> Path:
    """A checkpoint directory that `load_backbone` and `trainer.init_from` read; `record` says how it was made.

    A directory already holding a checkpoint is refused: its model.pt would be lost, and beside a `latest`
    pointer the pruned weights would never be the ones loaded.
    """
    import torch

    from faceforge.train.checkpoint import LATEST

    held = [name for name in ("model.pt", LATEST) if (directory / name).exists()]
    if held:
        raise FileExistsError(f"{directory} already holds a checkpoint ({', '.join(held)}); choose a new --out")
    directory.mkdir(parents=True, exist_ok=True)
    state = {"model_config": model.config, "model": model.state_dict(), "prune": record}
    torch.save(state, directory / "model.pt")
    return directory


def main(args: argparse.Namespace) -> None:
    """The command: prune `args.model`, save it, print the before/after card, then fine-tune unless told not to."""
    from faceforge.eval.sources import load_model
    from faceforge.jobs.paths import faceforge_home
    from faceforge.models.card import count_macs, count_params
    from faceforge.prune.channels import prune

    model = load_model(args.model, args.tracking_uri)
    pruned = prune(
        model,
        target_macs=args.target_macs,
        macs_ratio=args.macs_ratio,
        criterion=args.criterion,
        min_channels=args.min_channels,
    )
    size = model.input_size
    before, after = count_macs(model, size), count_macs(pruned, size)
    record = {"source": str(args.model), "criterion": args.criterion, "macs_before": before, "macs_after": after}
    out = args.out or faceforge_home() / "pruned" / f"{model.config['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    save_pruned(pruned, out, record)
    params = f"params {count_params(model) / 1e6:.3f}M -> {count_params(pruned) / 1e6:.3f}M"
    print(f"{params}, MACs {before / 1e6:.1f}M -> {after / 1e6:.1f}M ({after / before:.3f}), by {args.criterion}")
    print(f"hidden widths: {pruned.config['hidden']}")
    print(f"pruned checkpoint: {out}", flush=True)
    if args.no_finetune:
        return
    from faceforge.jobs import quoted_path
    from faceforge.train.app import main as train_main

    # ++ adds the key even under a trainer preset that does not declare it.
    train_main([f"++trainer.init_from={quoted_path(out)}", *args.overrides])
