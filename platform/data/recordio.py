"""MXNet RecordIO (.rec + .idx) and its IRHeader, read and written without mxnet.

Framing (dmlc-core): every part is `magic:u32 lrec:u32 payload padding-to-4`, with
`lrec = cflag << 29 | length`. The writer never stores the magic word inside a payload: wherever it
occurs at a 4-byte aligned position the payload is cut there and the word dropped (cflag 1 = first
part, 2 = middle, 3 = last; 0 = unsplit), and the reader joins the parts with the magic word again.
Parts are therefore found by scanning for the magic, and a reader can resynchronise after damage.

Payload (mxnet `recordio.pack`): IRHeader `<IfQQ` (flag, label, id, id2); when flag > 0 the label
is `flag` float32 values stored right after the header and the header's own label field is 0.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
MAX_RECORD_BYTES = (1 << LENGTH_BITS) - 1
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)
INTEGER = re.compile(r"-?[0-9]+")  # an .idx field; str.isdigit also accepts "²", which int() refuses


class IRHeader(NamedTuple):
    """Per-record metadata; `label` is a float, or a float32 array when flag > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int = 0


def pack_record(header: IRHeader, payload: bytes) -> bytes:
    """Header + payload as mxnet packs them; like mxnet, flag is derived from the label's shape."""
    if np.ndim(header.label) == 0:
        return struct.pack(IR_FORMAT, 0, float(header.label), header.id, header.id2) + bytes(payload)
    label = np.asarray(header.label, dtype="<f4").ravel()
    if label.size == 0:
        raise ValueError("an array label needs at least one value (flag = label size must be > 0)")
    return struct.pack(IR_FORMAT, label.size, 0.0, header.id, header.id2) + label.tobytes() + bytes(payload)


