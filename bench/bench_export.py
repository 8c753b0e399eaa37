"""ONNX export and int8 quantisation per backbone: file size, onnxruntime latency and embedding fidelity.

Every backbone (width 1, 512-d, 112 px unless told) is exported with BatchNorm folded, then quantised with
static QDQ (per-channel int8 weights, uint8 activations) calibrated on --calibration-count CelebA faces.
Latency is onnxruntime's at batch 1 on one thread: the median of --runs runs after warm-up, the best of
--repeats such medians taken in turn for fp32 and int8. Size and latency do not depend on the weights, so
these rows use untrained backbones (with random BatchNorm statistics, see `trained_like`).

Fidelity needs trained weights (a random network has no structure for int8 to keep: its cosines mean
nothing), so it is measured for each --checkpoint, and with --train-steps N for every backbone, each first
trained N steps on CelebA (2 ranks, the demo data recipe) by the trainer's `launch`: the cosine between
the int8 and fp32 embeddings of --faces LFW faces (centre crop 0.5, as in evaluation), mean and 1st percentile.

With --calibration-methods M..., each --checkpoint is instead quantised once per calibration method, calibrated as
`faceforge export` calibrates it by default (up to --calibration-count images of the training data and crop the
checkpoint recorded), through quantize_int8. Besides quantize.CALIBRATION_METHODS, it takes the methods tried and
not offered (TRIED below). Each row gives the card's fidelity (quantize.int8_fidelity: held-out calibration-set faces,
or the calibration faces when calibration read them all), the agreement on --faces faces of --lfw-root at
--lfw-crop, the wall time of quantize_int8 and its process's peak RSS (measured in a forked child).

The PReLU rows compare three forms of MobileFaceNet (the first PReLU --checkpoint's weights if given): torch's
nn.PReLU (an ONNX PRelu node), the platform's relu(x) - a*relu(-x), and ReLU (untrained). Run from the repo
root on a quiet machine (10-20 minutes for all backbones):

    .venv/bin/python bench/bench_export.py
    .venv/bin/python bench/bench_export.py --models mobilefacenet --checkpoint runs/train/X/checkpoints
    .venv/bin/python bench/bench_export.py --input-size 64 --train-steps 80 --no-prelu-rows   # fidelity per backbone
    .venv/bin/python bench/bench_export.py --checkpoint runs/train/X/checkpoints \
        --calibration-methods minmax percentile --lfw-root /work/aligned/lfw --lfw-crop 1.0   # calibration methods
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
from machine import machine_line
from onnxruntime.quantization import CalibrationMethod
from torch import nn

from faceforge import models
from faceforge.data import open_dataset
from faceforge.export import (
    FaceCalibrationReader,
    embedding_agreement,
    export_onnx,
    int8_fidelity,
    largest_activation,
    onnx_latency_ms,
    open_calibration_images,
    quantize,
    quantize_int8,
    training_data_of,
)
from faceforge.jobs.spec import compose_config
from faceforge.models.card import count_macs, count_params
from faceforge.models.layers import PReLU
from faceforge.train.checkpoint import load_backbone
from faceforge.train.launch import launch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_CROP = 0.75  # configs/data/demo.yaml
LFW_CROP = 0.5  # configs/eval/demo.yaml
MB = 1e6
# Calibrations tried and not offered by `faceforge export` (quantize.CALIBRATION_METHODS says why), run through the
# same quantize_int8 when --calibration-methods names them.
TRIED = {
    "percentile-99.9": (CalibrationMethod.Percentile, {"CalibPercentile": 99.9}),
    "percentile-99.99": (CalibrationMethod.Percentile, {"CalibPercentile": 99.99}),
    "entropy": (CalibrationMethod.Entropy, {}),
    "distribution": (CalibrationMethod.Distribution, {}),
}


@torch.no_grad()
def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics, so folded biases differ as trained ones do.

    Fresh BatchNorms fold into all-zero biases, which onnxruntime stores once for all layers: the
    file would come out smaller than any trained model's.
    """
    generator = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.1)
    return model.eval()


