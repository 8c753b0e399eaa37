"""Datasets, RecordIO, verification pair sets, samplers and transforms on real face images."""

from __future__ import annotations

import itertools
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from faceforge.data import (
    DistributedBatchSampler,
    EvalTransform,
    ImageDecodeError,
    ImageFolderDataset,
    IndexedRecordReader,
    IRHeader,
    PKBatchSampler,
    RecordDataset,
    RecordWriter,
    TrainTransform,
    VerificationSet,
    center_crop_resize,
    decode_image,
    format_summary,
    inspect_dataset,
    iter_records,
    load_bin,
    load_pairs,
    open_dataset,
    pack_folder,
    pack_record,
    to_tensor,
    unpack_record,
    write_bin,
)
from faceforge.data.image import declared_size
from faceforge.data.recordio import MAGIC, MAGIC_BYTES
from faceforge.data.transforms import similarity_jitter
from faceforge.data.verification import read_pairs

from conftest import waiting_behind

DATA = Path("/work/shared/data")
IMAGES_PER_IDENTITY = 4


@pytest.fixture(scope="module")
def face_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three CelebA identities x 4 images, plus things a loader must ignore."""
    source = DATA / "celeba_ids"
    if not source.is_dir():
        pytest.skip("real face data not available")
    root = tmp_path_factory.mktemp("faces")
    for identity in sorted(p.name for p in source.iterdir())[:3]:
        (root / identity).mkdir()
        for image in sorted((source / identity).iterdir())[:IMAGES_PER_IDENTITY]:
            shutil.copy(image, root / identity / image.name)
    (root / sorted(p.name for p in root.iterdir())[0] / "notes.txt").write_text("not an image")
    (root / "zz_empty").mkdir()
    return root


@pytest.fixture(scope="module")
def packed(face_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("packed")
    pack_folder(face_tree, dst)
    return dst


def read_file_records(prefix: Path) -> list[tuple[int, int, bytes]]:
    with IndexedRecordReader(prefix) as reader:
        return [(key, reader.offsets[key], reader.read(key)) for key in reader]


# ---------------------------------------------------------------- folder dataset


def test_folder_dataset_lists_identities_in_sorted_order(face_tree: Path) -> None:
    dataset = ImageFolderDataset(face_tree, EvalTransform(56))
    assert dataset.classes == sorted(p.name for p in face_tree.iterdir() if p.name != "zz_empty")
    assert dataset.num_classes == 3 and len(dataset) == 3 * IMAGES_PER_IDENTITY
    assert all(Path(path).parent.name == dataset.classes[label] for path, label in dataset.samples)
    assert all(Path(path).suffix == ".jpg" for path, _ in dataset.samples)
    np.testing.assert_array_equal(dataset.labels, np.repeat([0, 1, 2], IMAGES_PER_IDENTITY))
    image, label = dataset[5]
    assert image.shape == (3, 56, 56) and label == 1


def test_folder_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no identity sub-folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path)


def test_identity_names_that_are_not_utf8_train_and_evaluate(face_tree: Path, tmp_path: Path) -> None:
    """A folder named in Latin-1 (José as bytes 4A 6F 73 E9): the digest a checkpoint records of its identities
    raised UnicodeEncodeError, and a pairs file naming it in those same bytes could not find its images."""
    person = next(p for p in sorted(face_tree.iterdir()) if p.name != "zz_empty")
    name = os.fsdecode(b"Jos\xe9")
    for identity in (name, "Anna"):
        shutil.copytree(person, tmp_path / "faces" / identity)
        for i, image in enumerate(sorted((tmp_path / "faces" / identity).glob("*.jpg")), 1):
            image.rename(image.with_name(f"{identity}_{i:04d}.jpg"))
    dataset = ImageFolderDataset(tmp_path / "faces")
    assert dataset.classes == ["Anna", name] and len(dataset.identity_digest) == 16
    (tmp_path / "pairs.txt").write_bytes(b"1\t1\nJos\xe9\t1\t2\nJos\xe9\t1\tAnna\t1\n")
    pairs, issame, _ = read_pairs(tmp_path / "pairs.txt", tmp_path / "faces")
    assert pairs[0] == (tmp_path / "faces" / name / f"{name}_0001.jpg", tmp_path / "faces" / name / f"{name}_0002.jpg")
    assert issame.tolist() == [True, False]


def test_every_format_decoding_reads_is_listed(tmp_path: Path) -> None:
    """decode_image reads the whole PNM family; a .ppm face beside .jpg ones was skipped without a word."""
    import cv2

    colour, grey = np.full((8, 8, 3), 90, np.uint8), np.full((8, 8), 90, np.uint8)
    (tmp_path / "ann").mkdir()
    for suffix in (".jpg", ".png", ".bmp", ".webp", ".pgm", ".ppm", ".pnm", ".pbm"):
        encoder, face = {".pnm": (".ppm", colour), ".pgm": (".pgm", grey), ".pbm": (".pbm", grey)}.get(
            suffix, (suffix, colour)
        )
        (tmp_path / "ann" / f"face{suffix}").write_bytes(cv2.imencode(encoder, face)[1].tobytes())
    dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 8
    assert all(decode_image(Path(path).read_bytes()).shape == (8, 8, 3) for path, _ in dataset.samples)


def test_corrupt_image_error_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg"):
        ImageFolderDataset(tmp_path)[0]
    dataset = ImageFolderDataset(tmp_path)
    (tmp_path / "bob" / "broken.jpg").unlink()  # gone since the listing: the trainer stops as for a corrupt one
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg: cannot be read"):
        dataset[0]


def test_a_jpeg_with_stray_bytes_before_a_marker_decodes_as_libjpeg_does(face_tree: Path) -> None:
    """libjpeg skips bytes between segments with a warning; the size read from the header gave up on them and the
    image was refused as undecodable."""
    clean = next(face_tree.rglob("*.jpg")).read_bytes()
    after_app0 = 4 + struct.unpack_from(">H", clean, 4)[0]
    padded = clean[:after_app0] + b"\x00\x00" + clean[after_app0:]
    np.testing.assert_array_equal(decode_image(padded, "padded.jpg"), decode_image(clean))
    # A stuffed FF 00 is no marker: reading a length after it could land on a small fake frame header, so that a
    # huge image passed the pixel limit. libjpeg scans on past it, and so does the size read.
    stuffed = clean[:after_app0] + b"\xff\x00" + clean[after_app0:]
    height, width = decode_image(clean).shape[:2]
    assert declared_size(stuffed) == declared_size(clean) == (width, height)


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 segment carrying only the EXIF orientation tag, as a phone camera writes it."""
    tiff = b"MM\x00\x2a" + struct.pack(">IH", 8, 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + bytes(4)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_decoding_follows_exif_orientation_and_keeps_16_bit_levels() -> None:
    import cv2

    landscape = np.zeros((20, 40, 3), np.uint8)
    landscape[:, :10] = 255  # white on the left edge
    jpeg = cv2.imencode(".jpg", landscape)[1].tobytes()
    rotated = decode_image(_with_exif_orientation(jpeg, 6))  # 6: the camera was turned a quarter clockwise
    assert rotated.shape == (40, 20, 3)
    assert rotated[:10].mean() > 200 and rotated[-10:].mean() < 50  # the left edge is now the top

    dim = np.full((4, 4, 3), 0x1000, np.uint16)  # a dark 16-bit image: 1/16 of full scale
    assert (decode_image(cv2.imencode(".png", dim)[1].tobytes()) == 0x10).all()  # not stretched to white
    twelve_bit = np.full((4, 4), 4000, np.uint16)  # sensor levels 0..4095 in a 16-bit file: black at >> 8
    with pytest.raises(ImageDecodeError, match="brightest level is 4000 of 65535 would be black"):
        decode_image(cv2.imencode(".png", twelve_bit)[1].tobytes(), "nir.png")
    pgm = b"P5\n4 4\n4095\n" + np.full((4, 4), 4000, ">u2").tobytes()  # a PNM states its own full scale
    assert (decode_image(pgm) == round(4000 * 255 / 4095)).all()
    binary, text = b"P5\n4 1\n15\n" + bytes([15, 8, 4, 0]), b"P2\n4 1\n15\n15 8 4 0\n"  # also below 8 bits
    assert decode_image(binary)[0, :, 0].tolist() == decode_image(text)[0, :, 0].tolist() == [255, 136, 68, 0]


# ---------------------------------------------------------------- RecordIO framing and headers


def test_pack_record_round_trips_scalar_and_array_labels() -> None:
    header, payload = unpack_record(pack_record(IRHeader(0, 7.0, 2**63 + 5, 2**40), b"jpeg bytes"))
    assert header == IRHeader(0, 7.0, 2**63 + 5, 2**40) and payload == b"jpeg bytes"
    packed = pack_record(IRHeader(0, np.array([3.0, 0.5, -2.25]), 9), b"\x00\x01")
    assert struct.unpack_from("<I", packed)[0] == 3 and len(packed) == 24 + 12 + 2
    header, payload = unpack_record(packed)
    assert header.flag == 3 and header.id == 9 and payload == b"\x00\x01"
    np.testing.assert_array_equal(header.label, np.array([3.0, 0.5, -2.25], dtype=np.float32))
    with pytest.raises(ValueError, match="announces"):
        unpack_record(struct.pack("<IfQQ", 1000, 0.0, 1, 0) + b"short")
    with pytest.raises(ValueError, match="shorter"):
        unpack_record(b"tiny")


def test_records_containing_the_magic_are_split_and_rejoined(tmp_path: Path) -> None:
    """dmlc cuts a record at each 4-byte-aligned magic word; an unaligned one stays inside."""
    records = {
        0: MAGIC_BYTES + b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"xyz",  # first, middle (empty) and last parts
        1: b"ab" + MAGIC_BYTES + b"cd",  # unaligned: not split
        2: b"head" + MAGIC_BYTES,  # ends on the magic: empty last part
        3: b"",
    }
    with RecordWriter(tmp_path / "split") as writer:
        for key, record in records.items():
            writer.write(key, record)
    raw = (tmp_path / "split.rec").read_bytes()
    flags, pos = [], 0
    while pos < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        pos += 8 + ((lrec & (2**29 - 1)) + 3) // 4 * 4
    assert flags == [1, 2, 2, 3, 0, 1, 3, 0]
    assert {key: record for key, _, record in read_file_records(tmp_path / "split")} == records
    assert [record for _, record in iter_records(tmp_path / "split.rec")] == list(records.values())


def test_rewriting_read_records_reproduces_identical_files(packed: Path, tmp_path: Path) -> None:
    original = read_file_records(packed / "train")
    with RecordWriter(tmp_path / "copy") as writer:
        for key, offset, record in original:
            assert writer.write(key, pack_record(*unpack_record(record))) == offset
    for suffix in (".rec", ".idx"):
        assert (tmp_path / f"copy{suffix}").read_bytes() == (packed / f"train{suffix}").read_bytes()


def test_damaged_record_files_raise_clear_errors(packed: Path, tmp_path: Path) -> None:
    data = (packed / "train.rec").read_bytes()
    offsets = [offset for _, offset, _ in read_file_records(packed / "train")]
    second = offsets[1]

    def damaged(raw: bytes) -> Path:
        (tmp_path / "bad.rec").write_bytes(raw)
        shutil.copy(packed / "train.idx", tmp_path / "bad.idx")
        return tmp_path / "bad"

    prefix = damaged(data[: second + 20])
    with pytest.raises(ValueError, match=r"bad\.idx:\d+: offset \d+ cannot start a record"):
        IndexedRecordReader(prefix)
    with pytest.raises(ValueError, match=rf"bad\.rec: record at offset {second} claims \d+ bytes"):
        list(iter_records(prefix.with_suffix(".rec")))
    wrong_magic = data[:second] + b"\0\0\0\0" + data[second + 4 :]
    with pytest.raises(ValueError, match=rf"bad magic 0x00000000 at offset {second}"):
        IndexedRecordReader(damaged(wrong_magic)).read(1)
    lying = data[:second] + MAGIC_BYTES + struct.pack("<I", 2**29 - 1) + data[second + 8 :]
    with pytest.raises(ValueError, match=rf"offset {second} claims 536870911 bytes"):
        IndexedRecordReader(damaged(lying)).read(1)
    with pytest.raises(ValueError, match="truncated record header"):
        list(iter_records(damaged(data + b"\n#\xd7").with_suffix(".rec")))
    for line in ("1 oops", "--5\t0", "\u00b2\t0"):
        (tmp_path / "bad.idx").write_text(f"0\t0\n{line}\n")
        with pytest.raises(ValueError, match=r"bad\.idx:2: expected 'key<TAB>offset'"):
            IndexedRecordReader(tmp_path / "bad")


def test_damaged_records_labels_and_keys_of_a_dataset_get_one_line(packed: Path, tmp_path: Path) -> None:
    records = read_file_records(packed / "train")
    framing = tmp_path / "framing"
    shutil.copytree(packed, framing)
    data = bytearray((packed / "train.rec").read_bytes())
    data[records[2][1] : records[2][1] + 4] = bytes(4)  # image record 2, not the first of its identity
    (framing / "train.rec").write_bytes(data)
    with pytest.raises(ImageDecodeError, match=r"train\.rec record 2: .*bad magic"):  # the trainer's clean stop
        RecordDataset(framing).read_image(1)

    image = unpack_record(records[1][2])[1]
    (tmp_path / "labels").mkdir()
    for label, message in [(float("inf"), "label inf is no key"), (1e30, "label 1\\.0\\d*e\\+30 is no key")]:
        with RecordWriter(tmp_path / "labels" / "train") as writer:  # no header: labels are read per image
            writer.write(0, pack_record(IRHeader(0, 0.0, 0), image))
            writer.write(1, pack_record(IRHeader(0, label, 1), image))
        with pytest.raises(ValueError, match=rf"train\.rec record 1: {message}"):
            RecordDataset(tmp_path / "labels")

    (framing / "train.idx").write_text(f"{2**64}\t0\n")
    with pytest.raises(ValueError, match=r"train\.idx:1: key 18446744073709551616 is outside"):
        RecordDataset(framing)

    subset = tmp_path / "subset"  # the identity records cut from the .idx: labels come from the images
    shutil.copytree(packed, subset)
    header_and_images = records[: -RecordDataset(packed).num_classes]
    (subset / "train.idx").write_text("".join(f"{key}\t{offset}\n" for key, offset, _ in header_and_images))
    np.testing.assert_array_equal(RecordDataset(subset).labels, RecordDataset(packed).labels)


# ---------------------------------------------------------------- InsightFace layout


def test_pack_folder_writes_insightface_layout(face_tree: Path, packed: Path) -> None:
    folder = ImageFolderDataset(face_tree)
    n, classes = len(folder), folder.num_classes
    assert (packed / "property").read_text().split(",")[0] == str(classes)
    headers = {key: unpack_record(record) for key, _, record in read_file_records(packed / "train")}
    assert list(headers) == list(range(n + 1 + classes))
    np.testing.assert_array_equal(headers[0][0].label, [n + 1, n + 1 + classes])
    for key, (path, label) in enumerate(folder.samples, 1):
        assert headers[key][0] == IRHeader(0, float(label), key, 0)
        assert headers[key][1] == Path(path).read_bytes()
    spans = [headers[n + 1 + c][0].label.tolist() for c in range(classes)]
    assert spans == [[1 + c * IMAGES_PER_IDENTITY, 1 + (c + 1) * IMAGES_PER_IDENTITY] for c in range(classes)]
    with pytest.raises(FileExistsError):
        pack_folder(face_tree, packed)


def test_a_pack_interrupted_between_its_renames_is_refused_not_read(face_tree: Path, tmp_path: Path) -> None:
    pack_folder(face_tree, tmp_path)
    (tmp_path / "property").unlink()
    (tmp_path / "property").mkdir()  # renaming the new property over a non-empty directory fails midway
    (tmp_path / "property" / "keep").touch()
    with pytest.raises(OSError):
        pack_folder(face_tree, tmp_path, reencode=True, overwrite=True)
    with pytest.raises(ValueError, match="interrupted"):
        RecordDataset(tmp_path)  # new train.rec and train.idx, no property: not a consistent pack
    shutil.rmtree(tmp_path / "property")
    for suffix in ("rec", "idx"):  # what a pack killed with -9 leaves behind
        (tmp_path / f".train.12345.tmp.{suffix}").write_bytes(b"partial")
    with waiting_behind(tmp_path / ".pack.lock", lambda: pack_folder(face_tree, tmp_path, overwrite=True)) as waiting:
        assert (tmp_path / ".train.12345.tmp.rec").exists() and waiting.is_alive(), "it waits for its turn"
    assert waiting.error is None and len(RecordDataset(tmp_path)) == len(ImageFolderDataset(face_tree))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".pack.lock", "property", "train.idx", "train.rec"]


