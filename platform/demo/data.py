"""The demo's data: base training set, inbox of albums with its ground truth, union training set, clustering scores.

The base model trains on most identities of the training set; the rest are held out and arrive as raw photos
in an inbox of albums (some people in two albums), so the auto-labeller meets only people the base model never
saw, and the ground truth it is scored against is known. The base photos and the LFW pairs' photos are aligned
to the template the auto-labeller crops faces with, so every model trains and is evaluated on the faces it will
label. Training folders are folders of links, never copies.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from faceforge.data.folder import identity_images, list_images
from faceforge.data.sample_data import DemoData, pair_files, sample_pairs, write_pairs
from faceforge.data_pipeline.align import align_tree, list_sources
from faceforge.data_pipeline.align import read_manifest as read_align_manifest
from faceforge.data_pipeline.cluster_metrics import ClusterScores, cluster_scores
from faceforge.data_pipeline.versions import IMAGES, read_manifest
from faceforge.demo.profile import Profile

SEED = 0
UNLABELLED = "unlabelled/"  # prefix of the singleton label of a photo that no version holds a face of


@dataclass(frozen=True)
class DemoSets:
    base_photos: Path  # <identity>/<photo> links to the raw photos the base model trains on, once aligned
    pair_photos: Path  # <name>/<name>_NNNN.jpg links to the raw LFW photos the pairs name
    base: Path  # identity folder of links to the aligned base crops (written by `align_set`)
    pairs_root: Path  # the aligned pair photos (links, written by `align_set`)
    inbox: Path  # <album>/<photo>: what the auto-labeller consumes
    truth: Path  # {"album/photo": identity} of every inbox photo
    pairs: Path  # the LFW pairs every model is evaluated on
    base_identities: int
    base_images: int
    photos: int


def split_identities(folders: list[Path], held_out: int, min_photos: int) -> tuple[list[Path], list[Path]]:
    """(base, held out): a seeded draw among the people with at least `min_photos`, so a rerun holds out the same."""
    eligible = [i for i, folder in enumerate(folders) if len(list_images(folder)) >= min_photos]
    if held_out > len(eligible) or held_out >= len(folders):
        raise ValueError(
            f"cannot hold out {held_out} of {len(folders)} identities ({len(eligible)} with {min_photos} photos) "
            "and keep some to train on"
        )
    chosen = set(random.Random(SEED).sample(eligible, held_out))
    return [f for i, f in enumerate(folders) if i not in chosen], [f for i, f in enumerate(folders) if i in chosen]


def deal_albums(people: list[Path], profile: Profile) -> dict[str, dict[str, str]]:
    """{album: {photo name: identity}}: person i lives in album i mod A; the first `split_identities` people
    have the second half of their photos in the next album."""
    rng = random.Random(SEED)
    albums: dict[str, dict[str, str]] = {f"album-{a + 1}": {} for a in range(profile.albums)}
    for i, person in enumerate(people):
        photos = list_images(person)
        if len(photos) < profile.photos_per_identity:
            raise ValueError(f"{person}: {len(photos)} photos, the profile needs {profile.photos_per_identity}")
        picked = sorted(rng.sample(photos, profile.photos_per_identity), key=lambda p: p.name)
        home, other = f"album-{i % profile.albums + 1}", f"album-{(i + 1) % profile.albums + 1}"
        half = len(picked) // 2 if i < profile.split_identities else len(picked)
        for k, photo in enumerate(picked):
            album = albums[home if k < half else other]
            name = f"{person.name}-{photo.name}"  # unique in its album; the label is read from the truth file
            album[name] = str(photo)
    return albums


def base_photos(folders: list[Path], profile: Profile) -> list[Path]:
    """The photos the base model trains on: a seeded draw of the profile's identities and photos of each (all of
    them when it sets no cap), so a small profile aligns a handful of photos and still takes the same path."""
    rng = random.Random(SEED)
    if profile.base_identities is not None and profile.base_identities < len(folders):
        folders = sorted(rng.sample(folders, profile.base_identities))
    photos = []
    for folder in folders:
        images = list_images(folder)
        cap = profile.base_photos_per_identity
        photos += images if cap is None or cap >= len(images) else sorted(rng.sample(images, cap))
    return photos


def link_files(files: dict[str, Path], dst: Path) -> None:
    """A tree of real folders holding a link per file ({relative path: file}), for a tool that walks folders."""
    for name, file in files.items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).symlink_to(file.resolve())


def link_aligned(photos: Path, aligned: Path, sources: list[str], dst: Path) -> Counter[str]:
    """Links under dst to the crops of `sources` in `aligned` (the `align_tree` output of photos, which may hold
    more of them), mirroring their folders; the sources counted by status (aligned, no_face, error)."""
    records = read_align_manifest(photos, aligned)
    if dst.exists():  # links only: a rerun rebuilds them
        shutil.rmtree(dst)
    counts: Counter[str] = Counter()
    for source in sources:
        counts[records[source][0]["status"]] += 1
        for record in records[source]:
            if record["status"] == "aligned":
                (dst / record["output"]).parent.mkdir(parents=True, exist_ok=True)
                (dst / record["output"]).symlink_to(aligned / record["output"])
    return counts


def align_set(
    photos: Path, source: Path, cache: Path, dst: Path, workers: int, **options: object
) -> tuple[Counter[str], int]:
    """Align a tree of links to photos of `source` into a cache folder keyed by `source` and `options`, then link
    the crops of exactly these photos under dst; (counts by status, photos this call had to align). The cache is
    resumable and outlives the demo's runs: photos an earlier run aligned are not aligned again."""
    key = json.dumps({"source": str(source.resolve()), **options}, sort_keys=True)
    aligned = cache / f"aligned-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    counts = align_tree(photos, aligned, workers=workers, chunk_size=32, **options)  # type: ignore[arg-type]
    new = counts["aligned"] + counts["no_face"] + counts["error"]
    return link_aligned(photos, aligned.resolve(), list_sources(photos, exclude=aligned), dst), new


