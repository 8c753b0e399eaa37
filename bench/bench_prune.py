"""Accuracy against MACs for channel-pruned models: prune a trained checkpoint to several MAC ratios, fine-tune each.

For each ratio the checkpoint is pruned (`faceforge.prune`, BN-scale importance by default), evaluated as it is,
then fine-tuned for --steps with `trainer.init_from` (a fresh head, the recipe below) and evaluated again. The
unpruned model is evaluated too and, unless --no-control, fine-tuned for the same steps, so the table separates
what pruning costs from what the extra training adds. Evaluation: 10-fold accuracy and TAR@FAR on LFW-format
pairs with flip TTA; MACs at batch 1 with the model cards' counter (FLOPs / 2).

The model measured in docs/benchmarks.md is the demo's MobileFaceNet (64 px, 512-d) trained on aligned CelebA
crops; the default fine-tuning recipe is its own: CosFace s=32 m=0.35, SGD, grad clip 5, global batch 64 on 2 gloo
ranks, at a tenth of its learning rate. The training set and the pairs are `faceforge data align` outputs of
../shared/data/celeba_ids and ../shared/data/lfw (ALIGNED below). Run from the repo root:

    .venv/bin/python bench/bench_prune.py --model CHECKPOINT                # ~30 min on 2 cores
    .venv/bin/python bench/bench_prune.py --model CHECKPOINT --steps 5 --ratios 0.5 --pairs-per-fold 10 --no-control
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from machine import machine_line
from torch import nn

from faceforge.data import load_pairs
from faceforge.data.verification import VerificationSet
from faceforge.eval import embed_images, evaluate_verification
from faceforge.jobs.spec import compose_config
from faceforge.models.card import count_macs, count_params
from faceforge.prune import prune
from faceforge.prune.cli import save_pruned
from faceforge.train.checkpoint import load_backbone, resolve_checkpoint
from faceforge.train.launch import launch

ALIGNED = Path(__file__).resolve().parents[2] / "aligned"  # beside the repository, as bench_quality's
RECIPE = ["head=cosface", "head.s=32", "head.m3=0.35", "trainer.grad_clip=5", "eval=none", "mlflow.log_model=false"]


def fine_tune(name: str, init: Path, args: argparse.Namespace) -> tuple[Path, float]:
    """A normal training run from `init`'s backbone; returns its checkpoint directory and wall time."""
    out = args.out / name
    overrides = [
        *RECIPE,
        f"trainer.init_from={init.resolve()}",
        f"trainer.steps={args.steps}",
        f"trainer.nproc={args.nproc}",
        f"trainer.checkpoint_every={args.steps}",
        f"schedule.warmup_steps={args.warmup_steps}",
        f"optim.lr={args.lr}",
        f"data.root={args.train_root}",
        f"data.crop_fraction={args.train_crop}",
        f"data.batch_size={args.batch_size}",
        f"mlflow.tracking_uri=sqlite:///{args.out.resolve()}/mlflow.db",
        "mlflow.experiment=bench_prune",
        f"mlflow.run_name={name}",
        *args.overrides,
    ]
    print(f"\n== fine-tune {name}: {' '.join(overrides)}", flush=True)
    start = time.perf_counter()
    launch(compose_config(overrides, output_dir=str(out)))
    return out / "checkpoints", time.perf_counter() - start


def pairs_subset(pairs: Path, per_fold: int, out: Path) -> Path:
    """An LFW-format pairs file with the first `per_fold` matched and mismatched pairs of every fold."""
    lines = pairs.read_text().splitlines()
    folds, n = (int(x) for x in lines[0].split())
    kept = []
    for fold in range(folds):
        block = lines[1 + fold * 2 * n : 1 + (fold + 1) * 2 * n]
        kept += block[:per_fold] + block[n : n + per_fold]
    out.write_text(f"{folds}\t{per_fold}\n" + "\n".join(kept) + "\n")
    return out


def accuracy(model: nn.Module, vset: VerificationSet, args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.eval_threads)
    features = embed_images(model, vset.images, input_size=model.input_size, crop_fraction=args.eval_crop)
    return evaluate_verification(features, vset)