def test_a_pack_that_waited_for_another_refuses_what_that_one_wrote(face_tree: Path, tmp_path: Path) -> None:
    with waiting_behind(tmp_path / ".pack.lock", lambda: pack_folder(face_tree, tmp_path)) as waiting:
        (tmp_path / "train.rec").write_bytes(b"the other pack's")
    assert isinstance(waiting.error, FileExistsError) and (tmp_path / "train.rec").read_bytes() == b"the other pack's"


def test_record_dataset_matches_the_folder(face_tree: Path, packed: Path) -> None:
    transform = TrainTransform(56, lowres_prob=0.5, grey_prob=0.5)
    folder, records = ImageFolderDataset(face_tree, transform), RecordDataset(packed, transform)
    assert len(records) == len(folder) and records.num_classes == folder.num_classes
    np.testing.assert_array_equal(records.labels, folder.labels)
    for index in range(len(folder)):
        np.testing.assert_array_equal(records.read_image(index), folder.read_image(index))
        (a, label_a), (b, label_b) = records[(index, 1000 + index)], folder[(index, 1000 + index)]
        assert label_a == label_b and torch.equal(a, b)
    assert isinstance(open_dataset(packed), RecordDataset)
    assert isinstance(open_dataset(face_tree), ImageFolderDataset)


