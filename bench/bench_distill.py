"""Distillation on the demo data: the same student trained from scratch and distilled, same recipe and budget.

1. A teacher (default MobileFaceNet width 1, 512-d) is trained with the demo recipe, unless --teacher gives
   a checkpoint.
2. The student (default MobileFaceNet width 0.5, 512-d) is trained twice with the same recipe, seed and
   --steps: once from scratch, once with `faceforge distill` (--preset, cached teacher features, plus any
   --distill overrides).
3. All three are evaluated the same way on LFW-format pairs (10-fold accuracy, TAR@FAR, flip TTA), and
   timed at batch 1 on one thread (the teacher/student latency ratio).

The recipe is `faceforge demo`'s: 64 px, CosFace s=32 m=0.35, SGD 0.1 cosine, global batch 64 on 2 gloo
ranks, centre crop 0.75 of ../shared/data/celeba_ids, LFW crop 0.5. At 64 px both widths train at about the
same 80 img/s on 2 quiet cores (MobileFaceNet is overhead-bound there), so the defaults take about 35 minutes:
teacher ~13, each student ~8, evaluation ~2 per model (twice that on a machine shared with other jobs).
Run from the repo root:

    .venv/bin/python bench/bench_distill.py
    .venv/bin/python bench/bench_distill.py --teacher runs/bench_distill/teacher/checkpoints --preset arcdistill
    .venv/bin/python bench/bench_distill.py --teacher-steps 20 --steps 10 --train-root platform/data/sample/train \
        --pairs platform/data/sample/lfw/pairs.txt --pairs-root platform/data/sample/lfw   # smoke run, ~4 min
Aligned crops: --train-root /work/aligned/celeba_ids --train-crop 1 --pairs <aligned lfw>/pairs.txt
--pairs-root <aligned lfw> --eval-crop 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import machine_line
from torch import nn

from faceforge.data import load_pairs
from faceforge.eval import embed_images, evaluate_verification
from faceforge.jobs.spec import compose_config
from faceforge.models.card import count_macs, count_params, measure_latency_ms
from faceforge.train.checkpoint import load_backbone
from faceforge.train.launch import launch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RECIPE = ["trainer=demo", "head=cosface", "head.s=32", "head.m3=0.35", "eval=none", "mlflow.log_model=false"]


def train(name: str, model: list[str], steps: int, args: argparse.Namespace, extra: list[str]) -> tuple[Path, float]:
    """One run of the recipe; returns its checkpoint directory and wall time."""
    out = args.out / name
    overrides = [
        *RECIPE,
        *model,
        f"model.input_size={args.input_size}",
        f"trainer.steps={steps}",
        f"trainer.nproc={args.nproc}",
        f"data.root={args.train_root}",
        f"data.crop_fraction={args.train_crop}",
        f"mlflow.tracking_uri=sqlite:///{args.out.resolve()}/mlflow.db",
        "mlflow.experiment=bench_distill",
        f"mlflow.run_name={name}",
        *extra,
    ]
    print(f"\n== {name}: {' '.join(overrides)}", flush=True)
    cfg = compose_config(overrides, output_dir=str(out))
    start = time.perf_counter()
    launch(cfg)
    return out / "checkpoints", time.perf_counter() - start


def measure(name: str, model: nn.Module, args: argparse.Namespace, train_seconds: float | None) -> dict[str, float]:
    vset = load_pairs(args.pairs, args.pairs_root)
    torch.set_num_threads(args.eval_threads)
    features = embed_images(model, vset.images, input_size=model.input_size, crop_fraction=args.eval_crop)
    metrics = evaluate_verification(features, vset)
    row = {
        "model": name,
        "params_m": count_params(model) / 1e6,
        "mmacs": count_macs(model, model.input_size) / 1e6,
        "latency_ms": measure_latency_ms(model, model.input_size, args.latency_runs),
        "train_min": float("nan") if train_seconds is None else train_seconds / 60,
        # A small pair set has no operating point at FAR 1e-3; the table shows nan there.
        "tar_far_1e-03": float("nan"),
        **metrics,
    }
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| model | params (M) | MMACs | latency b1 (ms) | train (min) | LFW accuracy | ROC AUC | TAR@FAR=1e-2 | "
        "TAR@FAR=1e-3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_m']:.2f} | {r['mmacs']:.0f} | {r['latency_ms']:.2f} | {r['train_min']:.1f} | "
            f"{r['accuracy']:.4f} ± {r['accuracy_std']:.3f} | {r['roc_auc']:.3f} | {r['tar_far_1e-02']:.3f} | "
            f"{r['tar_far_1e-03']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_distill"))
    parser.add_argument("--teacher", type=Path, help="a teacher checkpoint; default: train one first")
    parser.add_argument("--teacher-model", default="mobilefacenet")
    parser.add_argument("--teacher-width", type=float, default=1.0)
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-model", default="mobilefacenet")
    parser.add_argument("--student-width", type=float, default=0.5)
    parser.add_argument(
        "--embedding-dim",
        type=int,
        default=512,
        help="both models'; a different teacher width is handled by the projection",
    )
    parser.add_argument("--steps", type=int, default=600, help="each student's step budget")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--preset", default="embedding", help="distill preset: embedding or arcdistill")
    parser.add_argument("--distill", nargs="*", default=[], help="more overrides for the distilled run only")
    parser.add_argument("--train-root", type=Path, default=SHARED / "celeba_ids")
    parser.add_argument("--train-crop", type=float, default=0.75)
    parser.add_argument("--pairs", type=Path, default=SHARED / "lfw" / "pairs.txt")
    parser.add_argument("--pairs-root", type=Path, default=SHARED / "lfw")
    parser.add_argument("--eval-crop", type=float, default=0.5)
    parser.add_argument("--eval-threads", type=int, default=2)
    parser.add_argument("--latency-runs", type=int, default=50)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(machine_line(f"torch {torch.__version__}", f"{args.nproc} ranks x 1 thread"), flush=True)

    dim = f"model.embedding_dim={args.embedding_dim}"
    teacher_model = [f"model={args.teacher_model}", f"model.width={args.teacher_width}", dim]
    student_model = [f"model={args.student_model}", f"model.width={args.student_width}", dim]
    teacher_seconds = None
    teacher = args.teacher
    if teacher is None:
        teacher, teacher_seconds = train("teacher", teacher_model, args.teacher_steps, args, [])
    scratch, scratch_seconds = train("student-scratch", student_model, args.steps, args, [])
    distill = [f"distill={args.preset}", f"distill.teacher={teacher.resolve()}", "distill.cache=true"]
    distill.append(f"distill.cache_dir={args.out.resolve()}/distill_cache")
    distilled, distilled_seconds = train("student-distilled", student_model, args.steps, args, distill + args.distill)

    rows = [
        measure(f"teacher {args.teacher_model} x{args.teacher_width:g}", load_backbone(teacher), args, teacher_seconds),
        measure(
            f"student {args.student_model} x{args.student_width:g}, scratch",
            load_backbone(scratch),
            args,
            scratch_seconds,
        ),
        measure(
            f"student {args.student_model} x{args.student_width:g}, distilled ({args.preset})",
            load_backbone(distilled),
            args,
            distilled_seconds,
        ),
    ]
    print("\n" + table(rows))
    teacher_row, scratch_row, distilled_row = rows
    print(f"\nteacher/student latency ratio: {teacher_row['latency_ms'] / scratch_row['latency_ms']:.2f}x")
    print(
        f"distilled - scratch: accuracy {distilled_row['accuracy'] - scratch_row['accuracy']:+.4f}, "
        f"TAR@FAR=1e-2 {distilled_row['tar_far_1e-02'] - scratch_row['tar_far_1e-02']:+.3f}, "
        f"TAR@FAR=1e-3 {distilled_row['tar_far_1e-03'] - scratch_row['tar_far_1e-03']:+.3f}"
    )
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