def link_identities(folders: list[Path], dst: Path) -> None:
    """An image folder whose identity sub-folders are links to `folders` (resolved, so links never chain)."""
    dst.mkdir(parents=True)
    for folder in folders:
        link = dst / folder.name
        if link.exists():
            raise ValueError(f"identity {folder.name} appears twice in {dst}")
        link.symlink_to(folder.resolve(), target_is_directory=True)


def build_sets(data: DemoData, profile: Profile, root: Path) -> DemoSets:
    """Write photos/ (links to the base and pair photos to align), inbox/, truth.json and pairs.txt under `root`
    (which must not exist yet)."""
    folders = list(identity_images(data.train_root))
    base, held_out = split_identities(folders, profile.held_out_identities, profile.photos_per_identity)
    training = base_photos(base, profile)
    link_files({f"{p.parent.name}/{p.name}": p for p in training}, root / "photos" / "base")
    truth: dict[str, str] = {}
    for album, photos in deal_albums(held_out, profile).items():
        (root / "inbox" / album).mkdir(parents=True)
        for name, source in photos.items():
            shutil.copyfile(source, root / "inbox" / album / name)  # copies: the auto-labeller moves them away
            truth[f"{album}/{name}"] = Path(source).parent.name
    (root / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    folds, per_fold, kept = sample_pairs(data.pairs, profile.pairs_per_fold, random.Random(SEED))
    write_pairs(root / "pairs.txt", folds, per_fold, kept)
    needed = {name: data.pairs_root / name for name in pair_files(kept)}
    if missing := [str(file) for file in needed.values() if not file.is_file()]:
        raise FileNotFoundError(f"{len(missing)} photos the pairs name are missing, e.g. {missing[0]}")
    link_files(needed, root / "photos" / "lfw")
    return DemoSets(
        base_photos=root / "photos" / "base",
        pair_photos=root / "photos" / "lfw",
        base=root / "base",
        pairs_root=root / "lfw",
        inbox=root / "inbox",
        truth=root / "truth.json",
        pairs=root / "pairs.txt",
        base_identities=len({p.parent for p in training}),
        base_images=len(training),
        photos=len(truth),
    )


def union_folder(base: Path, version: Path, dst: Path) -> tuple[int, int]:
    """The base set plus a dataset version's identities as one image folder of links; (identities, images)."""
    added = [p for p in sorted((version / IMAGES).iterdir()) if p.is_dir()]
    if dst.exists():  # a rerun rebuilds it: links only, nothing of value is lost
        shutil.rmtree(dst)
    link_identities([*sorted(p for p in base.iterdir() if p.is_dir()), *added], dst)
    folders = [p for p in dst.iterdir() if p.is_dir()]
    return len(folders), sum(len(list_images(p)) for p in folders)


def photo_labels(version: Path, truth: dict[str, str]) -> dict[str, str]:
    """The identity a version gives each inbox photo (its first face's); photos it holds no face of (rejected,
    dropped, left unclustered) are each a cluster of their own, so every round is scored on the same photos."""
    labels: dict[str, str] = {}
    for record in sorted(read_manifest(version), key=lambda r: r["face"]):
        labels.setdefault(record["source"], record["identity"])
    return {photo: labels.get(photo, UNLABELLED + photo) for photo in sorted(truth)}


def score_version(version: Path, truth_file: Path, out: Path) -> ClusterScores:
    """Score a version against the ground truth; `out` keeps its labels for `faceforge data cluster-eval`."""
    truth = json.loads(truth_file.read_text())
    predicted = photo_labels(version, truth)
    out.write_text(json.dumps(predicted, indent=1) + "\n")
    return cluster_scores(list(predicted.values()), [truth[photo] for photo in predicted])
