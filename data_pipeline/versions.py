"""Immutable, versioned auto-labelled datasets: one folder per round, written whole or not at all.

A version is `<versions>/vNNNN/` with
- `manifest.jsonl`: one line per face (image hash, source, box, landmarks, quality, album cluster, identity,
  round it arrived in), sorted by source, so two runs that label the same files the same way write equal bytes;
- `images/<identity>/<face>.jpg`: the aligned crops, an image folder `faceforge train data=folder` reads
  (hard links into the crop store, so a version costs no pixel copies);
- `decisions.jsonl`: every merge and drop with its reason; `stats.json`: counts and the agreement (adjusted Rand
  index) with the previous version over the faces both hold.
It is built in a hidden temporary folder and renamed into place, so readers never see half a version.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.special import comb

MANIFEST = "manifest.jsonl"
STATS = "stats.json"
DECISIONS = "decisions.jsonl"
IMAGES = "images"


@dataclass(frozen=True)
class FaceRecord:
    """One face of a version: where it came from, how good it is and who it was labelled as."""

    face: str  # <image hash>_<face index in the photo>: the crop's name in the crop store and in images/
    image_sha256: str
    source: str  # album/file name as it arrived in the inbox
    album: str
    box: list[float]
    landmarks: list[list[float]]
    quality: dict[str, float | None]
    cluster: int  # within its album
    identity: str
    round: int  # the round the photo arrived in


def version_name(number: int) -> str:
    return f"v{number:04d}"


def version_number(version: Path) -> int:
    """The round a version folder holds; versions compare by it (by name, v10000 would sort before v9999)."""
    return int(version.name[1:])


def adjusted_rand_index(a: Sequence[object], b: Sequence[object]) -> float:
    """Hubert and Arabie's ARI of two labellings of the same items: 1 for equal partitions, ~0 for chance."""
    if len(a) != len(b):
        raise ValueError(f"labellings differ in length: {len(a)} and {len(b)}")
    n = len(a)
    if n < 2:
        return 1.0
    _, a_codes = np.unique(np.asarray(a, dtype=str), return_inverse=True)
    _, b_codes = np.unique(np.asarray(b, dtype=str), return_inverse=True)
    pair_codes = a_codes.ravel().astype(np.int64) * (b_codes.max() + 1) + b_codes.ravel()
    together = comb(np.unique(pair_codes, return_counts=True)[1], 2).sum()
    in_a, in_b = comb(np.bincount(a_codes.ravel()), 2).sum(), comb(np.bincount(b_codes.ravel()), 2).sum()
    expected = in_a * in_b / comb(n, 2)
    maximum = (in_a + in_b) / 2
    if maximum == expected:  # both partitions all singletons or one block: identical structure
        return 1.0
    return float((together - expected) / (maximum - expected))


def read_manifest(version: Path) -> list[dict]:
    return [json.loads(line) for line in (version / MANIFEST).read_text().splitlines()]


def list_versions(root: Path) -> list[Path]:
    """Completed versions, oldest first (temporary folders of a build in progress are hidden)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit()]
    return sorted(found, key=version_number)


def read_stats(version: Path) -> dict:
    return json.loads((version / STATS).read_text())


def agreement(previous: Path | None, faces: Sequence[FaceRecord]) -> tuple[float | None, int]:
    """ARI between the previous version's identities and these, over the faces both contain, and their count."""
    if previous is None:
        return None, 0
    before = {record["face"]: record["identity"] for record in read_manifest(previous)}
    common = [(before[f.face], f.identity) for f in faces if f.face in before]
    if not common:
        return None, 0
    old, new = zip(*common, strict=True)
    return round(adjusted_rand_index(old, new), 6), len(common)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, target)


def write_version(
    root: Path,
    number: int,
    faces: Sequence[FaceRecord],
    crops: Path,
    decisions: Sequence[dict],
    stats: dict,
) -> Path:
    """Write version `number` under root from the crop store `crops/<face>.jpg`; returns its folder.

    If the folder already exists (a crash came after the rename, before the caller recorded it) it is returned
    as it is: a version is never rewritten.
    """
    target = root / version_name(number)
    if target.exists():
        return target
    previous = ([p for p in list_versions(root) if version_number(p) < number] or [None])[-1]
    ari, compared = agreement(previous, faces)
    for leftover in root.glob(f".{target.name}.*.tmp"):  # a build a crash interrupted (one daemon per folder)
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = root / f".{target.name}.{os.getpid()}.tmp"
    try:
        (temporary / IMAGES).mkdir(parents=True)
        for identity in sorted({f.identity for f in faces}):
            (temporary / IMAGES / identity).mkdir()
        for face in faces:
            _link_or_copy(crops / f"{face.face}.jpg", temporary / IMAGES / face.identity / f"{face.face}.jpg")
        ordered = sorted(faces, key=lambda f: (f.source, f.face))
        (temporary / MANIFEST).write_text("".join(json.dumps(asdict(f), sort_keys=True) + "\n" for f in ordered))
        (temporary / DECISIONS).write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in decisions))
        sizes = Counter(f.identity for f in faces)
        summary = {
            "version": target.name,
            "identities": len(sizes),
            "images": len(faces),
            "merges": sum(d["action"] == "merge" for d in decisions),
            "drops": dict(sorted(Counter(d["reason"] for d in decisions if d["action"] == "drop").items())),
            "previous": previous.name if previous else None,
            "ari_with_previous": ari,
            "faces_compared": compared,
            **stats,
        }
        (temporary / STATS).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        os.rename(temporary, target)
    except BaseException:  # a full disk must not stay filled by a half-written version
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target
