"""Teacher features of the whole training set: computed once over all ranks, optionally cached on disk.

Cache invalidation: a table is stored as `<cache_dir>/<key>.npy`, where the key hashes
    - the teacher's identity (a SHA-256 of its architecture and weights, wherever they were read from),
    - the training set's listing (image-folder: every relative path, label and file size; RecordIO: the size of
      train.rec and the bytes of train.idx),
    - the teacher's input size and data.crop_fraction,
    - the table format version.
Any change to these computes a new table under a new key; nothing is ever overwritten in place, and stale
files are never read again (delete the folder freely). Not covered: an image rewritten in place with the
same byte size, and pixel-level preprocessing code changes (bump FORMAT_VERSION for those).

Rows are the teacher's L2-normalised embedding of each training image with the evaluation transform only:
with augmentation on, the student sees an augmented image but is compared with the teacher's features of
the unaugmented one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from faceforge.data import EvalTransform, ImageFolderDataset, RecordDataset
from faceforge.parallel import DistContext, all_gather_tensor, barrier, broadcast_object
from faceforge.train.config import ConfigError

# 2: decoding follows EXIF orientation and no longer stretches 16-bit images, so version-1 features may differ.
FORMAT_VERSION = 2


def dataset_digest(dataset: ImageFolderDataset | RecordDataset) -> str:
    """A hash of what the dataset holds, without reading the images (see the module docstring)."""
    digest = hashlib.sha256()
    if isinstance(dataset, RecordDataset):
        digest.update(f"recordio {dataset.reader.size}\n".encode())
        digest.update(Path(dataset.reader.idx_path).read_bytes())
    else:
        for path, label in dataset.samples:
            relative = Path(path).relative_to(dataset.root).as_posix()
            digest.update(f"{relative}\t{label}\t{os.stat(path).st_size}\n".encode())
    return digest.hexdigest()


def cache_key(teacher_id: str, data_digest: str, input_size: int, crop_fraction: float) -> str:
    fields = {
        "teacher": teacher_id,
        "data": data_digest,
        "input_size": input_size,
        "crop_fraction": crop_fraction,
        "version": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


class _EvalView(Dataset[torch.Tensor]):
    """Images [start, stop) of a training set through the evaluation transform (no augmentation)."""

    def __init__(self, dataset: ImageFolderDataset | RecordDataset, transform: EvalTransform, start: int, stop: int):
        self.dataset, self.transform, self.start, self.stop = dataset, transform, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.dataset.read_image(self.start + i))


@torch.no_grad()
def compute_table(
    teacher: nn.Module,
    dataset: ImageFolderDataset | RecordDataset,
    crop_fraction: float,
    batch_size: int,
    num_workers: int,
    ctx: DistContext,
) -> np.ndarray:
    """Collective: each rank embeds a contiguous slice, every rank gets the whole N x D table."""
    per_rank = math.ceil(len(dataset) / ctx.world_size)
    start = min(ctx.rank * per_rank, len(dataset))
    stop = min(start + per_rank, len(dataset))
    view = _EvalView(dataset, EvalTransform(teacher.input_size, crop_fraction), start, stop)
    features = torch.zeros(per_rank, teacher.embedding_dim, device=ctx.device)
    done = 0
    loader = DataLoader(view, batch_size=batch_size, num_workers=num_workers)
    for batch in tqdm(loader, desc="teacher features", unit="batch", disable=not ctx.is_main):
        features[done : done + len(batch)] = F.normalize(teacher(batch.to(ctx.device)).float(), dim=1)
        done += len(batch)
    return all_gather_tensor(features).cpu().numpy()[: len(dataset)]


@dataclass(frozen=True)
class FeatureTable:
    """Row i is the teacher's feature of training image i; `path` is None when it was not cached."""

    rows: np.ndarray
    path: Path | None
    reused: bool

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(self.rows[indices.cpu().numpy()], dtype=np.float32))


def teacher_table(
    teacher: nn.Module,
    dataset: ImageFolderDataset | RecordDataset,
    crop_fraction: float,
    batch_size: int,
    num_workers: int,
    ctx: DistContext,
    *,
    cache_dir: Path | None,
    teacher_id: str | None = None,
) -> FeatureTable:
    """The table, read from `cache_dir` when a table with the same key is there, else computed (and cached)."""
    if cache_dir is None:
        return FeatureTable(compute_table(teacher, dataset, crop_fraction, batch_size, num_workers, ctx), None, False)
    assert teacher_id is not None, "a cached table needs the teacher's identity"
    key = cache_key(teacher_id, dataset_digest(dataset), teacher.input_size, crop_fraction)
    path = Path(cache_dir) / f"{key}.npy"
    # Rank 0 decides for everyone: computing is collective, so ranks must not disagree about a racing writer.
    if broadcast_object(path.is_file()):
        try:
            rows = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:  # cut short by a full disk, or not written by us
            raise ConfigError(f"distill.cache_dir: {path} cannot be read ({err}); delete it") from None
        if rows.shape != (len(dataset), teacher.embedding_dim):
            raise ConfigError(
                f"distill.cache_dir: {path} has shape {rows.shape}, expected {len(dataset)} x D; delete it"
            )
        return FeatureTable(rows, path, True)
    rows = compute_table(teacher, dataset, crop_fraction, batch_size, num_workers, ctx)
    if ctx.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{key}.{os.getpid()}.npy")
        np.save(staging, rows)
        os.replace(staging, path)
        meta = {"teacher": teacher_id, "data_root": str(dataset.root), "images": len(dataset)}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    barrier()
    return FeatureTable(rows, path, False)
