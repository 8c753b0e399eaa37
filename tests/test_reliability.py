"""Hostile inputs get one clear error naming the culprit, and failing writes leave what was stored intact.

Covered elsewhere, not repeated here: damaged .rec framing (bad magic, lying length, truncation, .idx offsets
past the end) and malicious/cut .bin pickles in test_data.py; form fields and symlinked or `..` dataset paths
through the web form in test_web.py; SIGTERM writing a resumable checkpoint in test_train.py
(test_sigterm_writes_a_resumable_checkpoint).

A full disk is simulated with RLIMIT_FSIZE (writes past N bytes fail with EFBIG), which binds root too,
unlike permission bits.
"""

from __future__ import annotations

import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from faceforge import models
from faceforge.data import (
    ImageDecodeError,
    ImageFolderDataset,
    IndexedRecordReader,
    IRHeader,
    RecordDataset,
    RecordWriter,
    VerificationSet,
    decode_image,
    load_bin,
    load_pairs,
    pack_folder,
    pack_record,
    read_image,
    write_bin,
)
from faceforge.data.image import MAX_PIXELS, declared_size
from faceforge.data_pipeline.align import write_atomic
from faceforge.data_pipeline.versions import FaceRecord, list_versions, read_manifest, write_version
from faceforge.heads import margin_spec
from faceforge.jobs.spec import compose_config
from faceforge.parallel import HeadOptimizer, ShardedMarginSoftmax
from faceforge.train.checkpoint import load_backbone, load_checkpoint, resolve_checkpoint, save_checkpoint
from faceforge.train.config import ConfigError
from faceforge.web.datasets import confine

from conftest import REPO

TINY = ["model.width=0.25", "model.input_size=56", "model.embedding_dim=32", "trainer.steps=3", "eval=none"]


@contextmanager
def disk_full_after(nbytes: int) -> Iterator[None]:
    """Any write that would grow a file past `nbytes` fails with EFBIG, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) by relative path: what must survive a failed write."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- config overrides


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=abc", "optim.lr must be float, got 'abc'"),
        ("trainer.steps=3.5", "trainer.steps must be int, got 3.5"),
        ("trainer.steps=true", "trainer.steps must be int, got True"),
        ("trainer.steps=1e99", "trainer.steps must be int"),
        ("trainer.stepz=3", "Could not override 'trainer.stepz'"),
        ("+trainer.stepz=3", "unknown config key(s) trainer.stepz"),
        ("model=../../etc/passwd", "Could not find 'model/../../etc/passwd'"),
        ("data.augment=3", "data.augment must be a mapping"),
        ("head.sample_rate=5", "head.sample_rate must be in (0, 1]"),
        ("optim.lr=nan", "optim.lr must be positive, got nan"),
        ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
        ("data.crop_fraction=2", "data.crop_fraction must be in (0, 1]"),
        ("model.width=0", "model.width must be between"),
        ("model.input_size=1000000", "model.input_size must be between"),
        ("model.embedding_dim=-3", "model.embedding_dim must be between"),
        ("optim.momentum=7", "optim.momentum must be between"),
        ("optim.weight_decay=-1", "optim.weight_decay must be between"),
        ("optim.lr=inf", "optim.lr must be between"),
        ("trainer.grad_clip=-1", "trainer.grad_clip must be between"),
        ("trainer.log_every=0", "trainer.log_every must be between"),
        ("trainer.checkpoint_every=0", "trainer.checkpoint_every must be between"),
        ("trainer.threads=100000", "trainer.threads must be between"),
        ("trainer.device=quantum", "trainer.device must be auto, cpu or cuda"),
        ("data.num_workers=-1", "data.num_workers must be between"),
        ("data.augment.lowres_prob=5", "data.augment.lowres_prob must be between"),
        ("data.augment.shift=0.5", "data.augment.shift must be between"),
        ("data.augment.rotate=-5", "data.augment.rotate must be between"),
        ("model=[1,2]", "could not compose the config from these overrides"),
    ],
)
def test_hostile_config_overrides_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        compose_config([*TINY, override])
    assert message in str(raised.value) and "\n" not in str(raised.value)


# ---------------------------------------------------------------- dataset paths


def test_confine_refuses_every_way_out_of_the_roots(tmp_path: Path) -> None:
    data, other, outside = tmp_path / "data", tmp_path / "other", tmp_path / "outside"
    for folder in (data / "inner", other / "faces", outside, tmp_path / "data_evil"):
        folder.mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(b"x")
    (data / "inner" / "secret.jpg").symlink_to(outside / "secret.jpg")
    (data / "inner" / "away").symlink_to(outside, target_is_directory=True)
    (data / "to_other").symlink_to(other / "faces", target_is_directory=True)
    roots = [data, other]
    for path in [
        "../outside",
        "inner/../../outside/secret.jpg",
        data / "inner" / "secret.jpg",  # a file symlinked out
        data / "inner" / "away" / "secret.jpg",  # through a symlinked folder further down
        tmp_path / "data_evil",  # shares the root's name as a prefix, not as a folder
        "/",
    ]:
        with pytest.raises(ValueError, match="outside the configured data roots"):
            confine(path, roots)
    (data / "loop").symlink_to(data / "loop")  # resolving it never ends: refused like any other way out
    with pytest.raises(ValueError, match="outside the configured data roots"):
        confine(data / "loop" / "x", roots)
    assert confine("to_other", roots) == (other / "faces").resolve()  # a link between roots stays allowed
    assert confine("inner/../inner", roots) == (data / "inner").resolve()


# ---------------------------------------------------------------- images


def png_bytes(width: int, height: int, bit_depth: int, rows: Iterator[bytes]) -> bytes:
    """A greyscale PNG streamed row by row, so a large declared canvas costs no memory here."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(b"\0" + row) for row in rows) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(ext: str, height: int = 40, width: int = 30) -> bytes:
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(ext, image[:, :, 0] if ext == ".pgm" else image)[1].tobytes()


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    at = data.index(b"\xff\xc0")  # baseline start-of-frame: length, precision, height, width
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def with_bmp_size(data: bytes, width: int, height: int) -> bytes:
    return data[:18] + struct.pack("<ii", width, -height) + data[26:]


