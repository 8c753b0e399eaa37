"""InsightFace's RecordIO training-set layout: reading it as a Dataset and packing a folder into it.

Record 0 is an image-less header whose label is (first identity key, end key). Keys 1 .. first-1
are the images (label = identity id); keys first .. end-1 hold one record per identity whose label
is that identity's image key range [start, stop). `property` holds `num_classes,height,width`.
InsightFace's MXFaceDataset only needs record 0; the identity records let us build every label
with one read per identity instead of one per image.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from faceforge.data.folder import ImageFolderDataset
from faceforge.data.image import ImageDecodeError, decode_image
from faceforge.data.recordio import IndexedRecordReader, IRHeader, RecordWriter, pack_record, unpack_record
from faceforge.data.transforms import item_rng
from faceforge.locks import held

# Identity spans and the header are float32 labels (the format's), exact only up to 2**24.
FLOAT32_EXACT_INTS = 1 << 24
# Present while pack renames its three files into place: a directory holding it mixes two packs.
INTERRUPTED_PACK_MARKER = ".pack-incomplete"
PACK_LOCK = ".pack.lock"  # held by the pack writing into a folder


def read_property(path: Path) -> tuple[int, int, int]:
    """`num_classes,height,width` from an InsightFace property file."""
    text = path.read_text(errors="replace").strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width', got {text[:80]!r}") from None
    return num_classes, height, width


def _whole(value: float, where: str) -> int:
    """A float32 label that stands for a key or class index; anything else means a corrupt record."""
    if not (math.isfinite(value) and abs(value) <= FLOAT32_EXACT_INTS):
        raise ValueError(f"{where}: label {value} is no key or class index (corrupt record?)")
    return int(value)


class RecordDataset(torch.utils.data.Dataset):
    """Face images from an InsightFace `train.rec` / `train.idx` / `property` directory."""

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: dataset directory not found")
        if (self.root / INTERRUPTED_PACK_MARKER).exists():
            raise ValueError(
                f"{self.root}: a pack into it was interrupted and its files are mixed; pack it again with --overwrite"
            )
        self.transform = transform
        self.reader = IndexedRecordReader(self.root / "train")
        self.keys, self.labels = self._index()
        if len(self.keys) == 0:
            raise ValueError(f"{self.reader.rec_path}: holds no image records")
        property_path = self.root / "property"
        self.image_size: tuple[int, int] | None = None
        if property_path.is_file():
            self.num_classes, height, width = read_property(property_path)
            self.image_size = (height, width)
        else:
            self.num_classes = int(self.labels.max()) + 1
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise ValueError(
                f"{self.root}: labels span {self.labels.min()}..{self.labels.max()}, "
                f"outside the {self.num_classes} classes given by {property_path.name}"
            )
        if self.num_classes > len(self.keys):  # the class count sizes the classifier: refuse an absurd one here
            raise ValueError(
                f"{self.root}: {self.num_classes} classes for {len(self.keys)} images (corrupt labels or property)"
            )

    def _record(self, key: int) -> tuple[IRHeader, bytes]:
        try:
            return unpack_record(self.reader.read(key))
        except (ValueError, KeyError) as err:
            raise ValueError(f"{self.reader.rec_path} record {key}: {err}") from None

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """Image keys and their labels."""
        header0, payload0 = self._record(0) if 0 in self.reader else (None, b"")
        if header0 is None or header0.flag == 0 or payload0:  # no layout header: every record is an image
            keys = np.array(self.reader.keys, dtype=np.int64)
            return keys, self._scan_labels(keys)
        span = header0.label[:2]
        if not (np.isfinite(span).all() and span[0] <= len(self.reader)):
            raise ValueError(
                f"{self.reader.rec_path} record 0: header {span.tolist()} does not fit the {len(self.reader)} records"
            )
        first_identity = int(span[0])
        end = int(span[1]) if header0.flag > 1 else first_identity
        keys = np.arange(1, first_identity, dtype=np.int64)
        missing = next((key for key in range(1, first_identity) if key not in self.reader), None)
        if missing is not None:
            raise ValueError(f"{self.reader.idx_path}: image record {missing} (of 1..{first_identity - 1}) is missing")
        if any(key not in self.reader for key in range(first_identity, end)):  # a subset cut from the .idx
            return keys, self._scan_labels(keys)
        headers = [(key, self._record(key)[0]) for key in range(first_identity, end)]
        spans = [
            tuple(_whole(v, f"{self.reader.rec_path} record {key}") for v in h.label[:2])
            for key, h in headers
            if h.flag >= 2
        ]
        starts, stops = [start for start, _ in spans], [stop for _, stop in spans]
        tiled = len(spans) == len(headers) > 0 and starts[1:] == stops[:-1]
        if not (tiled and starts[0] == 1 and stops[-1] == first_identity):
            return keys, self._scan_labels(keys)
        identity_labels = [self._class_of(start) for start in starts]
        return keys, np.repeat(np.array(identity_labels, dtype=np.int64), np.diff([1, *stops]))

    def _scan_labels(self, keys: np.ndarray) -> np.ndarray:
        return np.array([self._class_of(int(key)) for key in keys], dtype=np.int64)

    def _class_of(self, key: int) -> int:
        """Image label; like MXFaceDataset, the first value when the label is an array."""
        header = self._record(key)[0]
        return _whole(header.label[0] if header.flag > 0 else header.label, f"{self.reader.rec_path} record {key}")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def identity_digest(self) -> str:
        """Which people the labels stand for, as far as a .rec tells (it has no names): each class's image count."""
        return hashlib.sha256(np.bincount(self.labels, minlength=self.num_classes).tobytes()).hexdigest()[:16]

    def read_image(self, index: int) -> np.ndarray:
        key = int(self.keys[index])
        try:
            payload = self._record(key)[1]
        except ValueError as err:  # damaged framing: the trainer stops, checkpointed, as for a damaged image
            raise ImageDecodeError(str(err)) from None
        return decode_image(payload, f"{self.reader.rec_path} record {key}")

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, int]:
        index, rng = item_rng(item)
        img = self.read_image(index)
        return (img if self.transform is None else self.transform(img, rng)), int(self.labels[index])


