"""The demo's data: ../shared/data when this machine has it, else the small real sample shipped in the package.

`build_sample` is the code that cut the shipped sample from ../shared/data; sample/README.md gives the call.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from faceforge.data.folder import list_images
from faceforge.data.image import read_image

SAMPLE_ROOT = Path(__file__).resolve().parent / "sample"
SHARED_DATA_ENV = "FACEFORGE_SHARED_DATA"


@dataclass(frozen=True)
class DemoData:
    """Training folder and LFW-protocol pairs for the demo, and a line saying where they came from."""

    train_root: Path
    pairs: Path
    pairs_root: Path
    source: str


def has_demo_data(root: Path) -> bool:
    return (root / "celeba_ids").is_dir() and (root / "lfw" / "pairs.txt").is_file()


def find_shared_data() -> Path | None:
    """$FACEFORGE_SHARED_DATA, else the nearest `shared/data` above the working directory or this file."""
    if value := os.environ.get(SHARED_DATA_ENV):
        root = Path(value).expanduser()
        if not has_demo_data(root):
            raise FileNotFoundError(f"{SHARED_DATA_ENV}={value}: no celeba_ids/ and lfw/pairs.txt there")
        return root
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            if has_demo_data(folder / "shared" / "data"):
                return folder / "shared" / "data"
    return None


def demo_data_paths(shared_root: Path | None = None) -> DemoData:
    """The full shared sets when present (`shared_root`, or found by `find_shared_data`), else the shipped sample."""
    root = find_shared_data() if shared_root is None else Path(shared_root)
    if root is not None and has_demo_data(root):
        return DemoData(root / "celeba_ids", root / "lfw" / "pairs.txt", root / "lfw", f"shared data {root}")
    return DemoData(
        SAMPLE_ROOT / "train",
        SAMPLE_ROOT / "lfw" / "pairs.txt",
        SAMPLE_ROOT / "lfw",
        f"shipped sample {SAMPLE_ROOT} (CelebA + LFW excerpts, credits in its README.md)",
    )


def write_resized(src: Path, dst: Path, longest_side: int, quality: int) -> None:
    """Shrink the whole image (no crop: the trainer centre-crops); greyscale stays single-channel."""
    img = read_image(src)
    h, w = img.shape[:2]
    scale = longest_side / max(h, w)
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    grey = np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    pixels = img[..., 0] if grey else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_OPTIMIZE, 1])
    assert ok, f"JPEG encoding failed for {src}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(encoded.tobytes())


def sample_pairs(pairs_txt: Path, pairs_per_fold: int, rng: random.Random) -> tuple[int, int, list[list[str]]]:
    """(folds, pairs per fold and half, lines): up to `pairs_per_fold` matched and mismatched lines drawn inside
    each fold, so folds stay identity-disjoint; a smaller file (the shipped sample's) gives all it has."""
    lines = [line.split() for line in pairs_txt.read_text().splitlines() if line.strip()]
    if not lines or len(lines[0]) != 2 or not all(v.isdigit() for v in lines[0]):
        raise ValueError(f"{pairs_txt}: expected a 'folds<TAB>n' first line")
    folds, per_half = int(lines[0][0]), int(lines[0][1])
    if len(lines) - 1 != 2 * folds * per_half:
        raise ValueError(f"{pairs_txt}: header announces {folds} x {2 * per_half} pairs, found {len(lines) - 1}")
    if pairs_per_fold < 1:
        raise ValueError(f"pairs_per_fold must be at least 1, got {pairs_per_fold}")
    pairs_per_fold = min(pairs_per_fold, per_half)
    kept: list[list[str]] = []
    for start in range(1, len(lines), per_half):  # alternating matched / mismatched halves of each fold
        kept += [lines[start + i] for i in sorted(rng.sample(range(per_half), pairs_per_fold))]
    return folds, pairs_per_fold, kept


def pair_files(pairs: list[list[str]]) -> list[str]:
    """The image files (relative to the LFW root) that LFW-format pair lines name, sorted."""
    files = set()
    for fields in pairs:
        name_a, i, name_b, j = fields if len(fields) == 4 else (fields[0], fields[1], fields[0], fields[2])
        files |= {f"{name_a}/{name_a}_{int(i):04d}.jpg", f"{name_b}/{name_b}_{int(j):04d}.jpg"}
    return sorted(files)


def write_pairs(path: Path, folds: int, pairs_per_fold: int, pairs: list[list[str]]) -> None:
    """An LFW pairs.txt: the `folds<TAB>n` header, then one tab-separated line per pair."""
    path.write_text(f"{folds}\t{pairs_per_fold}\n" + "".join("\t".join(fields) + "\n" for fields in pairs))


def build_sample(
    shared_root: Path,
    dst: Path,
    *,
    identities: int,
    images_per_identity: int,
    pairs_per_fold: int,
    size: int,
    seed: int = 0,
    lfw_size: int = 125,
    quality: int = 90,
) -> dict[str, int]:
    """Cut `dst/train` from celeba_ids and `dst/lfw` (pairs.txt + the images it names) from lfw.

    Training takes the `identities` with the most images, `images_per_identity` each, longest side `size`.
    """
    shared_root, dst = Path(shared_root), Path(dst)
    if min(identities, images_per_identity, size, lfw_size) < 1 or not 0 <= quality <= 100:
        raise ValueError("identities, images_per_identity, size and lfw_size must be >= 1, quality in 0..100")
    if not has_demo_data(shared_root):
        raise FileNotFoundError(f"{shared_root}: no celeba_ids/ and lfw/pairs.txt")
    for part in ("train", "lfw"):
        if (dst / part).exists():
            raise FileExistsError(f"{dst / part} already exists: remove it to rebuild the sample")

    folders = [p for p in (shared_root / "celeba_ids").iterdir() if p.is_dir()]
    images = {folder.name: list_images(folder) for folder in folders}
    ranked = sorted(images, key=lambda name: (-len(images[name]), name))[:identities]
    if len(ranked) < identities or len(images[ranked[-1]]) < images_per_identity:
        raise ValueError(
            f"{shared_root / 'celeba_ids'} has fewer than {identities} identities with {images_per_identity} images"
        )
    # One generator per part, so changing one part's settings leaves the other part as it was.
    train_rng, pairs_rng = random.Random(seed), random.Random(seed)
    chosen = {name: sorted(train_rng.sample(images[name], images_per_identity)) for name in ranked}
    folds, pairs_per_fold, kept = sample_pairs(shared_root / "lfw" / "pairs.txt", pairs_per_fold, pairs_rng)
    for name, files in chosen.items():
        for src in files:
            write_resized(src, dst / "train" / name / src.name, size, quality)
    needed = pair_files(kept)
    for file in needed:
        write_resized(shared_root / "lfw" / file, dst / "lfw" / file, lfw_size, quality)
    write_pairs(dst / "lfw" / "pairs.txt", folds, pairs_per_fold, kept)

    written = [p for part in ("train", "lfw") for p in (dst / part).rglob("*") if p.is_file()]
    return {
        "identities": len(ranked),
        "train_images": len(ranked) * images_per_identity,
        "folds": folds,
        "pairs": len(kept),
        "pair_images": len(needed),
        "bytes": sum(p.stat().st_size for p in written),
    }
