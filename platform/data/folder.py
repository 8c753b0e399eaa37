"""The plainest training set: one sub-folder of images per identity."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceforge.data.image import read_image
from faceforge.data.transforms import item_rng

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pbm", ".pgm", ".ppm", ".pnm"})


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name; hidden files are skipped."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def identity_images(root: Path) -> dict[Path, list[Path]]:
    """The identities of an image folder, `root/<identity>/<image>`: every visible sub-folder that holds an
    image, in name order, with its images. The one rule for what counts as an identity, wherever folders are read."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: no identity sub-folders (expected root/<identity>/<image>)")
    identities = {folder: images for folder in folders if (images := list_images(folder))}
    if not identities:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"{root}: {len(folders)} identity folders but no images ({extensions})")
    return identities


class ImageFolderDataset(torch.utils.data.Dataset):
    """`root/<identity>/<image>`; labels are the index of the identity in sorted order.

    Identity folders without images are left out of `classes`, so labels stay dense.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        identities = identity_images(self.root)
        self.classes: list[str] = [folder.name for folder in identities]
        self.samples: list[tuple[str, int]] = [
            (str(path), label) for label, images in enumerate(identities.values()) for path in images
        ]
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def identity_digest(self) -> str:
        """Which people the labels stand for, in label order: a checkpoint's classifier rows are theirs. Hashed as
        the names' bytes on disk: a folder name need not be UTF-8."""
        return hashlib.sha256(b"\n".join(map(os.fsencode, self.classes))).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.samples)

    def read_image(self, index: int) -> np.ndarray:
        return read_image(self.samples[index][0])

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, int]:
        index, rng = item_rng(item)
        img = self.read_image(index)
        return (img if self.transform is None else self.transform(img, rng)), self.samples[index][1]