def briefly_trained(name: str, args: argparse.Namespace, work: Path) -> nn.Module:
    """`name` trained --train-steps steps on CelebA with the trainer (2 ranks): weights and BatchNorm statistics
    of real faces, which is what int8 must keep."""
    run = work / f"train-{name}"
    overrides = [
        f"model={name}",
        f"model.width={args.width:g}",
        f"model.input_size={args.input_size}",
        f"model.embedding_dim={args.embedding_dim}",
        "data=folder",
        f"data.root={SHARED / 'celeba_ids'}",
        f"data.crop_fraction={TRAIN_CROP}",
        "eval=none",
        "trainer.nproc=2",
        f"trainer.steps={args.train_steps}",
        f"trainer.checkpoint_every={args.train_steps}",
        f"schedule.warmup_steps={max(1, args.train_steps // 10)}",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        "mlflow.experiment=bench_export",
    ]
    launch(compose_config(overrides, output_dir=str(run)))
    return load_backbone(run / "checkpoints")


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


def best_latencies(paths: list[Path], input_size: int, runs: int, repeats: int) -> list[float]:
    """The lowest of `repeats` interleaved medians per model: other jobs on a shared machine only add time."""
    best = [math.inf] * len(paths)
    for _ in range(repeats):
        best = [min(ms, onnx_latency_ms(path, input_size, runs)) for ms, path in zip(best, paths, strict=True)]
    return best


def measure(label: str, model: nn.Module, args: argparse.Namespace, work: Path, lfw: list[bytes] | None) -> None:
    """One table row; `lfw` faces for the fidelity columns of trained models, None for untrained ones."""
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
    fp32_ms, int8_ms = best_latencies([fp32, int8], input_size, args.runs, args.repeats)
    fidelity = "- | -"
    if lfw is not None:
        agreement = embedding_agreement(fp32, int8, lfw, input_size=input_size, crop_fraction=args.lfw_crop)
        fidelity = f"{agreement['mean_cosine']:.4f} | {agreement['p1_cosine']:.4f}"
    print(
        f"| {label} | {input_size} | {count_params(model) / 1e6:.2f} | {count_macs(model, input_size) / 1e6:.0f} | "
        f"{fp32.stat().st_size / MB:.3f} | {int8.stat().st_size / MB:.3f} | {fp32_ms:.2f} | {int8_ms:.2f} | "
        f"{fp32_ms / int8_ms:.2f} | {fidelity} | {largest_activation(int8).bytes / 1024:.0f} |",
        flush=True,
    )


def quantize_in_child(fp32: Path, int8: Path, reader: FaceCalibrationReader, method: str) -> tuple[float, float]:
    """quantize_int8 in a forked child: (seconds, the child's peak RSS in MB). A process's peak RSS never falls,
    so each method gets a fresh one, starting from this process's footprint."""

    def run(results: multiprocessing.Queue) -> None:
        start = time.perf_counter()
        quantize_int8(fp32, int8, reader, method)
        results.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=run, args=(results,))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"quantising with {method} failed (exit code {child.exitcode})")
    return results.get()


def compare_calibrations(checkpoint: str, args: argparse.Namespace, work: Path, lfw: list[bytes]) -> None:
    """One row per --calibration method for `checkpoint`, calibrated as `faceforge export` does by default."""
    model = load_backbone(checkpoint)
    root, crop = training_data_of(checkpoint)
    reader = FaceCalibrationReader(
        open_dataset(root), input_size=model.input_size, crop_fraction=crop, count=args.calibration_count
    )
    fp32 = export_onnx(model, model.input_size, work / "calibrated.onnx")
    config = model.config
    label = f"{config['name']} {config['width']:g}x, {config['input_size']} px, {config['act']} ({checkpoint})"
    for method in args.calibration_methods:
        int8 = work / f"calibrated_{method}.onnx"
        seconds, peak_mb = quantize_in_child(fp32, int8, reader, method)
        card = int8_fidelity(fp32, int8, reader)
        held = (
            f"{card['mean_cosine']:.4f} | {card['p1_cosine']:.4f} | {card['faces']:.0f} "
            f"{'held-out' if card['held_out'] else 'calibration'}"
        )
        faces = embedding_agreement(fp32, int8, lfw, input_size=model.input_size, crop_fraction=args.lfw_crop)
        print(
            f"| {label} | {method} | {len(reader)} in {len(reader.batches)} x {reader.batch_size} | {held} | "
            f"{faces['mean_cosine']:.4f} | {faces['p1_cosine']:.4f} | {seconds:.1f} | {peak_mb:.0f} |",
            flush=True,
        )


