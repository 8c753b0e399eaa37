"""De-duplication through the whole auto-label daemon: LFW people split over 3 albums, injected copies.

The inbox: LFW people with >= 4 photos dealt round-robin over 3 albums (`dedup.deal_into_albums`), people with
2-3 photos whole in one album (no partner: any merge of theirs is false), and --duplicates injected copies of
random photos: a third byte-for-byte copies, a third re-encoded (JPEG quality 40), a third resized to 70%, each
in a random album under a new name. A disjoint quarter of the people, aligned, is the known-identity folder the
daemon calibrates its thresholds on (FMR --fmr). One `faceforge autolabel run` round with --model (a checkpoint
or model URI; a model trained by `faceforge demo` on aligned crops is the intended one), then, from the version:

- copies removed: of an exact copy and its original, the one processed second must be rejected as a duplicate
  file; a re-encoded or resized copy must leave the faces of only one of the two photos in the dataset (the
  near-duplicate drop keeps the better quality; a photo of two people keeps both faces);
- album merges: a merge is false when the two album clusters' majority people differ; recall is the share of
  same-person album-cluster pairs that end in one identity; pairwise P/R of the identities against the truth.

Run from the repo root:

    .venv/bin/python bench/bench_dedup.py --model runs/train/<run>/checkpoints
    .venv/bin/python bench/bench_dedup.py --model M --people 150 --duplicates 60 --fmr 1e-3
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch
from machine import machine_line

from faceforge.data_pipeline import align_tree, cluster_scores
from faceforge.data_pipeline.autolabel import Autolabeller, RoundReport, calibrated_thresholds, load_config
from faceforge.data_pipeline.dedup import deal_into_albums
from faceforge.data_pipeline.versions import read_manifest

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
KINDS = ("exact", "reencoded", "resized")


def person_of(name: str) -> str:
    return name.rsplit("_", 1)[0]


def build_inbox(root: Path, people: int, duplicates: int, seed: int) -> tuple[Path, Path, dict[str, tuple[str, str]]]:
    """(inbox, known identity folder of raw photos, injected copy -> (kind, original inbox path))."""
    rng = random.Random(seed)
    folders = sorted(d for d in LFW.iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) >= 2)
    rng.shuffle(folders)
    known, used = folders[: people // 4], folders[people // 4 : people]
    known_root = root / "known_raw"
    for folder in known:
        shutil.copytree(folder, known_root / folder.name)
    photos = [p for folder in used for p in sorted(folder.glob("*.jpg"))]
    names = np.array([person_of(p.stem) for p in photos])
    albums = deal_into_albums(names, split_from=4, seed=seed)
    inbox = root / "inbox"
    placed = []
    for photo, album in zip(photos, albums.tolist(), strict=True):
        (inbox / f"album{album}").mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, inbox / f"album{album}" / photo.name)
        placed.append(f"album{album}/{photo.name}")
    injected = {}
    for i, original in enumerate(rng.sample(placed, duplicates)):
        kind = KINDS[i % 3]
        target = f"album{rng.randrange(3)}/{Path(original).stem}_copy{i}.jpg"
        image = cv2.imread(str(inbox / original))
        if kind == "exact":
            shutil.copy(inbox / original, inbox / target)
        elif kind == "reencoded":
            cv2.imwrite(str(inbox / target), image, [cv2.IMWRITE_JPEG_QUALITY, 40])
        else:
            small = cv2.resize(image, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(inbox / target), small, [cv2.IMWRITE_JPEG_QUALITY, 95])
        injected[target] = (kind, original)
    return inbox, known_root, injected


def true_person(source: str) -> str:
    return person_of(Path(source).stem.split("_copy")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or MLflow model URI")
    parser.add_argument("--people", type=int, default=400, help="LFW people with >= 2 photos (a quarter known)")
    parser.add_argument("--duplicates", type=int, default=90)
    parser.add_argument("--fmr", type=float, default=1e-3)
    parser.add_argument("--margin", type=float, default=0.01, help="album merge runner-up margin")
    parser.add_argument("--cluster-threshold", type=float, default=None, help="default: the calibrated one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(machine_line(f"torch {torch.__version__}, {torch.get_num_threads()} threads"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inbox, known_raw, injected = build_inbox(root, args.people, args.duplicates, args.seed)
        align_tree(known_raw, root / "known", "mtcnn", workers=1, fallbacks=("center",), progress=False)
        (root / "known" / "manifest.jsonl").unlink()
        overrides = [
            f"model={args.model}",
            "settle_seconds=0",
            f"dedup.known_root={root / 'known'}",
            f"dedup.fmr={args.fmr}",
            f"dedup.album_margin={args.margin}",
            "batch_files=32",
        ]
        labeller = Autolabeller(inbox, root / "work", load_config(None, overrides), log=lambda _: None)
        labeller.scan()
        opened = labeller.next_round()
        assert opened is not None
        model = labeller.model_for(opened.model, opened.model_source)
        threshold = args.cluster_threshold  # by default the album clustering too is at the calibrated FMR
        if threshold is None:
            threshold = calibrated_thresholds(labeller.config.dedup, labeller.reference_sets(model))["album"]
        labeller.config.cluster.threshold = threshold
        start = time.perf_counter()
        report = labeller.run_once()
        seconds = time.perf_counter() - start
        assert report is not None
        print(f"\none round: {seconds:.0f} s")
        report_figures(args, report, root / "work", injected, threshold)


def report_figures(
    args: argparse.Namespace, report: RoundReport, workdir: Path, injected: dict[str, tuple[str, str]], threshold: float
) -> None:
    version = workdir / "versions" / report.version
    manifest = read_manifest(version)
    decisions = [json.loads(line) for line in (version / "decisions.jsonl").read_text().splitlines()]
    in_dataset = Counter(r["source"] for r in manifest)
    with sqlite3.connect(workdir / "state.db") as db:
        outcome = dict(db.execute("SELECT album || '/' || name, COALESCE(reason, outcome) FROM files"))
    removed = Counter()
    for copy, (kind, original) in injected.items():
        if kind == "exact":  # whichever of the two was processed second is rejected
            removed[kind] += outcome[copy].startswith("duplicate") or outcome[original].startswith("duplicate")
        else:  # faces of one photo of the pair left at most (a copy with no face kept counts as removed too)
            removed[kind] += min(in_dataset[copy], in_dataset[original]) == 0
    count = Counter(kind for kind, _ in injected.values())
    # Album clusters: majority person of each (album, cluster) of the version.
    members: dict[str, list[str]] = {}
    for r in manifest:
        members.setdefault(f"{r['album']}/{r['cluster']}", []).append(true_person(r["source"]))
    majority = {key: Counter(people).most_common(1)[0][0] for key, people in members.items()}
    merges = [d for d in decisions if d["reason"] == "album_merge"]
    merged_pairs = [(d["subject"], d["target"]) for d in merges if d["subject"] in majority and d["target"] in majority]
    false = sum(majority[a] != majority[b] for a, b in merged_pairs)
    identity_of = {f"{r['album']}/{r['cluster']}": r["identity"] for r in manifest}
    keys = sorted(majority)
    same = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :] if majority[a] == majority[b]]
    same = [(a, b) for a, b in same if a.split("/")[0] != b.split("/")[0]]
    joined = sum(identity_of[a] == identity_of[b] for a, b in same)
    scores = cluster_scores(
        np.array([r["identity"] for r in manifest]), np.array([true_person(r["source"]) for r in manifest])
    )
    stats = report.stats
    print(f"\n{report.files} files, {stats['images']} faces in the version, {stats['identities']} identities; "
          f"thresholds {stats['thresholds']} (FMR {args.fmr:g}), album clustering {threshold:.3f}, "
          f"margin {args.margin}")  # fmt: skip
    print("\n| injected | count | removed |\n| --- | --- | --- |")
    for kind in KINDS:
        print(f"| {kind} | {count[kind]} | {removed[kind]} ({removed[kind] / max(count[kind], 1):.0%}) |")
    print("\n| album merges | false merges | same-person album-cluster pairs | joined | pairwise P | pairwise R |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {len(merges)} | {false} ({false / max(len(merged_pairs), 1):.2%}) | {len(same)} | "
        f"{joined} ({joined / max(len(same), 1):.2%}) | "
        f"{scores.pairwise_precision:.4f} | {scores.pairwise_recall:.4f} |"
    )


if __name__ == "__main__":
    main()