def test_record_dataset_without_identity_records(face_tree: Path, tmp_path: Path) -> None:
    """Plain im2rec output: no record 0 header, array labels (flag 2) -> labels come from a header scan."""
    folder = ImageFolderDataset(face_tree)
    with RecordWriter(tmp_path / "train") as writer:
        for key, (path, label) in enumerate(folder.samples):
            writer.write(key, pack_record(IRHeader(0, [label, 1.0], key), Path(path).read_bytes()))
    dataset = RecordDataset(tmp_path)
    np.testing.assert_array_equal(dataset.labels, folder.labels)
    assert dataset.num_classes == 3 and dataset.image_size is None
    (tmp_path / "property").write_text("2,112,112")
    with pytest.raises(ValueError, match="outside the 2 classes"):
        RecordDataset(tmp_path)


def test_reencoded_pack_keeps_image_sizes(face_tree: Path, tmp_path: Path) -> None:
    summary = pack_folder(face_tree, tmp_path, quality=80, reencode=True)
    assert summary["images"] == 3 * IMAGES_PER_IDENTITY and summary["identities"] == 3
    folder, records = ImageFolderDataset(face_tree), RecordDataset(tmp_path)
    for index in (0, 7):
        original, reencoded = folder.read_image(index), records.read_image(index)
        assert reencoded.shape == original.shape
        assert np.abs(reencoded.astype(int) - original).mean() < 8
    import cv2

    (tmp_path / "wide" / "a").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "wide" / "a" / "strip.png"), np.zeros((8, 66_000, 3), np.uint8))
    with pytest.raises(ValueError, match=r"strip\.png: a 66000x8 image cannot be JPEG-encoded"):
        pack_folder(tmp_path / "wide", tmp_path / "wide_rec", reencode=True)


