"""Auto-labelling throughput: files/s and faces/s of a whole daemon round on ~500 px photos with MobileFaceNet.

The inbox holds --copies variants of the 12 photos of ../shared/data/detection (resized to at most 500 px;
each variant brightened by a few grey levels, so no two files are byte copies), one album per variant. One
`faceforge autolabel run` round decodes, detects (MTCNN), aligns, scores quality, embeds (flip-summed) every
face, then clusters, de-duplicates and writes the dataset version. Reported: the round's wall time and its
rates, with model loading excluded (the daemon loads it once for all its rounds). The model is a MobileFaceNet
(width 1, 112 px, 512-d, PReLU) checkpoint given by --model, or a freshly initialised one of the same shape:
the speed is the same. Run from the repo root on a quiet machine:

    .venv/bin/python bench/bench_autolabel.py                   # about a minute
    .venv/bin/python bench/bench_autolabel.py --copies 16 --threads 1
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import cv2
import torch
from bench_detect import photo_tree
from machine import machine_line

from faceforge import models
from faceforge.data_pipeline.autolabel import Autolabeller, load_config


def model_checkpoint(root: Path, given: str | None) -> str:
    if given:
        return given
    model = models.create("mobilefacenet", embedding_dim=512, width=1.0, input_size=112, act="prelu")
    (root / "model").mkdir()
    torch.save({"model_config": model.config, "model": model.state_dict()}, root / "model" / "model.pt")
    return str(root / "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="variants of each of the 12 photos")
    parser.add_argument("--longest-side", type=int, default=500)
    parser.add_argument("--model", default=None, help="a MobileFaceNet checkpoint (default: a fresh one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(f"torch {torch.__version__}, {args.threads} thread(s)"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inbox = photo_tree(root, args.copies, args.longest_side, distinct=True)
        config = load_config(None, [f"model={model_checkpoint(root, args.model)}", "settle_seconds=0"])
        labeller = Autolabeller(inbox, root / "work", config, log=lambda _: None)
        labeller.scan()
        opened = labeller.next_round()
        assert opened is not None
        labeller.model_for(opened.model, opened.model_source)  # loaded once, as in a running daemon
        labeller.detector.detect([cv2.imread(str(next(inbox.rglob("*.jpg"))))[..., ::-1].copy()])  # warm up
        start = time.perf_counter()
        report = labeller.run_once()
        seconds = time.perf_counter() - start
        assert report is not None
        with sqlite3.connect(root / "work" / "state.db") as db:
            faces, kept = db.execute("SELECT COUNT(*), SUM(kept) FROM faces").fetchone()
        files = report.files
        print(f"\n{files} photos of <= {args.longest_side} px in {args.copies} albums, one round: {seconds:.1f} s")
        print("| files/s | faces/s (detected) | faces kept | identities | rejects by reason |")
        print("| --- | --- | --- | --- | --- |")
        rejects = {k: v for k, v in report.stats["files"].items() if k != "labelled"}
        print(
            f"| {files / seconds:.2f} | {faces / seconds:.2f} | {kept} | {report.stats['identities']} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(rejects.items())) or 'none'} |"
        )


if __name__ == "__main__":
    main()
