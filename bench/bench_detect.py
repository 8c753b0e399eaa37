"""Face detection and alignment: recall, false positives per image, 5-point landmark error, and faces/s.

Accuracy is measured on ../shared/data/detection: dlib's hand-checked faces in PASCAL VOC photos (testing.xml and
training.xml, 9 photos of about 500 px, 43 faces, many of them small). A detection matches the unmatched true
box it overlaps most at IoU >= 0.3, best score first; the rest are false positives. The landmark error compares
the 5 detected points with points derived from the 68-point annotation (eye centres = mean of each eye's
contour, nose tip 30, mouth corners 48 and 54), in pixels and over the inter-ocular distance (NME).

Throughput runs `align_tree` (decode, detect, align, JPEG-encode, write) over copies of the 12 detection photos,
those above 500 px resized to 500 px, every face of each (--all-faces): once in this process on one thread
(steady state, no start-up), once end to end with --workers processes (spawning them included). Run from the
repo root:

    .venv/bin/python bench/bench_detect.py                  # about two minutes
    .venv/bin/python bench/bench_detect.py --copies 40 --onet-thresholds 0.7 0.9 0.95
    .venv/bin/python bench/bench_detect.py --sections memory --phone-batches 1 2 4

Memory: peak RSS of one MTCNN.detect call on phone-size photos (detection photos upscaled to --phone-size, bicubic),
--phone-batches of them per call, each call in a fresh process: its RSS before the call (torch, the nets, the
photos), the peak during it (VmHWM, reset just before) and the difference.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from machine import machine_line

from faceforge.data import read_image
from faceforge.data_pipeline import MTCNN, Detector, get_detector
from faceforge.data_pipeline.align import AlignSettings, align_sources, align_tree
from faceforge.data_pipeline.detection_eval import DetectionScore, read_imglab

DETECTION = Path(__file__).resolve().parents[2] / "shared" / "data" / "detection"
SPLITS = ("testing", "training")


def accuracy_row(name: str, detector: Detector, split: str) -> str:
    truth = read_imglab(DETECTION / f"{split}_with_face_landmarks.xml")
    found = detector.detect([read_image(DETECTION / image.file) for image in truth])
    score = DetectionScore()
    for image, faces in zip(truth, found, strict=True):
        score.add(image, faces)
    px, nme = np.mean(score.landmark_px), np.mean(score.landmark_nme)
    return (
        f"| {name} | {split} | {score.images} | {score.faces} | {score.recall:.3f} | "
        f"{score.false_positives_per_image:.2f} | {px:.2f} | {nme:.3f} |"
    )


def accuracy_table(args: argparse.Namespace) -> None:
    print("| detector | split | photos | faces | recall@IoU0.3 | FP/photo | landmark px | landmark NME |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.detectors:
        for split in SPLITS:
            print(accuracy_row(name, get_detector(name), split), flush=True)
    for threshold in args.onet_thresholds:
        detector = MTCNN(thresholds=(0.6, 0.7, threshold))
        for split in SPLITS:
            print(accuracy_row(f"mtcnn, O-Net > {threshold}", detector, split), flush=True)


def photo_tree(root: Path, copies: int, longest_side: int, distinct: bool = False) -> Path:
    """Copies of the 12 detection photos in one folder per copy, the larger ones (up to 1986 px) area-resized to
    `longest_side`; `distinct` brightens copy k by k grey levels, so no two files are the same bytes."""
    src = root / "photos"
    for photo in sorted(DETECTION.glob("*.jpg")):
        image = cv2.imread(str(photo))
        scale = min(1.0, longest_side / max(image.shape[:2]))
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
        for copy in range(copies):
            (src / f"{copy:03d}").mkdir(parents=True, exist_ok=True)
            variant = cv2.add(image, (copy, copy, copy, 0)) if distinct else image
            cv2.imwrite(str(src / f"{copy:03d}" / photo.name), variant, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return src


def throughput_table(args: argparse.Namespace) -> None:
    print("\n| detector | run | photos | faces | seconds | photos/s | faces/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.detectors:
        with tempfile.TemporaryDirectory() as tmp:
            src = photo_tree(Path(tmp), args.copies, args.longest_side)
            sources = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.jpg"))
            settings = AlignSettings(src, Path(tmp) / "one", 112, True, name)
            torch.set_num_threads(1)
            detectors = settings.detectors()
            align_sources(settings, sources[:12], detectors)  # warm-up
            start = time.perf_counter()
            records = [
                r for i in range(0, len(sources), 8) for r in align_sources(settings, sources[i : i + 8], detectors)
            ]
            faces = sum(record["status"] == "aligned" for record in records)
            seconds = time.perf_counter() - start
            print(
                f"| {name} | 1 process, 1 thread | {len(sources)} | {faces} | {seconds:.1f} | "
                f"{len(sources) / seconds:.1f} | {faces / seconds:.1f} |",
                flush=True,
            )
            start = time.perf_counter()
            counts = align_tree(src, Path(tmp) / "all", name, args.workers, all_faces=True, progress=False)
            seconds = time.perf_counter() - start
            print(
                f"| {name} | align_tree, {args.workers} workers, start-up included | {counts['images']} | "
                f"{counts['aligned']} | {seconds:.1f} | {counts['images'] / seconds:.1f} | "
                f"{counts['aligned'] / seconds:.1f} |",
                flush=True,
            )


def status_mib(key: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) / 2**10


def peak_rss(photo: str, size: tuple[int, int], batch: int) -> tuple[float, float, float, list[int]]:
    """In a fresh process: RSS before detecting `batch` upscaled copies of `photo` in one call, peak RSS during it,
    seconds, faces found in each copy."""
    detector = MTCNN()
    image = read_image(DETECTION / photo)
    detector.detect([image])  # warm-up: thread pools, first-call allocations
    images = [cv2.resize(image, size, interpolation=cv2.INTER_CUBIC) for _ in range(batch)]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before, start = status_mib("VmRSS"), time.perf_counter()
    found = detector.detect(images)
    return before, status_mib("VmHWM"), time.perf_counter() - start, [len(faces) for faces in found]


def memory_table(args: argparse.Namespace) -> None:
    width, height = args.phone_size
    print(
        f"\n| photo, upscaled to {width}x{height} | photos per call | RSS before (MiB) | peak RSS (MiB) | "
        "increment (MiB) | MiB per photo | seconds | faces |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    spawn = multiprocessing.get_context("spawn")
    for photo in args.phone_photos:
        for batch in args.phone_batches:
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                before, peak, seconds, faces = pool.submit(peak_rss, photo, (width, height), batch).result()
            print(
                f"| {photo} | {batch} | {before:.0f} | {peak:.0f} | {peak - before:.0f} | "
                f"{(peak - before) / batch:.0f} | {seconds:.1f} | {faces} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=["mtcnn", "haar"], choices=["mtcnn", "haar"])
    parser.add_argument("--onet-thresholds", nargs="*", type=float, default=[], help="extra MTCNN rows")
    parser.add_argument("--copies", type=int, default=20, help="copies of the 12 photos for the throughput runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--longest-side", type=int, default=500, help="throughput photos are at most this large")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["accuracy", "throughput", "memory"],
        choices=["accuracy", "throughput", "memory"],
    )
    parser.add_argument("--phone-size", nargs=2, type=int, default=[4000, 3000], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--phone-photos", nargs="+", default=["2008_002506.jpg", "bald_guys.jpg"])
    parser.add_argument("--phone-batches", nargs="+", type=int, default=[1, 2], help="photos per detect call")
    args = parser.parse_args()
    if not DETECTION.is_dir():
        raise SystemExit(f"{DETECTION}: detection data not found")
    print(machine_line(f"torch {torch.__version__}"), flush=True)
    if "accuracy" in args.sections:
        accuracy_table(args)
    if "throughput" in args.sections:
        throughput_table(args)
    if "memory" in args.sections:
        memory_table(args)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end (other jobs on the 2 cores slow every figure)")


if __name__ == "__main__":
    main()
