"""Face-verification pair sets: the LFW pairs.txt protocol and InsightFace's `.bin` files.

Images are kept encoded and de-duplicated, so a model embeds each distinct image once however
many pairs use it.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BIN_FOLDS = 10


@dataclass
class VerificationSet:
    """Pairs (left[i], right[i]) of indices into `images`, with ground truth and fold per pair."""

    name: str
    images: list[bytes]
    left: np.ndarray
    right: np.ndarray
    issame: np.ndarray
    folds: np.ndarray
    sources: list[str] | None = None  # what each image is, for error messages: its path, or its place in a .bin

    def __post_init__(self) -> None:
        n = len(self.issame)
        if not len(self.left) == len(self.right) == len(self.folds) == n:
            raise ValueError(f"{self.name}: left/right/issame/folds lengths differ")
        for side in (self.left, self.right):
            if n and (side.min() < 0 or side.max() >= len(self.images)):
                raise ValueError(f"{self.name}: pair index outside the {len(self.images)} images")

    @property
    def num_pairs(self) -> int:
        return len(self.issame)

    @property
    def num_folds(self) -> int:
        return len(np.unique(self.folds))


class _ImageTable:
    """Collects images, one index per distinct content (LFW itself holds byte-identical files)."""

    def __init__(self) -> None:
        self.images: list[bytes] = []
        self.sources: list[str] = []
        self.index: dict[bytes, int] = {}

    def add(self, image: bytes, source: str) -> int:
        if image not in self.index:
            self.index[image] = len(self.images)
            self.images.append(image)
            self.sources.append(source)
        return self.index[image]


def _lfw_path(root: Path, name: str, number: str, where: str) -> Path:
    if name in (".", "..") or "/" in name:  # `../x` or `/x` would read outside the image root
        raise ValueError(f"{where}: identity {name!r} is not a folder name")
    if not (number.isascii() and number.isdigit()):
        raise ValueError(f"{where}: image number {number!r} is not a positive integer")
    path = root / name / f"{name}_{int(number):04d}.jpg"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {path} not found")
    return path


def read_pairs(pairs_txt: str | Path, root: str | Path) -> tuple[list[tuple[Path, Path]], np.ndarray, np.ndarray]:
    """Parse an LFW-protocol pairs file into (image path pairs, issame, folds), checking every image exists but
    reading none, so a trainer can refuse a broken evaluation set before training instead of after it.

    The file is `folds<TAB>n`, then per fold n matched and n mismatched lines; a first line holding only `n`
    (pairsDevTrain.txt style) means one fold.
    """
    pairs_txt, root = Path(pairs_txt), Path(root)
    # Names in other encodings stay their bytes on disk, as os.listdir gives them; junk fails the header check.
    text = pairs_txt.read_text(encoding="utf-8-sig", errors="surrogateescape")
    lines = [(no, line.split()) for no, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{pairs_txt}: empty pairs file")
    first_no, head = lines[0]
    if not 1 <= len(head) <= 2 or not all(v.isascii() and v.isdigit() and int(v) > 0 for v in head):
        raise ValueError(f"{pairs_txt}:{first_no}: expected 'folds<TAB>n', got {' '.join(head)!r}")
    num_folds, per_half = (int(head[0]), int(head[1])) if len(head) == 2 else (1, int(head[0]))
    body = lines[1:]
    if len(body) != 2 * num_folds * per_half:
        raise ValueError(
            f"{pairs_txt}: header announces {num_folds} folds x {2 * per_half} pairs, found {len(body)} lines"
        )
    pairs, issame = [], []
    for i, (no, fields) in enumerate(body):
        where = f"{pairs_txt}:{no}"
        same = (i // per_half) % 2 == 0
        if same and len(fields) == 3:
            name_a, i, name_b, j = fields[0], fields[1], fields[0], fields[2]
        elif not same and len(fields) == 4:
            name_a, i, name_b, j = fields
        else:
            expected = "'name i j' (matched)" if same else "'name1 i name2 j' (mismatched)"
            raise ValueError(f"{where}: expected {expected}, got {' '.join(fields)!r}")
        if not same and name_a == name_b:
            raise ValueError(f"{where}: a mismatched pair names one identity twice ({name_a!r})")
        pairs.append((_lfw_path(root, name_a, i, where), _lfw_path(root, name_b, j, where)))
        issame.append(same)
    return pairs, np.array(issame, dtype=bool), np.repeat(np.arange(num_folds), 2 * per_half)


def load_pairs(pairs_txt: str | Path, root: str | Path, name: str | None = None) -> VerificationSet:
    """Read an LFW-protocol pairs file (see `read_pairs`) with its images."""
    pairs, issame, folds = read_pairs(pairs_txt, root)
    table, read = _ImageTable(), functools.cache(Path.read_bytes)
    left, right = [], []
    for path_a, path_b in pairs:
        left.append(table.add(read(path_a), str(path_a)))
        right.append(table.add(read(path_b), str(path_b)))
    return VerificationSet(
        name=name or Path(root).name,
        images=table.images,
        sources=table.sources,
        left=np.array(left, dtype=np.int64),
        right=np.array(right, dtype=np.int64),
        issame=issame,
        folds=folds,
    )


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """Python 3 pickles bytes at protocol < 3 as `_codecs.encode(text, 'latin1')`."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    """Python 3 pickles b"" at protocol < 3 as `bytes()`; with an argument, bytes(2**62) would allocate it."""
    if args:
        raise pickle.UnpicklingError("refusing bytes() with arguments")
    return b""


def _numpy_scalar(dtype: np.dtype, data: bytes) -> np.bool_:
    """numpy bool scalars pickle as `multiarray.scalar(dtype('bool'), raw_byte)`."""
    if dtype != np.dtype(bool) or not isinstance(data, bytes) or len(data) != 1:
        raise pickle.UnpicklingError(f"refusing numpy scalar of dtype {dtype}")
    return np.bool_(data != b"\0")


def _bool_dtype(name: str, *args: object) -> np.dtype:
    if name not in ("b1", "?", "bool"):
        raise pickle.UnpicklingError(f"refusing numpy dtype {name!r}")
    return np.dtype(bool)


_ALLOWED = {
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "bytes"): _empty_bytes,
    ("builtins", "bool"): bool,
    ("__builtin__", "list"): list,
    ("__builtin__", "tuple"): tuple,
    ("__builtin__", "bytes"): _empty_bytes,
    ("__builtin__", "bool"): bool,
    ("_codecs", "encode"): _latin1,
    ("numpy", "dtype"): _bool_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _SafeUnpickler(pickle.Unpickler):
    """Builds only lists, tuples, bytes and bools: a `.bin` from the internet cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a .bin holds only bytes and bools")
        return _ALLOWED[module, name]