def simd_flags() -> str:
    """The x86 vector extensions onnxruntime's int8 kernels choose between (VNNI: 8-bit dot products)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    known = [flag for flag in ("avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni") if flag in flags]
    return f"SIMD {' '.join(known) or '-'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=models.list_models())
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--embedding-dim", type=int, default=512)
    parser.add_argument("--runs", type=int, default=100, help="timed runs per latency (median)")
    parser.add_argument("--repeats", type=int, default=3, help="latency: the best of this many medians")
    parser.add_argument("--faces", type=int, default=500, help="LFW faces for the fidelity columns")
    parser.add_argument("--calibration-count", type=int, default=256)
    parser.add_argument("--checkpoint", nargs="*", default=[], help="trained checkpoints: rows with fidelity")
    parser.add_argument("--no-prelu-rows", action="store_true", help="skip the PReLU comparison")
    parser.add_argument("--train-steps", type=int, default=0, help="train each backbone this long: fidelity rows")
    parser.add_argument(
        "--calibration-methods", nargs="+", default=[], help="compare these int8 calibrations on each --checkpoint"
    )
    parser.add_argument("--lfw-root", type=Path, default=SHARED / "lfw", help="the fidelity columns' faces")
    parser.add_argument("--lfw-crop", type=float, default=LFW_CROP, help="their crop (1.0 for aligned crops)")
    args = parser.parse_args()
    if not (SHARED / "celeba_ids").is_dir():
        raise SystemExit(f"{SHARED}: shared face data not found")
    torch.set_num_threads(1)
    print(
        machine_line(simd_flags(), f"torch {torch.__version__}", f"onnxruntime {onnxruntime.__version__}"), flush=True
    )
    lfw_paths = sorted(args.lfw_root.glob("*/*.jpg"))
    lfw = [path.read_bytes() for path in lfw_paths[:: max(1, len(lfw_paths) // args.faces)][: args.faces]]
    if args.calibration_methods:
        quantize.CALIBRATION_METHODS.update(TRIED)
        columns = "calibration | images, batches | card mean cos | card p1 cos | card faces | LFW mean cos | LFW p1 cos"
        print(f"\n| model | {columns} | quantise s | peak RSS (MB) |")
        print("| --- | --- | --- " + "| ---: " * 2 + "| --- " + "| ---: " * 4 + "|")
        with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
            for checkpoint in args.checkpoint:
                compare_calibrations(checkpoint, args, Path(tmp), lfw)
        return

    def untrained(name: str, act: str = "prelu") -> nn.Module:
        size, dim = args.input_size, args.embedding_dim
        return trained_like(models.create(name, width=args.width, input_size=size, embedding_dim=dim, act=act))

    print(
        "\n| model | input | params (M) | MACs (M) | fp32 (MB) | int8 (MB) | fp32 ms | int8 ms | speed-up | "
        "mean cos | p1 cos | largest act. (KiB) |\n| --- " + "| ---: " * 11 + "|"
    )
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        for name in args.models:
            if args.train_steps:
                measure(f"{name}, trained {args.train_steps} steps", briefly_trained(name, args, work), args, work, lfw)
            else:
                measure(name, untrained(name), args, work, None)
        trained = [load_backbone(path) for path in args.checkpoint]
        for path, model in zip(args.checkpoint, trained, strict=True):
            config = model.config
            measure(f"{config['name']} {config['width']:g}x, {config['act']}, trained ({path})", model, args, work, lfw)
        if not args.no_prelu_rows:
            trained_prelu = next((model for model in trained if model.config["act"] == "prelu"), None)
            prelu = trained_prelu or untrained("mobilefacenet")
            faces = lfw if trained_prelu else None
            measure(f"{prelu.config['name']}, nn.PReLU", with_torch_prelu(prelu), args, work, faces)
            measure(f"{prelu.config['name']}, relu(x) - a*relu(-x)", prelu, args, work, faces)
            relu = trained_like(models.create(**{**prelu.config, "act": "relu"}))
            measure(f"{prelu.config['name']}, ReLU (untrained)", relu, args, work, None)


if __name__ == "__main__":
    main()
