"""ONNX export and int8 quantisation per backbone: file size, onnxruntime latency and embedding fidelity.

Every backbone (width 1, 512-d, 112 px unless told) is exported with BatchNorm folded, then quantised with
static QDQ (per-channel int8 weights, int8 activations) calibrated on --calibration-count CelebA faces.
Latency is onnxruntime's at batch 1 on one thread, the median of --runs runs after warm-up. Fidelity is the
cosine between the int8 and fp32 embeddings of --faces LFW faces (centre crop 0.5 as in evaluation): mean and
1st percentile.

Untrained weights would make fidelity meaningless (random BatchNorm statistics, no structure to keep), so
without --checkpoint each model's BatchNorm statistics are first re-estimated on real faces (forward passes
in train mode, a cumulative average), which gives activation ranges like a trained network's; with
--checkpoint NAME=PATH that row uses trained weights instead.

The PReLU rows compare three forms of MobileFaceNet: torch's nn.PReLU (an ONNX PRelu node), the platform's
relu(x) - a*relu(-x) rewrite, and ReLU. Run from the repo root on a quiet machine (10-20 minutes for all):

    .venv/bin/python bench/bench_export.py
    .venv/bin/python bench/bench_export.py --models mobilefacenet --checkpoint mobilefacenet=runs/train/X/checkpoints
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from faceforge import models
from faceforge.data import EvalTransform
from faceforge.eval import embed_images
from faceforge.export import (
    FaceCalibrationReader,
    OnnxEmbedder,
    export_onnx,
    largest_activation,
    onnx_latency_ms,
    open_calibration_images,
    quantize_int8,
)
from faceforge.models.card import count_macs, count_params
from faceforge.models.layers import PReLU
from faceforge.train.checkpoint import load_backbone

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_CROP = 0.75  # configs/data/demo.yaml
LFW_CROP = 0.5  # configs/eval/demo.yaml
MIB = 2**20


def machine_line() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown CPU")
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, load average {os.getloadavg()[0]:.2f} at start"
    )


@torch.no_grad()
def estimate_batchnorm(model: nn.Module, faces: list[np.ndarray], input_size: int) -> nn.Module:
    """Replace BatchNorm running statistics with their average over real faces (momentum None: cumulative)."""
    transform = EvalTransform(input_size, TRAIN_CROP)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for start in range(0, len(faces), 32):
        model(torch.stack([transform(face) for face in faces[start : start + 32]]))
    for bn in batchnorms:
        bn.momentum = 0.1
    return model.eval()


def with_torch_prelu(model: nn.Module) -> nn.Module:
    """A copy whose PReLUs are torch's own nn.PReLU (exported as a PRelu node), same slopes."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, PReLU):
                replacement = nn.PReLU(child.num_parameters)
                replacement.weight.data.copy_(child.weight.data)
                setattr(parent, name, replacement)
    return model


def measure(label: str, model: nn.Module, args: argparse.Namespace, work: Path, lfw: list[bytes]) -> None:
    input_size = model.input_size
    stem = "".join(c if c.isalnum() else "_" for c in label)
    fp32 = export_onnx(model, input_size, work / f"{stem}.onnx")
    reader = FaceCalibrationReader(
        open_calibration_images(SHARED / "celeba_ids"),
        input_size=input_size,
        crop_fraction=TRAIN_CROP,
        count=args.calibration_count,
    )
    int8 = quantize_int8(fp32, work / f"{stem}_int8.onnx", reader)
    fp32_ms, int8_ms = onnx_latency_ms(fp32, input_size, args.runs), onnx_latency_ms(int8, input_size, args.runs)
    embed = dict(input_size=input_size, crop_fraction=LFW_CROP, flip=False)
    cosine = (embed_images(OnnxEmbedder(fp32), lfw, **embed) * embed_images(OnnxEmbedder(int8), lfw, **embed)).sum(1)
    activation = largest_activation(int8)
    print(
        f"| {label} | {count_params(model) / 1e6:.2f} | {count_macs(model, input_size) / 1e6:.0f} | "
        f"{fp32.stat().st_size / MIB:.2f} | {int8.stat().st_size / MIB:.2f} | {fp32_ms:.2f} | {int8_ms:.2f} | "
        f"{fp32_ms / int8_ms:.2f} | {cosine.mean():.4f} | {np.percentile(cosine, 1):.4f} | "
        f"{activation.bytes / 1024:.0f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=models.list_models())
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--embedding-dim", type=int, default=512)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per latency (median)")
    parser.add_argument("--faces", type=int, default=300, help="LFW faces for the fidelity columns")
    parser.add_argument("--calibration-count", type=int, default=256)
    parser.add_argument("--checkpoint", action="append", default=[], help="NAME=PATH: trained weights for NAME")
    parser.add_argument("--no-prelu-rows", action="store_true", help="skip the PReLU comparison")
    args = parser.parse_args()
    if not (SHARED / "celeba_ids").is_dir():
        raise SystemExit(f"{SHARED}: shared face data not found")
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    torch.set_num_threads(1)
    print(machine_line(), flush=True)

    celeba = open_calibration_images(SHARED / "celeba_ids")
    statistics_faces = [celeba.read_image(i) for i in range(0, len(celeba), max(1, len(celeba) // 512))]
    lfw_paths = sorted((SHARED / "lfw").glob("*/*.jpg"))
    lfw = [path.read_bytes() for path in lfw_paths[:: max(1, len(lfw_paths) // args.faces)][: args.faces]]

    def build(name: str, act: str) -> nn.Module:
        if name in checkpoints:
            return load_backbone(checkpoints[name])
        model = models.create(
            name, width=args.width, input_size=args.input_size, embedding_dim=args.embedding_dim, act=act
        )
        return estimate_batchnorm(model, statistics_faces, args.input_size)

    print(
        "\n| model | params (M) | MACs (M) | fp32 (MiB) | int8 (MiB) | fp32 ms | int8 ms | speed-up | "
        "mean cos | p1 cos | largest act. (KiB) |\n" + "| --- " * 1 + "| ---: " * 10 + "|"
    )
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        for name in args.models:
            measure(name, build(name, "prelu"), args, work, lfw)
        if not args.no_prelu_rows:
            ours = build("mobilefacenet", "prelu")
            measure("mobilefacenet, nn.PReLU", with_torch_prelu(ours), args, work, lfw)
            measure("mobilefacenet, relu(x) - a*relu(-x)", ours, args, work, lfw)
            measure("mobilefacenet, ReLU", build("mobilefacenet", "relu"), args, work, lfw)


if __name__ == "__main__":
    main()