def test_loader_workers_see_the_same_augmented_batches(packed: Path) -> None:
    dataset = RecordDataset(packed, TrainTransform(56))
    sampler = DistributedBatchSampler(len(dataset), 4, 1, 0, seed=3)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
        batches.append(list(itertools.islice(loader, 3)))
    for (a, la), (b, lb) in zip(*batches, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


# ---------------------------------------------------------------- verification sets


def test_load_lfw_pairs() -> None:
    if not (DATA / "lfw" / "pairs.txt").is_file():
        pytest.skip("LFW not available")
    vset = load_pairs(DATA / "lfw" / "pairs.txt", DATA / "lfw")
    assert vset.num_pairs == 6000 and vset.num_folds == 10 and int(vset.issame.sum()) == 3000
    np.testing.assert_array_equal(np.bincount(vset.folds), [600] * 10)
    np.testing.assert_array_equal(vset.issame[:600], np.repeat([True, False], 300))
    assert len(vset.images) == len(set(vset.images)) < 12000
    name, i, _ = (DATA / "lfw/pairs.txt").read_text().splitlines()[1].split()
    assert vset.images[vset.left[0]] == (DATA / "lfw" / name / f"{name}_{int(i):04d}.jpg").read_bytes()
    assert decode_image(vset.images[vset.right[-1]]).shape == (250, 250, 3)


def test_malformed_pairs_files(face_tree: Path, tmp_path: Path) -> None:
    """Use the face tree as an LFW-style root by naming images <name>_0001.jpg."""
    root = tmp_path / "root"
    images = [path for path, label in ImageFolderDataset(face_tree).samples if label == 0]
    for name in ("ann", "ben"):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images, 1):
            shutil.copy(image, root / name / f"{name}_{i:04d}.jpg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t1\nann 1 2\nann 1 ben 3\nben 2 4\nben 1 ann 4\n")
    vset = load_pairs(pairs, root)
    assert vset.issame.tolist() == [True, False, True, False] and vset.folds.tolist() == [0, 0, 1, 1]
    assert len(vset.images) == 4  # ann_000i and ben_000i are the same file: stored once
    pairs.write_text("2\t1\nann 1 2\nann 1 ben 3\nben 2\nben 1 ann 4\n")
    with pytest.raises(ValueError, match=r"pairs\.txt:4: expected 'name i j'"):
        load_pairs(pairs, root)
    pairs.write_text("2\t1\nann 1 2\nann 1 ben 3\nben 2 9\nben 1 ann 4\n")
    with pytest.raises(FileNotFoundError, match=r"pairs\.txt:4: image .*ben_0009\.jpg not found"):
        load_pairs(pairs, root)
    pairs.write_text("2\t1\nann 1 2\nann 1 ben 3\n")
    with pytest.raises(ValueError, match="found 2 lines"):
        load_pairs(pairs, root)
    pairs.write_text("2\t1\nann 1 2\nann 1 ann 3\nben 2 4\nben 1 ann 4\n")
    with pytest.raises(ValueError, match=r"pairs\.txt:3: a mismatched pair names one identity twice"):
        load_pairs(pairs, root)
    pairs.write_text("2\t1\nann 1 2\nann 1 ben \u00b2\nben 2 4\nben 1 ann 4\n")  # a superscript two
    with pytest.raises(ValueError, match=r"pairs\.txt:3: image number '\u00b2' is not a positive integer"):
        load_pairs(pairs, root)
    pairs.write_text("\ufeff2\t1\nann 1 2\nann 1 ben 3\nben 2 4\nben 1 ann 4\n")  # saved by Notepad
    assert load_pairs(pairs, root).num_pairs == 4