def webp_canvas(width: int, height: int) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


@pytest.mark.parametrize(
    "bomb",
    [
        pytest.param(lambda: png_bytes(50_000, 50_000, 8, iter([bytes(16)])), id="png-50k"),
        pytest.param(lambda: png_bytes(20_000, 20_000, 1, iter([bytes(16)])), id="png-20k-no-pixels"),
        pytest.param(lambda: with_jpeg_size(encoded(".jpg"), 30_000, 30_000), id="jpeg"),
        pytest.param(lambda: with_bmp_size(encoded(".bmp"), 20_000, 20_000), id="bmp"),
        pytest.param(lambda: webp_canvas(16_000, 16_000), id="webp"),
        pytest.param(lambda: b"P5\n# big\n20000 20000\n255\n" + bytes(64), id="pgm"),
    ],
)
def test_huge_declared_images_are_refused_from_the_header(bomb: Callable[[], bytes], tmp_path: Path) -> None:
    """The size is read before decoding: these carry almost no pixels, so only the header can tell."""
    path = tmp_path / "huge.jpg"
    path.write_bytes(bomb())
    with pytest.raises(ImageDecodeError, match=rf"huge\.jpg: \d+x\d+ exceeds the {MAX_PIXELS} pixel limit"):
        read_image(path)


def test_a_real_decompression_bomb_is_refused_without_allocating_it(tmp_path: Path) -> None:
    """12 KB that inflates to 100 MB of pixels. Measured in a fresh process by its VmHWM (peak resident memory
    of this program alone: ru_maxrss would include the forked parent's)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(10_000, 10_000, 1, (bytes(1_250) for _ in range(10_000))))
    assert path.stat().st_size < 20_000
    probe = f"""
import re
from pathlib import Path
from faceforge.data.image import ImageDecodeError, read_image
def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) // 1024
before = peak_mb()
try:
    read_image({str(path)!r})
except ImageDecodeError as err:
    print(err)
print(peak_mb() - before)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    message, grown_mb = result.stdout.splitlines()
    assert "bomb.png: 10000x10000 exceeds" in message
    assert int(grown_mb) < 50, f"decoding grew the process by {grown_mb} MB"


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp", ".pgm"])
def test_header_sizes_match_the_decoded_image(ext: str) -> None:
    data = encoded(ext)
    assert declared_size(data) == (30, 40)
    assert decode_image(data, ext).shape == (40, 30, 3)