def row(name: str, model: nn.Module, before: dict[str, float], after: dict[str, float] | None) -> dict[str, Any]:
    result = {
        "model": name,
        "params_m": count_params(model) / 1e6,
        "mmacs": count_macs(model, model.input_size) / 1e6,
        "hidden": model.config.get("hidden"),
        "before": before,
        "after": after,
    }
    print(json.dumps(result), flush=True)
    return result


def table(rows: list[dict[str, Any]], full_mmacs: float, steps: int) -> str:
    def cell(metrics: dict[str, float] | None) -> str:
        if metrics is None:
            return "- | -"
        return f"{metrics['accuracy']:.4f} ± {metrics['accuracy_std']:.3f} | {metrics['tar_far_1e-02']:.3f}"

    lines = [
        f"| model | params (M) | MMACs | MACs ratio | LFW accuracy | TAR@FAR=1e-2 | accuracy, +{steps} steps | "
        f"TAR@FAR=1e-2, +{steps} steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_m']:.3f} | {r['mmacs']:.1f} | {r['mmacs'] / full_mmacs:.3f} | "
            f"{cell(r['before'])} | {cell(r['after'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a trained checkpoint to prune")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.35], help="MAC budgets")
    parser.add_argument("--criterion", choices=("bn", "l1"), default="bn")
    parser.add_argument("--min-channels", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per pruned model")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="also fine-tune the unpruned model for the same steps")  # fmt: skip
    parser.add_argument("--overrides", nargs="*", default=[], help="more training overrides, e.g. head.s=64")
    parser.add_argument("--train-root", type=Path, default=ALIGNED / "celeba_ids")
    parser.add_argument("--train-crop", type=float, default=1.0)
    parser.add_argument("--pairs", type=Path, default=ALIGNED / "lfw" / "pairs.txt")
    parser.add_argument("--pairs-root", type=Path, default=ALIGNED / "lfw")
    parser.add_argument("--pairs-per-fold", type=int, default=None, help="fewer pairs per fold (smoke runs)")
    parser.add_argument("--eval-crop", type=float, default=1.0)
    parser.add_argument("--eval-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_prune"))
    args = parser.parse_args()
    for path in (args.train_root, args.pairs, args.pairs_root):
        if not path.exists():
            parser.error(f"{path} not found: give --train-root, --pairs and --pairs-root (aligned crops)")
    args.out.mkdir(parents=True, exist_ok=True)
    print(machine_line(f"torch {torch.__version__}", f"{args.nproc} ranks x 1 thread"), flush=True)

    source = resolve_checkpoint(args.model)
    original = load_backbone(source)
    pairs = pairs_subset(args.pairs, args.pairs_per_fold, args.out / "pairs.txt") if args.pairs_per_fold else args.pairs
    vset = load_pairs(pairs, args.pairs_root)
    print(f"model {source}: {original.config}; {vset.num_pairs} pairs of {args.pairs}", flush=True)

    control = fine_tune("control", source, args)[0] if args.control else None
    rows = [
        row(
            f"{original.config['name']} (unpruned)",
            original,
            accuracy(original, vset, args),
            accuracy(load_backbone(control), vset, args) if control else None,
        )
    ]
    for ratio in args.ratios:
        pruned = prune(original, macs_ratio=ratio, criterion=args.criterion, min_channels=args.min_channels)
        record = {"source": str(source), "criterion": args.criterion, "macs_ratio": ratio}
        pruned_dir = save_pruned(pruned, args.out / f"pruned_{ratio:g}", record)
        before = accuracy(pruned, vset, args)
        tuned, seconds = fine_tune(f"finetune_{ratio:g}", pruned_dir, args)
        print(f"fine-tuned in {seconds / 60:.1f} min", flush=True)
        after = accuracy(load_backbone(tuned), vset, args)
        rows.append(row(f"pruned to {ratio:g} ({args.criterion})", pruned, before, after))

    full_mmacs = rows[0]["mmacs"]
    print("\n" + table(rows, full_mmacs, args.steps))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
