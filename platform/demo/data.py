"""The demo's data: base training set, inbox of albums with its ground truth, union training set, clustering scores.

The base model trains on most identities of the training set; the rest are held out and arrive as raw photos
in an inbox of albums (some people in two albums), so the auto-labeller meets only people the base model never
saw, and the ground truth it is scored against is known. Training folders are folders of links, never copies.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from faceforge.data.folder import list_images
from faceforge.data.sample_data import DemoData, sample_pairs
from faceforge.data_pipeline.cluster_metrics import ClusterScores, cluster_scores
from faceforge.data_pipeline.versions import IMAGES, read_manifest
from faceforge.demo.profile import Profile

SEED = 0
UNLABELLED = "unlabelled/"  # prefix of the singleton label of a photo that no version holds a face of


@dataclass(frozen=True)
class DemoSets:
    base: Path  # identity folder of links: the identities the base model trains on
    inbox: Path  # <album>/<photo>: what the auto-labeller consumes
    truth: Path  # {"album/photo": identity} of every inbox photo
    pairs: Path  # the LFW pairs every model is evaluated on
    pairs_root: Path
    base_identities: int
    base_images: int
    photos: int


def identity_folders(train_root: Path) -> list[Path]:
    return sorted(p for p in train_root.iterdir() if p.is_dir() and not p.name.startswith(".") and list_images(p))


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


def link_identities(folders: list[Path], dst: Path) -> None:
    """An image folder whose identity sub-folders are links to `folders` (resolved, so links never chain)."""
    dst.mkdir(parents=True)
    for folder in folders:
        link = dst / folder.name
        if link.exists():
            raise ValueError(f"identity {folder.name} appears twice in {dst}")
        link.symlink_to(folder.resolve(), target_is_directory=True)


def build_sets(data: DemoData, profile: Profile, root: Path) -> DemoSets:
    """Write base/, inbox/, truth.json and pairs.txt under `root` (which must not exist yet)."""
    folders = identity_folders(data.train_root)
    base, held_out = split_identities(folders, profile.held_out_identities, profile.photos_per_identity)
    link_identities(base, root / "base")
    truth: dict[str, str] = {}
    for album, photos in deal_albums(held_out, profile).items():
        (root / "inbox" / album).mkdir(parents=True)
        for name, source in photos.items():
            shutil.copyfile(source, root / "inbox" / album / name)  # copies: the auto-labeller moves them away
            truth[f"{album}/{name}"] = Path(source).parent.name
    (root / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n")
    folds, kept = sample_pairs(data.pairs, profile.pairs_per_fold, random.Random(SEED))
    (root / "pairs.txt").write_text(f"{folds}\t{profile.pairs_per_fold}\n" + "".join("\t".join(f) + "\n" for f in kept))
    return DemoSets(
        base=root / "base",
        inbox=root / "inbox",
        truth=root / "truth.json",
        pairs=root / "pairs.txt",
        pairs_root=data.pairs_root,
        base_identities=len(base),
        base_images=sum(len(list_images(f)) for f in base),
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