def test_images_are_read_by_content_not_by_extension(tmp_path: Path) -> None:
    person = tmp_path / "faces" / "ann"
    person.mkdir(parents=True)
    (person / "a.jpg").write_bytes(encoded(".png"))
    (person / "b.png").write_bytes(encoded(".jpg"))
    dataset = ImageFolderDataset(tmp_path / "faces")
    assert [dataset.read_image(i).shape for i in range(2)] == [(40, 30, 3)] * 2
    (person / "c.jpg").write_text("Dear user, this is not a photo.\n" * 20)
    (person / "d.jpg").write_bytes(cv2.imencode(".tiff", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    (person / "e.jpg").write_bytes(b"")
    dataset = ImageFolderDataset(tmp_path / "faces")
    for index, name, problem in [
        (2, "c", "not a decodable image"),
        (3, "d", "not a decodable image"),
        (4, "e", "empty"),
    ]:
        with pytest.raises(ImageDecodeError, match=rf"ann/{name}\.jpg: {problem}"):
            dataset[index]


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("kept", [0.1, 0.5, 0.9, 0.99])
def test_truncated_images_are_a_clear_error(ext: str, kept: float, tmp_path: Path) -> None:
    data = encoded(ext, 112, 112)
    path = tmp_path / f"cut{ext}"
    path.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(ImageDecodeError, match=rf"cut\{ext}: not a decodable image"):
        read_image(path)


# ---------------------------------------------------------------- RecordIO datasets


@pytest.fixture(scope="module")
def packed(tiny_train_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("packed")
    pack_folder(tiny_train_root, dst)
    return dst


def repacked(packed: Path, dst: Path, record0: IRHeader | None = None, idx_shift: dict[int, int] | None = None) -> Path:
    """A copy of `packed` with record 0 replaced and/or .idx offsets moved."""
    dst.mkdir()
    shutil.copy(packed / "property", dst / "property")
    with IndexedRecordReader(packed / "train") as reader, RecordWriter(dst / "train") as writer:
        for key in reader:
            record = reader.read(key)
            writer.write(key, pack_record(record0, b"") if key == 0 and record0 else record)
    if idx_shift:
        lines = [line.split("\t") for line in (dst / "train.idx").read_text().splitlines()]
        text = "".join(f"{k}\t{int(v) + idx_shift.get(int(k), 0)}\n" for k, v in lines)
        (dst / "train.idx").write_text(text)
    return dst


@pytest.mark.parametrize("span", [[1e9, 1e9 + 6], [np.inf, 1.0], [np.nan, 3.0]])
def test_lying_layout_header_is_refused_before_allocating(packed: Path, tmp_path: Path, span: list[float]) -> None:
    root = repacked(packed, tmp_path / "lying", IRHeader(2, np.array(span), 0))
    with pytest.raises(ValueError, match=r"lying/train\.rec record 0: header .* does not fit the 31 records"):
        RecordDataset(root)


def test_absurd_or_garbled_property_is_refused(packed: Path, tmp_path: Path) -> None:
    root = repacked(packed, tmp_path / "big")
    (root / "property").write_text("1000000000000,112,112")
    with pytest.raises(ValueError, match=r"big: 1000000000000 classes for 24 images"):
        RecordDataset(root)
    (root / "property").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=r"big/property: expected 'num_classes,height,width'"):
        RecordDataset(root)


def test_an_index_pointing_inside_a_record_fails_on_that_record(packed: Path, tmp_path: Path) -> None:
    root = repacked(packed, tmp_path / "shifted", idx_shift={6: 8})  # onto image record 6's payload
    dataset = RecordDataset(root)
    assert dataset.read_image(4).shape[2] == 3
    with pytest.raises(ValueError, match=r"shifted/train\.rec record 6: .*bad magic 0x00000000"):
        dataset.read_image(5)


def test_failed_repack_keeps_the_previous_pack(tiny_train_root: Path, packed: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pack"
    shutil.copytree(packed, dst)
    before = snapshot(dst)
    with disk_full_after(20_000), pytest.raises(OSError):
        pack_folder(tiny_train_root, dst, overwrite=True)
    source = tmp_path / "src"
    shutil.copytree(tiny_train_root, source)
    broken = next((source / sorted(os.listdir(source))[2]).iterdir())
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(ImageDecodeError, match=rf"{broken.name}: not a decodable image"):
        pack_folder(source, dst, overwrite=True)
    assert snapshot(dst) == before
    assert len(RecordDataset(dst)) == 24


# ---------------------------------------------------------------- verification sets


def pickle_with(opcode: bytes, length_format: str, claimed: int) -> bytes:
    """A protocol-4 pickle whose bytes object claims `claimed` bytes; the file holds 10."""
    return b"\x80\x04" + opcode + struct.pack(length_format, claimed) + b"0123456789" + b"."


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle_with(b"B", "<I", 2**31 - 1), "not a valid verification .bin"),  # BINBYTES
        (pickle_with(b"\x8e", "<Q", 2**62), "not a valid verification .bin"),  # BINBYTES8
        (pickle.dumps({"bins": [], "issame": []}), r"expected a pickled \(bins, issame_list\) pair"),
        (pickle.dumps(([b"a"] * 20, [True] * 10, "extra")), r"expected a pickled \(bins, issame_list\) pair"),
        (pickle.dumps((b"ab" * 10, [True] * 10)), r"expected a pickled \(bins, issame_list\) pair of lists"),
        (pickle.dumps((5, 6)), r"expected a pickled \(bins, issame_list\) pair of lists"),
        # bytes(2**62) called by the pickle: a dozen bytes of file asking for 4 EiB
        (
            b"\x80\x02c__builtin__\nbytes\n\x8a\x08" + struct.pack("<Q", 2**62) + b"\x85R.",
            r"not a valid .*bytes\(\) with arguments",
        ),
        (pickle.dumps((["a.jpg"] * 20, [True] * 10)), "bins must be encoded image bytes"),
        (pickle.dumps(([b"a"] * 20, [1] * 10)), "bins must be encoded image bytes and issame_list booleans"),
        (pickle.dumps(([b"a"] * 8, [True] * 4)), "4 pairs cannot form 10 folds"),
    ],
    ids=[
        "bytes-claims-2GB",
        "bytes8-claims-2^62",
        "dict",
        "triple",
        "bytes-not-list",
        "ints",
        "bytes-call",
        "str-bins",
        "int-issame",
        "few",
    ],
)
def test_malformed_bin_files(payload: bytes, message: str, tmp_path: Path) -> None:
    (tmp_path / "odd.bin").write_bytes(payload)
    with pytest.raises(ValueError, match=rf"odd\.bin: {message}"):
        load_bin(tmp_path / "odd.bin")


