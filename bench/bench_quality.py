"""Face quality: milliseconds per face for the heuristics, and whether they predict errors on LFW pairs.

1. Speed: `score_face` on aligned 112 px LFW crops already in memory (one OpenCV thread), and `score_aligned`
   end to end (JPEG decode included).
2. Thresholds: how many LFW crops fail the default `QualityConfig`, by reason.
3. Error-versus-reject on the 6,000 pairs of ../shared/data/lfw/pairs.txt with dlib's features
   (../shared/data/lfw_dlib128_features.npz): the threshold is fixed at each FMR over all 3,000 impostor pairs,
   then the lowest-quality genuine pairs (pair quality = the worse face's) are discarded; FNMR of the rest, for
   the combined score and for each factor alone. A falling curve means the measure predicts the errors.

Crops come from ../aligned/lfw (`faceforge data align` of lfw with MTCNN) when present, otherwise the script
aligns lfw into a temporary folder first (MTCNN, then Haar, then a centre box for photos with no face found; a
few minutes). Run from the repo root:

    .venv/bin/python bench/bench_quality.py                       # about a minute with ../aligned/lfw
    .venv/bin/python bench/bench_quality.py --fmrs 1e-3 --plot runs/quality_erc.png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from machine import machine_line

from faceforge.data import read_image
from faceforge.data_pipeline import align_tree
from faceforge.data_pipeline.align import MANIFEST
from faceforge.data_pipeline.quality import (
    QualityConfig,
    QualityScore,
    quality_eval,
    save_erc_plot,
    score_aligned,
    score_face,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ALIGNED = Path(__file__).resolve().parents[2] / "aligned" / "lfw"
FEATURES = SHARED / "lfw_dlib128_features.npz"


def bench_speed(aligned: Path, faces: int) -> dict[str, QualityScore]:
    records = [json.loads(line) for line in (aligned / MANIFEST).read_text().splitlines()]
    records = [record for record in records if record["status"] == "aligned"][:faces]
    crops = [read_image(aligned / record["output"]) for record in records]
    landmarks = [np.array(record["landmarks"]) for record in records]
    for crop, points in zip(crops[:20], landmarks, strict=False):  # warm-up
        score_face(crop, points)
    start = time.perf_counter()
    for crop, points in zip(crops, landmarks, strict=True):
        score_face(crop, points)
    in_memory = (time.perf_counter() - start) / len(crops) * 1e3
    start = time.perf_counter()
    scores = score_aligned(aligned)
    end_to_end = (time.perf_counter() - start) / len(scores) * 1e3
    print("\n| step | faces | ms per face |\n| --- | --- | --- |")
    print(f"| score_face, crop in memory | {len(crops)} | {in_memory:.3f} |")
    print(f"| score_aligned: read JPEG crop + score_face | {len(scores)} | {end_to_end:.3f} |", flush=True)
    return scores


def bench_reasons(scores: dict[str, QualityScore]) -> None:
    config = QualityConfig()
    reasons = Counter(reason for score in scores.values() for reason in score.reasons(config))
    failing = sum(bool(score.reasons(config)) for score in scores.values())
    print(f"\n{failing} of {len(scores)} LFW crops ({failing / len(scores):.1%}) fail the default thresholds {config}")
    print("\n| reason | crops |\n| --- | --- |")
    for reason, count in reasons.most_common():
        print(f"| {reason} | {count} |")


def bench_erc(aligned: Path, fmrs: list[float], plot: Path | None) -> None:
    for fmr in fmrs:
        curves = quality_eval(SHARED / "lfw" / "pairs.txt", SHARED / "lfw", aligned, FEATURES, fmr=fmr)
        fractions = [fraction for fraction, _ in curves["score"]]
        print(f"\n## Error versus reject, LFW pairs, dlib features, FNMR at FMR {fmr:g}\n")
        print("| measure | " + " | ".join(f"{fraction:.0%}" for fraction in fractions) + " |")
        print("| --- |" + " --- |" * len(fractions))
        for name, curve in curves.items():
            print(f"| {name} | " + " | ".join(f"{fnmr:.4f}" for _, fnmr in curve) + " |", flush=True)
        if plot:
            path = plot.with_name(f"{plot.stem}_fmr{fmr:g}{plot.suffix}")
            print(f"\nplot: {save_erc_plot(curves, path, f'LFW pairs, dlib features, FMR {fmr:g}')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aligned", type=Path, default=ALIGNED, help="align_tree output of ../shared/data/lfw")
    parser.add_argument("--faces", type=int, default=2000, help="crops timed in memory")
    parser.add_argument("--fmrs", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--plot", type=Path, help="write one ERC PNG per FMR next to this path")
    args = parser.parse_args()
    if not (SHARED / "lfw").is_dir():
        raise SystemExit(f"{SHARED / 'lfw'}: LFW not found")
    cv2.setNumThreads(1)
    print(machine_line(f"OpenCV {cv2.__version__}", "1 OpenCV thread"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        aligned = args.aligned
        if not (aligned / MANIFEST).is_file():
            print(f"{aligned}: no aligned LFW; aligning ../shared/data/lfw now", flush=True)
            aligned = Path(tmp) / "lfw"
            align_tree(SHARED / "lfw", aligned, "mtcnn", workers=2, fallbacks=("haar", "center"), progress=False)
        bench_reasons(bench_speed(aligned, args.faces))
        bench_erc(aligned, args.fmrs, args.plot)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end (other jobs on the 2 cores slow every figure)")


if __name__ == "__main__":
    main()
