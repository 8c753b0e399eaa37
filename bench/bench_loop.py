"""The loop closes: people the auto-label daemon finds in unlabelled photos make the next model better.

LFW's pairs.txt folds are identity-disjoint. The pairs of --eval-folds are the test. Of the other folds' people,
--calibration-people with >= 2 crops are drawn at random as the small labelled set a team keeps for calibration;
the raw photos of all the rest go, unlabelled, into one inbox album. One daemon round labels them with --model:
thresholds calibrated on the calibration people (not on the training set: the model separates the people it trained
on too well), at FMR --fmr for pairs and clustering (or --cluster-threshold) and at the config's FPIR for matches
against the known and test people, the training set as the known identities and the test people's aligned crops as
the evaluation folder whose matches it must drop. The demo recipe (64 px MobileFaceNet, CosFace s=32 m=0.35, global
batch 64, one rank of one thread per arm) is then trained, with the same steps and seed, on three sets and
evaluated on the test pairs:

- base: the training set alone;
- pseudo: plus the daemon's new version (its images/ folder, identities as the daemon named them);
- labelled: plus the same people's aligned crops under their true names (people with >= 2 crops): the ceiling.

The labelling model is evaluated on the test pairs too. --train-root and --lfw-aligned are aligned crops
(`faceforge data align`). Each arm takes about 17 min; --jobs 2 runs two at once on 2 cores. Run from the repo root:

    .venv/bin/python bench/bench_loop.py --model <checkpoint> --train-root <aligned celeba_ids> \
        --lfw-aligned <aligned lfw>
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_line

from faceforge.data import load_pairs
from faceforge.data_pipeline import cluster_scores
from faceforge.data_pipeline.autolabel import Autolabeller, calibrated_thresholds, load_config
from faceforge.data_pipeline.versions import IMAGES, read_manifest
from faceforge.eval import evaluate_model
from faceforge.eval.sources import load_model
from faceforge.registry.database import prepare_tracking

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
RECIPE = [
    "trainer=demo",
    "trainer.nproc=1",
    "model=mobilefacenet",
    "head=cosface",
    "head.s=32",
    "head.m3=0.35",
    "data.crop_fraction=1.0",
    "data.num_workers=1",
    "eval=none",
    "mlflow.log_model=false",
]


def split_pairs(pairs_txt: Path, eval_folds: set[int]) -> tuple[list[str], set[str], set[str]]:
    """(the test folds' pair lines, test people, everyone else in pairs.txt)."""
    lines = [line for line in pairs_txt.read_text().splitlines() if line.strip()]
    per_fold = 2 * int(lines[0].split()[1])
    test_lines, test_people, other_people = [], set(), set()
    for index, line in enumerate(lines[1:]):
        fields = line.split()
        people = {fields[0]} if len(fields) == 3 else {fields[0], fields[2]}
        if index // per_fold in eval_folds:
            test_lines.append(line)
            test_people |= people
        else:
            other_people |= people
    assert not test_people & other_people, "pairs.txt folds must be identity-disjoint"
    return test_lines, test_people, other_people


def link_identities(target: Path, roots: list[Path], names: set[str] | None = None) -> tuple[int, int]:
    """An image folder of per-file symlinks to the identity folders of roots (the same name merges); counts.

    The daemon names a face matching a known person `known_<name>`: it joins that person's class.
    """
    for root in roots:
        for folder in sorted(d for d in root.iterdir() if d.is_dir() and (names is None or d.name in names)):
            person = target / folder.name.removeprefix("known_")
            person.mkdir(parents=True, exist_ok=True)
            for image in folder.iterdir():
                (person / image.name).symlink_to(image.resolve())
    identities = [d for d in target.iterdir() if d.is_dir()]
    return len(identities), sum(len(list(d.iterdir())) for d in identities)


def label_round(args: argparse.Namespace, inbox: Path, known: Path, test_crops: Path, calibration: Path) -> Path:
    """One daemon round over the inbox; prints what it did and how its identities score; returns the version."""
    overrides = [
        f"model={args.model}",
        "settle_seconds=0",
        "batch_files=32",
        f"dedup.known_root={known}",
        f"dedup.eval_root={test_crops}",
        f"dedup.calibration_root={calibration}",
        f"dedup.fmr={args.fmr}",
    ]
    labeller = Autolabeller(inbox, args.out / "autolabel", load_config(None, overrides), log=lambda _: None)
    labeller.scan()
    opened = labeller.next_round()
    assert opened is not None
    model = labeller.model_for(opened.model, opened.model_source)
    references = labeller.reference_sets(model)
    at_fmr = calibrated_thresholds(labeller.config.dedup, references)["album"]
    on_training_set = calibrated_thresholds(labeller.config.dedup, {"known": references["known"]})["album"]
    threshold = args.cluster_threshold or at_fmr
    print(f"threshold at FMR {args.fmr:g}: {at_fmr:.3f} on the calibration people, {on_training_set:.3f} on the "
          "training set")  # fmt: skip
    labeller.config.cluster.threshold = threshold
    start = time.perf_counter()
    report = labeller.run_once()
    assert report is not None
    version = args.out / "autolabel" / "versions" / report.version
    manifest = read_manifest(version)
    truth = [Path(r["source"]).stem.rsplit("_", 1)[0] for r in manifest]
    scores = cluster_scores(np.array([r["identity"] for r in manifest]), np.array(truth))
    stats = report.stats
    print(f"\nlabelling round: {report.files} photos in {time.perf_counter() - start:.0f} s; clustering threshold "
          f"{threshold:.3f}; thresholds {stats['thresholds']}")  # fmt: skip
    print(f"version {report.version}: {stats['identities']} identities ({stats['new_identities']} new), "
          f"{stats['images']} faces of {len(set(truth))} people; files {stats['files']}; drops {stats['drops']}; "
          f"merges {stats['merges']}; unclustered faces {stats['unclustered_faces']}")  # fmt: skip
    print(f"against the true names: {scores.format()}")
    return version


def train_arms(args: argparse.Namespace, roots: dict[str, Path]) -> dict[str, Path]:
    """Train the recipe on each root, --jobs at a time; returns each arm's checkpoint directory."""
    tracking_uri = f"sqlite:///{args.out.resolve()}/mlflow.db"
    prepare_tracking(tracking_uri, "bench_loop")  # before the concurrent writers
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running = list(roots.items()), []
    while pending or running:
        while pending and len(running) < args.jobs:
            name, root = pending.pop(0)
            command = [
                sys.executable, "-m", "faceforge.train", *RECIPE,
                f"model.input_size={args.input_size}",
                f"trainer.steps={args.steps}",
                f"data.root={root}",
                f"mlflow.tracking_uri={tracking_uri}",
                "mlflow.experiment=bench_loop",
                f"mlflow.run_name={name}",
                f"hydra.run.dir={args.out / name}",
            ]  # fmt: skip
            log = (args.out / f"{name}.log").open("w")
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"training {name} on {root} (log {args.out / name}.log)", flush=True)
        time.sleep(5)
        for entry in [e for e in running if e[1].poll() is not None]:
            name, process, log = entry
            log.close()
            running.remove(entry)
            if process.returncode != 0:
                raise SystemExit(f"{name} failed with code {process.returncode}; see {args.out / name}.log")
    return {name: args.out / name / "checkpoints" for name in roots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="labelling model: checkpoint directory or MLflow model URI")
    parser.add_argument("--train-root", type=Path, required=True, help="aligned training set (image folder)")
    parser.add_argument("--lfw-aligned", type=Path, required=True, help="aligned crops of ../shared/data/lfw")
    parser.add_argument("--eval-folds", default="0-4", help="test folds of pairs.txt, first-last")
    parser.add_argument("--calibration-people", type=int, default=100, help="labelled, taken out of the inbox")
    parser.add_argument("--fmr", type=float, default=1e-3)
    parser.add_argument("--cluster-threshold", type=float, help="default: the threshold at --fmr")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_loop"))
    args = parser.parse_args()
    print(machine_line(f"torch {torch.__version__}, {torch.get_num_threads()} threads"))
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; pass a fresh --out")
    first, last = (int(x) for x in args.eval_folds.split("-"))
    test_lines, test_people, train_people = split_pairs(LFW / "pairs.txt", set(range(first, last + 1)))
    pairs_txt = args.out / "test_pairs.txt"
    pairs_txt.parent.mkdir(parents=True)
    pairs_txt.write_text(f"{last - first + 1}\t{len(test_lines) // (2 * (last - first + 1))}\n" + "\n".join(test_lines))
    multi = sorted(n for n in train_people if len(list((args.lfw_aligned / n).glob("*"))) >= 2)
    calibration_people = set(random.Random(0).sample(multi, args.calibration_people))
    inbox_people = train_people - calibration_people
    print(f"test: folds {args.eval_folds}, {len(test_lines)} pairs of {len(test_people)} people; calibration: "
          f"{len(calibration_people)} people; inbox: the other {len(inbox_people)}")  # fmt: skip

    inbox = args.out / "inbox" / "lfw"
    inbox.mkdir(parents=True)
    for name in sorted(inbox_people):
        for photo in (LFW / name).glob("*.jpg"):
            shutil.copy(photo, inbox / photo.name)
    test_crops, calibration = args.out / "test_crops", args.out / "calibration_crops"
    link_identities(test_crops, [args.lfw_aligned], test_people)
    link_identities(calibration, [args.lfw_aligned], calibration_people)
    sets = {"base": args.out / "sets" / "base"}
    counts = {"base": link_identities(sets["base"], [args.train_root])}
    version = label_round(args, inbox.parent, sets["base"], test_crops, calibration)
    sets["pseudo"] = args.out / "sets" / "pseudo"
    counts["pseudo"] = link_identities(sets["pseudo"], [args.train_root, version / IMAGES])
    sets["labelled"] = args.out / "sets" / "labelled"
    link_identities(sets["labelled"], [args.train_root])
    counts["labelled"] = link_identities(sets["labelled"], [args.lfw_aligned], set(multi) & inbox_people)

    checkpoints = train_arms(args, sets)
    torch.set_num_threads(2)
    print(f"\n| arm | identities | images | accuracy ({len(test_lines)} test pairs) | ROC AUC | EER | "
          "TAR@FAR=1e-2 | TAR@FAR=1e-3 |\n| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")  # fmt: skip
    rows = {"labelling model": (args.model, ("-", "-"))}
    rows.update({name: (str(path), counts[name]) for name, path in checkpoints.items()})
    test = load_pairs(pairs_txt, args.lfw_aligned)
    for name, (source, (identities, images)) in rows.items():
        model = load_model(source)
        m = evaluate_model(model, test, input_size=model.input_size, crop_fraction=1.0)
        tail = f"{m['roc_auc']:.3f} | {m['eer']:.3f} | {m['tar_far_1e-02']:.3f} | {m['tar_far_1e-03']:.3f} |"
        print(f"| {name} | {identities} | {images} | {m['accuracy']:.4f} ± {m['accuracy_std']:.3f} | {tail}")


if __name__ == "__main__":
    main()