def test_failed_bin_write_keeps_the_previous_file(tmp_path: Path) -> None:
    images = [encoded(".jpg", 40 + i, 30) for i in range(4)]
    pairs = np.arange(20) % 4
    small = VerificationSet("v", images[:2], pairs % 2, pairs[::-1] % 2, pairs < 2, np.zeros(20, int))
    large = VerificationSet("v", images, pairs, pairs[::-1], pairs < 2, np.zeros(20, int))
    write_bin(tmp_path / "v.bin", small)
    before = (tmp_path / "v.bin").read_bytes()
    with disk_full_after(len(before) + 100), pytest.raises(OSError):
        write_bin(tmp_path / "v.bin", large)
    assert (tmp_path / "v.bin").read_bytes() == before and hidden(tmp_path) == []
    assert load_bin(tmp_path / "v.bin").num_pairs == 20


@pytest.fixture
def lfw_root(tmp_path: Path) -> Path:
    root = tmp_path / "lfw"
    for name in ("ann", "ben"):
        (root / name).mkdir(parents=True)
        for i in (1, 2):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(encoded(".jpg", 40 + i, 30))
    return root


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", ": empty pairs file"),
        ("ten\t1\nann 1 2\nann 1 ben 2\n", ":1: expected 'folds<TAB>n', got 'ten 1'"),
        ("1\t1\t1\nann 1 2\nann 1 ben 2\n", ":1: expected 'folds<TAB>n'"),
        ("0\t1\n", ":1: expected 'folds<TAB>n', got '0 1'"),
        ("1000000000\t1000000000\nann 1 2\n", ": header announces 1000000000 folds .* found 1 lines"),
        ("1\t1\n../lfw/ann 1 2\nann 1 ben 2\n", r":2: identity '\.\./lfw/ann' is not a folder name"),
        ("1\t1\nann 1 2\n.. 1 ben 2\n", r":3: identity '\.\.' is not a folder name"),
        ("1\t1\nann 1 2\nann 1 /etc/x 2\n", r":3: identity '/etc/x' is not a folder name"),
        ("1\t1\nann 1 -2\nann 1 ben 2\n", ":2: image number '-2' is not a positive integer"),
    ],
)
def test_malformed_pairs_headers_and_names(text: str, message: str, lfw_root: Path) -> None:
    pairs = lfw_root.parent / "pairs.txt"
    pairs.write_text(text)
    with pytest.raises(ValueError, match=rf"pairs\.txt{message}"):
        load_pairs(pairs, lfw_root)