def small_vset(face_tree: Path, num_pairs: int = 23) -> VerificationSet:
    images = [Path(path).read_bytes() for path, _ in ImageFolderDataset(face_tree).samples]
    rng = np.random.default_rng(0)
    left, right = rng.integers(len(images), size=(2, num_pairs))
    return VerificationSet("tiny", images, left, right, rng.random(num_pairs) < 0.5, np.zeros(num_pairs, int))


def test_bin_round_trip(face_tree: Path, tmp_path: Path) -> None:
    vset = small_vset(face_tree)
    write_bin(tmp_path / "tiny.bin", vset)
    loaded = load_bin(tmp_path / "tiny.bin")
    assert loaded.name == "tiny" and loaded.num_pairs == 23
    np.testing.assert_array_equal(loaded.issame, vset.issame)
    np.testing.assert_array_equal(np.bincount(loaded.folds), [3, 3, 3] + [2] * 7)
    for side, original in ((loaded.left, vset.left), (loaded.right, vset.right)):
        assert [loaded.images[i] for i in side] == [vset.images[i] for i in original]
    assert len(loaded.images) == len(set(loaded.images))
    write_bin(tmp_path / "again.bin", loaded)
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "tiny.bin").read_bytes()


def test_bin_from_python2_era_pickles_with_numpy_bools(tmp_path: Path) -> None:
    bins = [b"img%d" % (i % 5) for i in range(20)]
    (tmp_path / "old.bin").write_bytes(pickle.dumps((bins, [np.bool_(i % 3 == 0) for i in range(10)]), protocol=2))
    loaded = load_bin(tmp_path / "old.bin")
    assert loaded.issame.tolist() == [i % 3 == 0 for i in range(10)] and len(loaded.images) == 5


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_bin_refuses_malicious_and_broken_pickles(face_tree: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([_Exploit(marker)] * 20, [True] * 10)))
    with pytest.raises(ValueError, match=r"refusing to load posix\.system"):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    write_bin(tmp_path / "good.bin", small_vset(face_tree))
    data = (tmp_path / "good.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.bin: not a valid verification \.bin"):
        load_bin(tmp_path / "cut.bin")
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ValueError, match="not a valid verification"):
        load_bin(tmp_path / "noise.bin")
    (tmp_path / "odd.bin").write_bytes(pickle.dumps(([b"a"] * 19, [True] * 10)))
    with pytest.raises(ValueError, match="19 images for 10 pairs"):
        load_bin(tmp_path / "odd.bin")