def _write_pack(folder: ImageFolderDataset, prefix: Path, quality: int, reencode: bool) -> list[tuple[int, int]]:
    """Write `<prefix>.rec`, `.idx` and `.property`; returns every image's (height, width)."""
    counts = np.bincount(folder.labels, minlength=folder.num_classes)
    stops = 1 + np.cumsum(counts)
    first_identity = len(folder) + 1
    end = first_identity + folder.num_classes
    sizes: list[tuple[int, int]] = []
    with RecordWriter(prefix) as writer:
        writer.write(0, pack_record(IRHeader(2, np.array([first_identity, end]), 0), b""))
        for key, (path, label) in enumerate(folder.samples, 1):
            data = Path(path).read_bytes()
            img = decode_image(data, path)
            if reencode:
                ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not ok:
                    height, width = img.shape[:2]
                    raise ValueError(f"{path}: a {width}x{height} image cannot be JPEG-encoded (sides up to 65,500)")
                data = buf.tobytes()
            sizes.append(img.shape[:2])
            writer.write(key, pack_record(IRHeader(0, float(label), key), data))
        for label in range(folder.num_classes):
            span = np.array([stops[label] - counts[label], stops[label]])
            writer.write(first_identity + label, pack_record(IRHeader(2, span, first_identity + label), b""))
    height, width = sizes[0]
    Path(f"{prefix}.property").write_text(f"{folder.num_classes},{height},{width}")
    return sizes


def pack_folder(
    src_root: str | Path,
    dst_root: str | Path,
    quality: int = 95,
    reencode: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pack an identity-folder tree into InsightFace train.rec / train.idx / property.

    Original file bytes are stored unless `reencode` (JPEG at `quality`); every image is decoded
    once either way, so a corrupt file fails the pack rather than a training run. The files are
    written under temporary names and renamed into place at the end, so a corrupt image or a full
    disk leaves a previous pack in `dst_root` as it was; a marker file spans the three renames, so a
    pack killed between them is refused by RecordDataset rather than read as one.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    folder = ImageFolderDataset(src_root)
    dst_root = Path(dst_root)
    dst_root.mkdir(parents=True, exist_ok=True)
    end = len(folder) + 1 + folder.num_classes
    if end > FLOAT32_EXACT_INTS:
        raise ValueError(f"{end} records exceed the {FLOAT32_EXACT_INTS} keys float32 labels address exactly")
    with held(dst_root / PACK_LOCK):  # packs into one folder take turns, so staging files found here are dead
        if (dst_root / "train.rec").exists() and not overwrite:
            raise FileExistsError(f"{dst_root / 'train.rec'} already exists (pack with --overwrite to replace it)")
        for stale in dst_root.glob(".train.*.tmp.*"):  # left by a pack killed with -9
            stale.unlink(missing_ok=True)
        staging = dst_root / f".train.{os.getpid()}.tmp"
        written = {suffix: Path(f"{staging}{suffix}") for suffix in (".rec", ".idx", ".property")}
        try:
            sizes = _write_pack(folder, staging, quality, reencode)
            marker = dst_root / INTERRUPTED_PACK_MARKER
            marker.touch()
            for suffix, name in ((".rec", "train.rec"), (".idx", "train.idx"), (".property", "property")):
                os.replace(written[suffix], dst_root / name)
            marker.unlink()
        finally:
            for path in written.values():
                path.unlink(missing_ok=True)
    height, width = sizes[0]
    return {
        "dst": str(dst_root),
        "identities": folder.num_classes,
        "images": len(folder),
        "records": end,
        "rec_bytes": (dst_root / "train.rec").stat().st_size,
        "image_size": (height, width),
        "distinct_image_sizes": len(set(sizes)),
        "reencoded": reencode,
    }