def test_binary_or_missing_pairs_file(lfw_root: Path) -> None:
    pairs = lfw_root.parent / "pairs.txt"
    pairs.write_bytes(encoded(".png"))
    with pytest.raises(ValueError, match=r"pairs\.txt:1: expected 'folds<TAB>n'"):
        load_pairs(pairs, lfw_root)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_pairs(lfw_root.parent / "missing.txt", lfw_root)


# ---------------------------------------------------------------- failing disks: checkpoints, versions, crops


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.create("mobilefacenet", embedding_dim=32, width=0.25, input_size=56)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    head = ShardedMarginSoftmax(10, 32, margin_spec("arcface"))
    head_optimizer = HeadOptimizer(head)
    parts = {"model": model, "optimizer": optimizer, "head": head, "head_optimizer": head_optimizer}
    saved = save_checkpoint(tmp_path, 1, **parts, train_config={}, is_main=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = snapshot(tmp_path)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    with disk_full_after(16_384), pytest.raises(OSError, match=r"\.step_00000002\.tmp/model\.pt: write failed"):
        save_checkpoint(tmp_path, 2, **parts, train_config={}, is_main=True)
    assert sorted(os.listdir(tmp_path)) == ["latest", saved.name]  # no step 2, no staging folder left
    assert snapshot(tmp_path) == before and resolve_checkpoint(tmp_path) == saved
    assert load_checkpoint(tmp_path, **parts) == 1
    restored = load_backbone(tmp_path).state_dict()
    assert all(torch.equal(restored[k], v) for k, v in weights.items())


def face(index: int, identity: str) -> FaceRecord:
    return FaceRecord(
        face=f"{index:064x}_0",
        image_sha256=f"{index:064x}",
        source=f"album/{index}.jpg",
        album="album",
        box=[0.0, 0.0, 10.0, 10.0],
        landmarks=[[1.0, 2.0]] * 5,
        quality={"sharpness": 1.0},
        cluster=index % 3,
        identity=identity,
        round=1,
    )


def test_disk_full_while_writing_a_version_keeps_the_previous_version(tmp_path: Path) -> None:
    crops, root = tmp_path / "crops", tmp_path / "versions"
    crops.mkdir()
    faces = [face(i, f"person{i % 3}") for i in range(40)]
    for record in faces:
        (crops / f"{record.face}.jpg").write_bytes(encoded(".jpg", 20, 20))
    first = write_version(root, 1, faces[:6], crops, [], {})
    before = snapshot(first)
    with disk_full_after(2_000), pytest.raises(OSError):
        write_version(root, 2, faces, crops, [{"action": "drop", "reason": "blurry"}], {})
    assert list_versions(root) == [first] and os.listdir(root) == [first.name]
    assert snapshot(first) == before and len(read_manifest(first)) == 6
    (root / ".v0002.999999.tmp" / "images").mkdir(parents=True)  # left by a daemon killed mid-write
    second = write_version(root, 2, faces, crops, [], {})  # once there is space again
    assert len(read_manifest(second)) == 40 and snapshot(first) == before
    assert sorted(os.listdir(root)) == [first.name, second.name]


def test_disk_full_while_writing_a_crop_keeps_the_previous_crop(tmp_path: Path) -> None:
    crop = tmp_path / "crops" / "face.jpg"
    write_atomic(crop, encoded(".jpg", 20, 20))
    before = crop.read_bytes()
    with disk_full_after(len(before)), pytest.raises(OSError):
        write_atomic(crop, encoded(".jpg", 200, 200))
    assert crop.read_bytes() == before and read_image(crop).shape == (20, 20, 3)
    assert os.listdir(crop.parent) == [crop.name]  # no half-written temporary file left behind