# ---------------------------------------------------------------- samplers


def take(sampler: DistributedBatchSampler | PKBatchSampler, steps: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(sampler, steps))


def test_distributed_ranks_split_each_global_batch() -> None:
    world, batch = 3, 4
    ranks = [take(DistributedBatchSampler(50, batch, world, rank, seed=7), 8) for rank in range(world)]
    assert ranks[0][0] != take(DistributedBatchSampler(50, batch, world, 0, seed=8), 1)[0]
    steps_per_epoch = 50 // (batch * world)
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            items = [item for rank in ranks for item in rank[step]]
            assert all(len(rank[step]) == batch for rank in ranks)
            assert len({index for index, _ in items}) == len({seed for _, seed in items}) == batch * world
            seen += [index for index, _ in items]
        assert len(set(seen)) == len(seen) == 48  # two samples dropped each epoch
    first_epoch = [i for step in ranks[0][:steps_per_epoch] for i, _ in step]
    second_epoch = [i for step in ranks[0][steps_per_epoch:] for i, _ in step]
    assert first_epoch != second_epoch
    ordered = take(DistributedBatchSampler(10, 2, 2, 1, seed=0, shuffle=False), 3)
    assert [[i for i, _ in batch] for batch in ordered] == [[2, 3], [6, 7], [2, 3]]