def unpack_record(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into its IRHeader and payload."""
    if len(record) < IR_SIZE:
        raise ValueError(f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, rec_id, id2 = struct.unpack_from(IR_FORMAT, record)
    if flag == 0:
        return IRHeader(0, label, rec_id, id2), record[IR_SIZE:]
    end = IR_SIZE + 4 * flag
    if end > len(record):
        raise ValueError(f"IRHeader flag {flag} announces {4 * flag} label bytes, the record has {len(record)}")
    labels = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE).copy()
    return IRHeader(flag, labels, rec_id, id2), record[end:]


def rec_idx_paths(path_prefix: str | Path) -> tuple[Path, Path]:
    """`dir/train` -> (dir/train.rec, dir/train.idx)."""
    prefix = str(path_prefix)
    return Path(prefix + ".rec"), Path(prefix + ".idx")


def _frame(cflag: int, part: bytes) -> bytes:
    padding = b"\0" * (-len(part) % 4)
    return MAGIC_BYTES + struct.pack("<I", cflag << LENGTH_BITS | len(part)) + part + padding


def frame_record(record: bytes) -> bytes:
    """Encode one record into dmlc parts, cutting at every 4-byte aligned copy of the magic word."""
    if len(record) > MAX_RECORD_BYTES:
        raise ValueError(f"a RecordIO record holds at most {MAX_RECORD_BYTES} bytes, got {len(record)}")
    aligned = np.frombuffer(record, dtype="<u4", count=len(record) // 4)
    cuts = (np.flatnonzero(aligned == MAGIC) * 4).tolist()
    if not cuts:
        return _frame(0, record)
    starts = [0, *(cut + 4 for cut in cuts)]
    ends = [*cuts, len(record)]
    flags = [1] + [2] * (len(cuts) - 1) + [3]
    return b"".join(_frame(f, record[s:e]) for f, s, e in zip(flags, starts, ends, strict=True))


def read_framed(pread: Callable[[int, int], bytes], size: int, offset: int, name: str) -> tuple[bytes, int]:
    """Decode the record starting at `offset`; return it and the offset of the next one.

    Every length is checked against the file size before reading, so damage gives a ValueError
    naming the file and offset instead of a hang or a huge allocation.
    """
    parts: list[bytes] = []
    pos = offset
    while True:
        if pos + 8 > size:
            raise ValueError(f"{name}: truncated record header at offset {pos} (file has {size} bytes)")
        magic, lrec = struct.unpack("<II", pread(8, pos))
        if magic != MAGIC:
            raise ValueError(f"{name}: bad magic 0x{magic:08x} at offset {pos}, expected 0x{MAGIC:08x}")
        cflag, length = lrec >> LENGTH_BITS, lrec & MAX_RECORD_BYTES
        allowed = (0, 1) if not parts else (2, 3)
        if cflag not in allowed:
            raise ValueError(f"{name}: unexpected continuation flag {cflag} at offset {pos}")
        padded = length + (-length % 4)
        if pos + 8 + padded > size:
            raise ValueError(f"{name}: record at offset {pos} claims {length} bytes but only {size - pos - 8} remain")
        parts.append(pread(length, pos + 8))
        pos += 8 + padded
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts), pos


def iter_records(rec_path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Every record of a .rec file in file order, as (offset, record); needs no .idx."""
    rec_path = Path(rec_path)
    with rec_path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        fd = f.fileno()
        offset = 0
        while offset < size:
            record, next_offset = read_framed(lambda n, at: os.pread(fd, n, at), size, offset, str(rec_path))
            yield offset, record
            offset = next_offset


class RecordWriter:
    """Appends keyed records to `<prefix>.rec` and their offsets to `<prefix>.idx` (mxnet write_idx)."""

    def __init__(self, path_prefix: str | Path) -> None:
        self.rec_path, self.idx_path = rec_idx_paths(path_prefix)
        self._rec = self.rec_path.open("wb")
        self._idx = self.idx_path.open("w", encoding="ascii", newline="\n")
        self._keys: set[int] = set()
        self._offset = 0

    def write(self, key: int, record: bytes) -> int:
        """Append one record under `key`; returns its offset."""
        if key in self._keys:
            raise ValueError(f"{self.idx_path}: duplicate record key {key}")
        framed = frame_record(record)
        offset = self._offset
        self._rec.write(framed)
        self._idx.write(f"{key}\t{offset}\n")
        self._keys.add(key)
        self._offset += len(framed)
        return offset

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_index(idx_path: Path, rec_size: int) -> dict[int, int]:
    offsets: dict[int, int] = {}
    with idx_path.open(encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not all(INTEGER.fullmatch(v) for v in fields):
                raise ValueError(f"{idx_path}:{line_no}: expected 'key<TAB>offset', got {line.strip()[:60]!r}")
            key, offset = int(fields[0]), int(fields[1])
            if not 0 <= key < 1 << 63:
                raise ValueError(f"{idx_path}:{line_no}: key {key} is outside 0..2^63-1")
            if key in offsets:
                raise ValueError(f"{idx_path}:{line_no}: duplicate key {key}")
            if offset < 0 or offset % 4 or offset + 8 > rec_size:
                raise ValueError(
                    f"{idx_path}:{line_no}: offset {offset} cannot start a record in the {rec_size}-byte .rec"
                )
            offsets[key] = offset
    return offsets


class IndexedRecordReader:
    """Random access to `<prefix>.rec` through `<prefix>.idx`; keys keep the index file's order.

    Reads use pread on a descriptor opened per process, so DataLoader workers (fork or spawn)
    never share a file position.
    """

    def __init__(self, path_prefix: str | Path) -> None:
        self._fd: int | None = None
        self._pid = -1
        self.rec_path, self.idx_path = rec_idx_paths(path_prefix)
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: RecordIO file not found")
        self.size = self.rec_path.stat().st_size
        self.offsets = _read_index(self.idx_path, self.size)
        self.keys = list(self.offsets)

    def _pread(self, n: int, at: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return os.pread(self._fd, n, at)

    def read(self, key: int) -> bytes:
        if key not in self.offsets:
            raise KeyError(f"{self.idx_path}: no record with key {key}")
        record, _ = read_framed(self._pread, self.size, self.offsets[key], str(self.rec_path))
        return record

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self.offsets

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> IndexedRecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}
