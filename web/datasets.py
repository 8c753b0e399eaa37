"""The datasets the platform knows (the demo data and the folders under the configured data roots).

Every path a user hands the platform goes through `confine`, so a form field or an override can never point
a job at a file outside those roots, not through `..` nor through a symlink.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from faceforge.data.folder import IMAGE_EXTENSIONS
from faceforge.data.inspect import inspect_dataset
from faceforge.data.sample_data import demo_data_paths, find_shared_data

DATA_ROOTS_ENV = "FACEFORGE_DATA_ROOTS"
DEMO = "demo"
# How Python holds the bytes of a file name that are not UTF-8 (os.fsdecode): no page or job can carry them.
UNDECODABLE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Dataset:
    """A training set the job form offers: the demo set, or a folder (`data=folder data.root=<path>`)."""

    name: str
    path: Path
    source: str

    @property
    def submittable(self) -> bool:
        """Whether the form can name it: a path that is not UTF-8 cannot be posted back, nor stored in a job."""
        return not UNDECODABLE.search(str(self.path))


def data_roots() -> list[Path]:
    """$FACEFORGE_DATA_ROOTS (os.pathsep-separated), else the shared data folder when this machine has one."""
    if value := os.environ.get(DATA_ROOTS_ENV):
        return [Path(part).expanduser() for part in value.split(os.pathsep) if part]
    shared = find_shared_data()
    return [shared] if shared is not None else []


def confine(path: str | Path, roots: list[Path]) -> Path:
    """`path` with symlinks resolved, if it lies inside one of `roots`; relative paths are taken from each root."""
    candidates = [Path(path)] if Path(path).is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except (RuntimeError, OSError):  # a symlink loop, or a path too long to resolve
            continue
        if any(resolved.is_relative_to(root.resolve()) for root in roots):
            return resolved
    raise ValueError(f"{path}: outside the configured data roots ({', '.join(str(r) for r in roots) or 'none'})")


def _is_training_set(folder: Path) -> bool:
    """A RecordIO directory, or a tree whose first identity folder holds an image."""
    if (folder / "train.rec").is_file():
        return True
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            return any(f.suffix.lower() in IMAGE_EXTENSIONS for f in child.iterdir())
    return False


def _training_folder(folder: Path) -> Path | None:
    """The training set a folder holds: itself, or the images/ of an auto-labelled dataset version."""
    if (folder / "stats.json").is_file() and (folder / "images").is_dir():
        return folder / "images"
    return folder if _is_training_set(folder) else None


def _source(folder: Path) -> str:
    readme = next((folder / name for name in ("README.md", "README") if (folder / name).is_file()), None)
    if readme is not None:
        for line in readme.read_text(errors="replace").splitlines():
            if line.strip():
                return line.strip().lstrip("# ")
    return str(folder)


def demo_dataset() -> Dataset:
    demo = demo_data_paths()
    return Dataset(DEMO, demo.train_root, demo.source)


def list_datasets(roots: list[Path]) -> list[Dataset]:
    """The demo set, then every training set that is a data root or a folder directly inside one."""
    found = [demo_dataset()]
    for root in roots:
        if not root.is_dir():
            continue
        folders = [root] if _training_folder(root) else sorted(p for p in root.iterdir() if p.is_dir())
        for folder in folders:
            try:
                inside = confine(folder, roots)  # a link out of the roots is neither read nor offered
            except ValueError:
                continue
            images = _training_folder(inside)
            if folder.name.startswith(".") or images is None:
                continue
            found.append(Dataset(folder.name, images.resolve(), _source(inside)))
    return found


def _stat(path: str | Path) -> os.stat_result:
    """The file's, or a dangling link's own (an editor's `.#name` lock): the trainer only reads image files, so a
    link leading nowhere among them must not make the set unreadable."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return os.lstat(path)


def _fingerprint(folder: Path) -> str:
    """A content version: a hash of every file's relative path and size, stable while the data is unchanged."""
    digest = hashlib.sha256()
    for directory, subdirs, files in os.walk(folder):
        subdirs.sort()
        for name in sorted(files):
            path = Path(directory, name)
            # The name's own bytes: one that is not UTF-8 is an image the trainer reads, not a broken dataset.
            digest.update(os.fsencode(path.relative_to(folder)) + f"\0{_stat(path).st_size}\n".encode())
    return digest.hexdigest()[:12]


@cache
def _summary(path: Path, listing: tuple[tuple[str, int, int], ...]) -> dict[str, Any]:
    summary = inspect_dataset(path)
    return {"identities": summary["identities"], "images": summary["images"], "version": _fingerprint(path)}


def describe(dataset: Dataset) -> dict[str, Any]:
    """Identities, images and content version; cached until the folder's listing or one of its entries changes:
    an image added to an identity folder changes that folder's mtime, a repacked .rec its own size and mtime."""
    with os.scandir(dataset.path) as entries:
        listing = tuple(sorted((e.name, (info := _stat(e.path)).st_mtime_ns, info.st_size) for e in entries))
    return _summary(dataset.path, listing)


def describe_or_error(dataset: Dataset) -> tuple[dict[str, Any], str | None]:
    """`describe`, or the one line saying why the dataset cannot be read: the datasets page shows it and the job
    form refuses on it, so both say the same thing."""
    try:
        return describe(dataset), None
    except (ValueError, OSError) as err:
        return {}, str(err)