def load_bin(path: str | Path, name: str | None = None) -> VerificationSet:
    """Read an InsightFace `.bin`: pickled (bins, issame_list), pair i = (bins[2i], bins[2i+1])."""
    path = Path(path)
    data = path.read_bytes()
    try:
        # A dry parse checks every length against the file first: C unpickling could allocate a lying size.
        for _ in pickletools.genops(data):
            pass
        loaded = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError) as err:
        raise ValueError(f"{path}: not a valid verification .bin ({type(err).__name__}: {err})") from None
    if not (isinstance(loaded, tuple | list) and len(loaded) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame_list = loaded
    if not (isinstance(bins, tuple | list) and isinstance(issame_list, tuple | list)):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair of lists")
    if not all(isinstance(b, bytes) for b in bins) or not all(type(s) in (bool, np.bool_) for s in issame_list):
        raise ValueError(f"{path}: bins must be encoded image bytes and issame_list booleans")
    n = len(issame_list)
    if len(bins) != 2 * n:
        raise ValueError(f"{path}: {len(bins)} images for {n} pairs, expected {2 * n}")
    if n < BIN_FOLDS:
        raise ValueError(f"{path}: {n} pairs cannot form {BIN_FOLDS} folds")
    table = _ImageTable()
    indices = [table.add(image, f"{path} image {k} (pair {k // 2})") for k, image in enumerate(bins)]
    # InsightFace evaluates with unshuffled KFold(10): consecutive folds, the first n % 10 one pair longer.
    fold_sizes = [len(chunk) for chunk in np.array_split(np.arange(n), BIN_FOLDS)]
    return VerificationSet(
        name=name or path.stem,
        images=table.images,
        sources=table.sources,
        left=np.array(indices[0::2], dtype=np.int64),
        right=np.array(indices[1::2], dtype=np.int64),
        issame=np.array(issame_list, dtype=bool),
        folds=np.repeat(np.arange(BIN_FOLDS), fold_sizes),
    )


def write_bin(path: str | Path, vset: VerificationSet) -> None:
    """Write an InsightFace-readable `.bin`; folds are not stored (readers use 10 consecutive folds).

    Written beside `path` and renamed over it, so a full disk leaves an existing file whole.
    """
    bins: list[bytes] = []
    for a, b in zip(vset.left.tolist(), vset.right.tolist(), strict=True):
        bins += [vset.images[a], vset.images[b]]
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as f:
            pickle.dump((bins, [bool(s) for s in vset.issame]), f, protocol=4)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