def test_distributed_sampler_resumes_exactly() -> None:
    full = take(DistributedBatchSampler(37, 3, 2, 1, seed=11), 20)
    assert take(DistributedBatchSampler(37, 3, 2, 1, seed=11, start_step=13), 7) == full[13:]
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        DistributedBatchSampler(7, 4, 2, 0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        DistributedBatchSampler(100, 4, 2, 2, seed=0)


def test_pk_sampler_structure_and_resume() -> None:
    labels = np.repeat(np.arange(13), [1, 2, 3, 5, 8, 8, 2, 9, 4, 4, 6, 1, 7])
    p, k, world = 2, 4, 2
    ranks = [PKBatchSampler(labels, p, k, world, rank, seed=5) for rank in range(world)]
    assert ranks[0].steps_per_epoch == 13 // (p * world)
    batches = [take(sampler, 9) for sampler in ranks]
    for step in range(9):
        identities = []
        for rank in range(world):
            indices = [index for index, _ in batches[rank][step]]
            ids, counts = np.unique(labels[indices], return_counts=True)
            assert len(ids) == p and counts.tolist() == [k] * p
            for identity in ids:
                chosen = {i for i in indices if labels[i] == identity}
                members = set(np.flatnonzero(labels == identity).tolist())
                assert chosen <= members and len(chosen) == min(k, len(members))  # none left out
            identities += ids.tolist()
        assert len(set(identities)) == p * world
    epoch_ids = [labels[i] for step in range(3) for rank in range(world) for i, _ in batches[rank][step]]
    assert len(set(epoch_ids)) == 12
    resumed = PKBatchSampler(labels, p, k, world, 1, seed=5, start_step=4)
    assert take(resumed, 5) == batches[1][4:]
    with pytest.raises(ValueError, match="cannot fill"):
        PKBatchSampler(labels, 4, 2, 4, 0, seed=0)


# ---------------------------------------------------------------- transforms and inspection


def test_train_transform_is_deterministic_per_seed(face_tree: Path) -> None:
    img = ImageFolderDataset(face_tree).read_image(0)
    transform = TrainTransform(64, crop_fraction=0.9, lowres_prob=0.5, grey_prob=0.3)
    outputs = [transform(img, np.random.default_rng(seed)) for seed in range(12)]
    assert torch.equal(outputs[3], transform(img, np.random.default_rng(3)))
    assert len({o.sum().item() for o in outputs}) == 12
    for out in outputs:
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
    plain = TrainTransform(64, crop_fraction=0.9, flip=False, lowres_prob=0.0, jitter=0.0)
    expected = to_tensor(center_crop_resize(img, 64, 0.9))
    assert torch.equal(plain(img, np.random.default_rng(0)), expected)
    assert torch.equal(EvalTransform(64, 0.9)(img), expected)
    grey = TrainTransform(64, grey_prob=1.0)(img, np.random.default_rng(0))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    sharp = TrainTransform(64, flip=False, lowres_prob=0.0, jitter=0.0)(img, np.random.default_rng(0))
    blurred = TrainTransform(64, flip=False, lowres_prob=1.0, lowres_min=0.2, jitter=0.0)
    assert not torch.equal(blurred(img, np.random.default_rng(0)), sharp)
    with pytest.raises(ValueError, match="grey_prob"):
        TrainTransform(64, grey_prob=1.5)


def test_similarity_jitter_moves_and_scales_the_face_within_its_bounds() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[24:40, 24:40] = 255  # a 16-pixel square centred at (31.5, 31.5)

    def centre_and_area(out: np.ndarray) -> tuple[np.ndarray, float]:
        mass = out[..., 0].astype(np.float64) / 255
        ys, xs = np.indices(mass.shape)
        return np.array([(xs * mass).sum(), (ys * mass).sum()]) / mass.sum(), mass.sum()

    moves, areas = [], []
    for seed in range(10):
        shifted = similarity_jitter(img, 0.1, 0.0, 0.0, np.random.default_rng(seed))
        moves.append(np.abs(centre_and_area(shifted)[0] - 31.5))
        areas.append(centre_and_area(similarity_jitter(img, 0.0, 0.2, 0.0, np.random.default_rng(seed)))[1])
    assert max(m.max() for m in moves) <= 6.4 + 0.5 and max(m.max() for m in moves) > 2.0
    assert all(256 * 0.8**2 - 4 <= a <= 256 * 1.2**2 + 4 for a in areas) and max(areas) - min(areas) > 20
    unchanged = TrainTransform(64, flip=False, lowres_prob=0.0, jitter=0.0, shift=0.0, scale=0.0, rotate=0.0)
    assert torch.equal(unchanged(img, np.random.default_rng(0)), to_tensor(img))
    rotated = TrainTransform(64, flip=False, lowres_prob=0.0, jitter=0.0, rotate=30.0)
    assert not torch.equal(rotated(img, np.random.default_rng(0)), to_tensor(img))
    with pytest.raises(ValueError, match="shift"):
        TrainTransform(64, shift=0.6)


def test_inspect_every_format(face_tree: Path, packed: Path, tmp_path: Path) -> None:
    folder = inspect_dataset(face_tree)
    assert folder["kind"] == "folder" and folder["identities"] == 3 and folder["images"] == 12
    assert folder["images_per_identity"] == {"min": 4, "median": 4.0, "max": 4}
    record = inspect_dataset(packed)
    assert record["kind"] == "recordio" and record["num_classes"] == 3
    assert {k: v for k, v in record.items() if k not in ("kind", "path", "num_classes")} == {
        k: v for k, v in folder.items() if k not in ("kind", "path")
    }
    write_bin(tmp_path / "tiny.BIN", small_vset(face_tree, 30))  # copied from a case-insensitive file system
    binary = inspect_dataset(tmp_path / "tiny.BIN")
    assert binary["kind"] == "bin" and binary["pairs"] == 30 and binary["folds"] == 10
    lines = format_summary(binary).splitlines()
    assert len(lines) == len(binary) and lines[4].split() == ["pairs", "30"]
    assert lines[-1].split()[-1] == "x".join(map(str, binary["image_size"]))
    if (DATA / "lfw" / "pairs.txt").is_file():
        lfw = inspect_dataset(DATA / "lfw" / "pairs.txt")
        assert (lfw["pairs"], lfw["folds"], lfw["same_pairs"], lfw["image_size"]) == (
            6000,
            10,
            3000,
            [250, 250],
        )
    (tmp_path / "labels.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown dataset format"):
        inspect_dataset(tmp_path / "labels.csv")
