"""Face detection (MTCNN; Haar cascade + O-Net), 5-point alignment and `faceforge data align` on real photos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faceforge.cli import main as cli
from faceforge.data import read_image
from faceforge.data_pipeline import (
    ARCFACE_TEMPLATE,
    MTCNN,
    Detections,
    HaarDetector,
    align_face,
    align_tree,
    crop_fingerprint,
    get_detector,
    template_transform,
)
from faceforge.data_pipeline.align import AlignSettings, align_sources
from faceforge.data_pipeline.detection_eval import AnnotatedImage, DetectionScore, read_imglab
from faceforge.data_pipeline.mtcnn import (
    _normalise,
    area_crops,
    load_mtcnn_nets,
    nms,
    pnet_strips,
    summed_area_table,
    weights_dir,
)

from conftest import CLI, shared_data


@pytest.fixture(scope="module")
def mtcnn() -> MTCNN:
    return MTCNN()


def detection_dir() -> Path:
    folder = shared_data() / "detection"
    if not folder.is_dir():
        pytest.skip("../shared/data/detection is not present")
    return folder


def lfw_images(count: int) -> list[Path]:
    """The first image of the first `count` LFW identities."""
    folders = sorted(p for p in (shared_data() / "lfw").iterdir() if p.is_dir())[:count]
    return [sorted(folder.glob("*.jpg"))[0] for folder in folders]


def test_weights_load_strictly_without_importing_facenet_pytorch() -> None:
    for net, name in zip(load_mtcnn_nets(), ("pnet", "rnet", "onet"), strict=True):
        shipped = torch.load(weights_dir() / f"{name}.pt", weights_only=True)
        ours = net.state_dict()
        assert ours.keys() == shipped.keys()
        assert all(torch.equal(ours[key], shipped[key]) for key in ours)
    assert "facenet_pytorch" not in sys.modules


@pytest.fixture(scope="module")
def testing_set(mtcnn: MTCNN) -> tuple[list[AnnotatedImage], list[Detections]]:
    """dlib's hand-checked PASCAL VOC faces, many of them small (37 px), and what MTCNN finds: one call, mixed sizes."""
    truth = read_imglab(detection_dir() / "testing_with_face_landmarks.xml")
    return truth, mtcnn.detect([read_image(detection_dir() / image.file) for image in truth])


def test_detection_recall_and_false_positives(testing_set: tuple[list[AnnotatedImage], list[Detections]]) -> None:
    truth, found = testing_set
    score = DetectionScore()
    for image, faces in zip(truth, found, strict=True):
        score.add(image, faces)
    assert score.faces == 25
    assert score.recall >= 0.9, score
    assert score.false_positives_per_image <= 0.4, score
    # Landmarks against points derived from the 68-point annotation, over the inter-ocular distance.
    assert np.mean(score.landmark_nme) < 0.15, score


def test_landmarks_lie_inside_their_boxes_eyes_above_mouth(
    testing_set: tuple[list[AnnotatedImage], list[Detections]],
) -> None:
    for faces in testing_set[1]:
        assert len(faces) and np.all(np.diff(faces.scores) <= 0)
        x, y = faces.landmarks[..., 0], faces.landmarks[..., 1]
        boxes = faces.boxes[:, None, :]
        assert np.all((x >= boxes[..., 0]) & (x <= boxes[..., 2]) & (y >= boxes[..., 1]) & (y <= boxes[..., 3]))
        assert np.all(np.maximum(y[:, 0], y[:, 1]) < np.minimum(y[:, 3], y[:, 4]))  # eyes above the mouth
        assert np.all((x[:, 0] < x[:, 1]) & (x[:, 3] < x[:, 4]))  # left before right, as seen


def test_an_images_faces_do_not_depend_on_its_batch(mtcnn: MTCNN) -> None:
    """P-Net's grid gives boxes whose IoU is exactly the NMS threshold: other images must not tip the balance."""
    names = ["Bill_Clinton_0012", "Bill_Clinton_0024", "Franz_Muentefering_0003", "Haydar_Aliyev_0001"]
    names.append("Herb_Dhaliwal_0001")
    images = [read_image(shared_data() / "lfw" / name[:-5] / f"{name}.jpg") for name in names]
    for image, together in zip(images, mtcnn.detect(images), strict=True):
        alone = mtcnn.detect([image])[0]
        assert len(alone) == len(together)
        np.testing.assert_allclose(alone.boxes, together.boxes, atol=0.01)
        np.testing.assert_allclose(alone.landmarks, together.landmarks, atol=0.01)


PEAK_RSS_OF_DETECT = """
import json, sys
from pathlib import Path
import cv2
from faceforge.data import read_image
from faceforge.data_pipeline import MTCNN

def status_mib(key):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) / 2**10

detector = MTCNN()
image = read_image(sys.argv[1])
detector.detect([image])  # first-call allocations and thread pools
photos = [cv2.resize(image, (4000, 3000), interpolation=cv2.INTER_CUBIC) for _ in range(2)]
Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here
before = status_mib("VmRSS")
found = detector.detect(photos)
print(json.dumps({"rise_mib": status_mib("VmHWM") - before, "faces": [len(faces) for faces in found]}))
"""


def test_phone_photos_are_detected_in_bounded_memory() -> None:
    """Two 12 Mpx photos in one call (a group photo upscaled) once took 70 bytes a pixel each, 1.7 GB: a float copy,
    a float64 summed-area table, P-Net over the whole 2400 x 1800 first pyramid level. Now one photo's 4-byte table
    at a time and net inputs of bounded size: about 250 MiB. Peak RSS in a fresh process, whatever the allocator."""
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_OF_DETECT, str(detection_dir() / "2008_002506.jpg")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.splitlines()[-1])
    assert figures["faces"] == [3, 3]
    assert figures["rise_mib"] < 600, figures


def test_batched_crops_equal_per_crop_area_resize() -> None:
    """All crops at once from the summed-area table equal F.interpolate(area) of each zero-padded crop."""
    image = read_image(detection_dir() / "2008_002470.jpg")
    height, width = image.shape[:2]
    rng = np.random.default_rng(0)
    x1, y1 = rng.integers(-40, width, 60), rng.integers(-40, height, 60)
    side = rng.integers(3, 180, 60)  # tiny crops are upsampled, large ones averaged down
    boxes = torch.as_tensor(np.stack([x1, y1, x1 + side, y1 + side], 1))
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    table = summed_area_table([image], torch.device("cpu"))
    batched = area_crops(table, torch.zeros(60, dtype=torch.long), boxes, 24)
    padded = F.pad(batch, (200, 200, 200, 200))
    for crop, (left, top, right, bottom) in zip(batched, boxes.tolist(), strict=True):
        one = padded[:, :, top + 200 : bottom + 200, left + 200 : right + 200]
        torch.testing.assert_close(crop, F.interpolate(one, size=(24, 24), mode="area")[0], atol=1e-3, rtol=0)


@torch.inference_mode()
def test_pnet_in_strips_equals_pnet_over_the_whole_level(mtcnn: MTCNN) -> None:
    """Levels read strip by strip from the summed-area table give the maps of P-Net over the F.interpolate(area)
    level: odd and even level heights, strips of one output row up to the whole level, two photos at once."""
    images = [read_image(detection_dir() / name) for name in ("2007_007763.jpg", "2008_001322.jpg")]
    table = summed_area_table(images, torch.device("cpu"))
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    for size in [(101, 135), (40, 53), (12, 16)]:
        probs, offsets = mtcnn.pnet(_normalise(F.interpolate(batch, size=size, mode="area")))
        for strip_pixels in (1, 2 * 53 * 20, 10**9):
            strips = list(pnet_strips(mtcnn.pnet, table, size, strip_pixels))
            assert [first for first, *_ in strips] == list(np.cumsum([0] + [p.shape[1] for _, p, _ in strips[:-1]]))
            torch.testing.assert_close(torch.cat([p for _, p, _ in strips], 1), probs, atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.cat([o for *_, o in strips], 2), offsets, atol=1e-5, rtol=0)


def test_nms_within_each_image() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [2, 2, 6, 6]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    images = torch.tensor([0, 0, 1, 0])
    assert nms(boxes, scores, images, 0.5).tolist() == [0, 2, 3]  # box 1 overlaps box 0; box 2 is another image's
    assert nms(boxes, scores, images, 0.5, mode="min").tolist() == [0, 2]  # box 3 lies inside box 0


def test_user_mistakes_raise_one_clear_line(mtcnn: MTCNN, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown detector 'yolo'; choose from center, haar, mtcnn"):
        get_detector("yolo")
    with pytest.raises(ValueError, match="image 0: expected an RGB uint8 HxWx3 array, got float32"):
        mtcnn.detect([np.zeros((50, 50, 3), np.float32)])
    with pytest.raises(ValueError, match=r"expected 5 \(x, y\) landmarks"):
        template_transform(np.zeros((4, 2)))
    with pytest.raises(FileNotFoundError, match="source folder not found"):
        align_tree(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown detector 'dlib'"):
        align_tree(tmp_path, tmp_path / "out", fallbacks=["dlib"])


def test_alignment_puts_the_landmarks_on_the_template(mtcnn: MTCNN) -> None:
    image = read_image(lfw_images(1)[0])
    landmarks = mtcnn.detect([image])[0].landmarks[0]
    matrix = template_transform(landmarks)
    mapped = landmarks @ matrix[:, :2].T + matrix[:, 2]
    residuals = np.linalg.norm(mapped - ARCFACE_TEMPLATE, axis=1)
    assert residuals.mean() < 3.0 and residuals.max() < 6.0  # a similarity cannot fit every face's proportions
    # Detected again on the aligned crop (with a black margin so the face is whole), the landmarks are there.
    crop = align_face(image, landmarks)
    again = mtcnn.detect([cv2.copyMakeBorder(crop, 40, 40, 40, 40, cv2.BORDER_CONSTANT, value=0)])[0]
    assert np.linalg.norm(again.landmarks[0] - 40 - mapped, axis=1).max() < 3.0


def test_a_large_face_aligns_like_the_small_one(mtcnn: MTCNN) -> None:
    """A 4x larger photo (area-shrunk around the face before warping) gives the crop of the original one."""
    image = read_image(lfw_images(1)[0])
    landmarks = mtcnn.detect([image])[0].landmarks[0]
    large = cv2.resize(image, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    small_crop, large_crop = align_face(image, landmarks), align_face(large, (landmarks + 0.5) * 4 - 0.5)
    assert np.abs(small_crop.astype(np.float32) - large_crop).mean() < 4.0


def test_a_resized_or_reencoded_copy_aligns_to_the_same_fingerprint(mtcnn: MTCNN) -> None:
    """What the auto-labeller's near-copy check relies on, whatever the embedding model makes of the copy."""
    photos = [read_image(path) for path in lfw_images(12)]
    shrunk = [cv2.resize(image, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA) for image in photos]
    copies = [
        cv2.imdecode(cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 40])[1], cv2.IMREAD_COLOR)[
            :, :, ::-1
        ]
        for image in shrunk
    ]
    similarities = []
    for image, copy, original, again in zip(photos, copies, mtcnn.detect(photos), mtcnn.detect(copies), strict=True):
        first = crop_fingerprint(align_face(image, original.landmarks[0]))
        second = crop_fingerprint(align_face(np.ascontiguousarray(copy), again.landmarks[0]))
        similarities.append(float(first @ second))
    assert min(similarities) >= 0.92, similarities
    found = mtcnn.detect(photos)
    others = np.stack([crop_fingerprint(align_face(p, d.landmarks[0])) for p, d in zip(photos, found, strict=True)])
    assert (others @ others.T)[~np.eye(len(photos), dtype=bool)].mean() < 0.8  # different people
    flat = crop_fingerprint(np.full((112, 112, 3), 128, dtype=np.uint8))
    assert np.isclose(np.linalg.norm(flat), 1) and flat @ crop_fingerprint(np.zeros((112, 112, 3), np.uint8)) == 1


def test_haar_fallback_finds_the_faces_of_lfw() -> None:
    paths = lfw_images(10)
    found = HaarDetector().detect([read_image(path) for path in paths])
    hits = 0
    for faces in found:
        central = np.abs((faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2 - 125).max(1) < 30
        eyes_above_mouth = faces.landmarks[:, :2, 1].max(1) < faces.landmarks[:, 3:, 1].min(1)
        hits += bool(np.any(central & (faces.scores > 0.5) & eyes_above_mouth))
    assert hits >= 9


def test_haar_drops_the_cascade_boxes_o_net_rejects(tmp_path: Path) -> None:
    """Dogs: MTCNN finds no face, the cascade finds two boxes of fur. Kept, they would be aligned as faces."""
    dogs = shared_data() / "detection" / "dogs.jpg"
    assert not len(MTCNN().detect([read_image(dogs)])[0])
    assert not len(HaarDetector().detect([read_image(dogs)])[0])
    assert len(HaarDetector(min_score=0.0).detect([read_image(dogs)])[0]) >= 1  # the boxes are there to drop
    (tmp_path / "src").mkdir()
    shutil.copy(dogs, tmp_path / "src" / "dogs.jpg")
    counts = align_tree(tmp_path / "src", tmp_path / "dst", workers=1, fallbacks=["haar"], progress=False)
    assert counts["no_face"] == 1 and counts["aligned"] == 0


def test_align_tree_records_every_photo_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for path in lfw_images(2):
        (src / path.parent.name).mkdir(parents=True)
        (src / path.parent.name / path.name).write_bytes(path.read_bytes())
    odd = src / "odd"
    odd.mkdir()
    (odd / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    (odd / "empty.png").write_bytes(b"")
    cv2.imwrite(str(odd / "wall.png"), np.full((120, 160, 3), 128, np.uint8))  # a photo without a face

    cli(["data", "align", str(src), str(dst), "--workers", "2"])
    first = capsys.readouterr().out
    assert "images=5  skipped=0  aligned=2  no_face=1  error=2" in first
    records = {r["source"]: r for r in map(json.loads, (dst / "manifest.jsonl").read_text().splitlines())}
    assert records["odd/corrupt.jpg"]["status"] == "error"
    assert "not a decodable image" in records["odd/corrupt.jpg"]["error"]
    assert records["odd/empty.png"]["status"] == "error"
    assert "empty file" in records["odd/empty.png"]["error"]
    assert records["odd/wall.png"]["status"] == "no_face"
    aligned = [r for r in records.values() if r["status"] == "aligned"]
    for record in aligned:
        assert read_image(dst / record["output"]).shape == (112, 112, 3)
        assert record["score"] > 0.9 and len(record["landmarks"]) == 5 and record["detector"] == "mtcnn"

    manifest = (dst / "manifest.jsonl").read_bytes()
    assert align_tree(src, dst, workers=1, progress=False) == dict(images=5, skipped=5, aligned=0, no_face=0, error=0)
    assert (dst / "manifest.jsonl").read_bytes() == manifest

    (dst / aligned[0]["output"]).unlink()  # a lost crop is made again, and only it
    counts = align_tree(src, dst, workers=1, progress=False)
    assert counts == dict(images=5, skipped=4, aligned=1, no_face=0, error=0)
    assert (dst / aligned[0]["output"]).is_file()
    assert len((dst / "manifest.jsonl").read_text().splitlines()) == 5

    # The faceless photo again, with the last-resort fallback that crops the middle of every photo.
    counts = align_tree(src, dst, workers=1, fallbacks=["haar", "center"], redo=["no_face"], progress=False)
    assert counts == dict(images=5, skipped=4, aligned=1, no_face=0, error=0)
    wall = json.loads((dst / "manifest.jsonl").read_text().splitlines()[-1])
    assert wall["source"] == "odd/wall.png" and wall["detector"] == "center" and wall["score"] < 0.5


class TemplateOrNan:
    """A stand-in detector: landmarks on the template, or NaN (what O-Net gave for a 1 px crop) in 1 px high photos."""

    name = "template"

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        return [
            Detections(
                np.array([[0, 0, 112, 112]], np.float32),
                np.ones(1, np.float32),
                np.full((1, 5, 2), np.nan, np.float32) if image.shape[0] < 2 else ARCFACE_TEMPLATE[None],
            )
            for image in images
        ]


def test_a_photo_under_two_pixels_stops_no_align_run(tmp_path: Path) -> None:
    """The central box of a 1 px photo holds no pixel for O-Net: no face. A photo that still cannot be aligned is an
    error record naming it, and the other photos of its chunk are aligned."""
    strip, dot = np.full((1, 400, 3), 90, np.uint8), np.full((1, 1, 3), 90, np.uint8)
    assert [len(faces) for faces in get_detector("center").detect([strip, dot])] == [0, 0]

    src = tmp_path / "src"
    src.mkdir()
    for path in lfw_images(2):
        (src / path.name).write_bytes(path.read_bytes())
    cv2.imwrite(str(src / "strip.png"), strip)
    sources = sorted(path.name for path in src.iterdir())
    settings = AlignSettings(src, tmp_path / "dst", 112, False, "template")
    records = {r["source"]: r for r in align_sources(settings, sources, [TemplateOrNan()])}
    assert [records[source]["status"] for source in sources] == ["aligned", "aligned", "error"]
    assert records["strip.png"]["error"].startswith(f"{src / 'strip.png'}: degenerate landmarks")


def test_a_resumed_all_faces_run_redoes_a_photo_whose_records_were_torn(tmp_path: Path) -> None:
    """A kill between the write() calls of a chunk's records leaves a photo's first faces and a torn line."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "group.jpg").write_bytes((detection_dir() / "2008_002506.jpg").read_bytes())
    assert align_tree(src, dst, workers=1, all_faces=True, progress=False)["aligned"] == 3
    lines = (dst / "manifest.jsonl").read_text().splitlines(keepends=True)
    (dst / "manifest.jsonl").write_text(lines[0] + lines[1][:60])
    counts = align_tree(src, dst, workers=1, all_faces=True, progress=False)
    assert counts == dict(images=1, skipped=0, aligned=3, no_face=0, error=0)
    assert (dst / "manifest.jsonl").read_text().splitlines(keepends=True) == lines


def test_skipped_counts_only_photos_still_in_the_source(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for path in lfw_images(3):
        (src / path.name).write_bytes(path.read_bytes())
    assert align_tree(src, dst, workers=1, progress=False)["aligned"] == 3
    for path in sorted(src.iterdir())[:2]:  # pruned; their records stay in the manifest
        path.unlink()
    assert align_tree(src, dst, workers=1, progress=False) == dict(images=1, skipped=1, aligned=0, no_face=0, error=0)


def test_align_tree_refuses_folders_it_would_overwrite_or_mix(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for path in lfw_images(3):
        (src / path.name).write_bytes(path.read_bytes())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("a user's file")
    for where, options, message in [
        (tmp_path / "mine", {}, "holds files but no manifest.jsonl"),
        (src / "crops", {"size": 100_000}, "need 16 <= size <= 1024"),
        (tmp_path, {}, "must not hold the photos"),
        (src / "crops", {"min_face_size": 0, "workers": 2}, "min_face_size must be positive"),  # before any worker
    ]:
        with pytest.raises(ValueError, match=message):
            align_tree(src, where, "mtcnn", **{"workers": 1, "progress": False, **options})
    assert (tmp_path / "mine" / "keep.txt").read_text() == "a user's file"

    assert align_tree(src, dst, "center", workers=1, progress=False)["aligned"] == 3
    for options, message in [({"size": 160}, "size 112 \\(now 160\\)"), ({"all_faces": True}, "all_faces False")]:
        with pytest.raises(ValueError, match=message):
            align_tree(src, dst, "center", workers=1, progress=False, **options)

    # A photo replaced under its name is aligned again; the others are not.
    first = sorted(src.iterdir())[0]
    before = (dst / first.name).read_bytes()
    first.write_bytes(lfw_images(4)[3].read_bytes())
    assert align_tree(src, dst, "center", workers=1, progress=False) == dict(
        images=3, skipped=2, aligned=1, no_face=0, error=0
    )
    assert (dst / first.name).read_bytes() != before
    assert len((dst / "manifest.jsonl").read_text().splitlines()) == 3

    (dst / "align.json").unlink()  # a folder from before align.json: its crops tell their size
    with pytest.raises(ValueError, match="size 112 \\(now 160\\)"):
        align_tree(src, dst, "center", workers=1, progress=False, size=160)
    assert align_tree(src, dst, "center", workers=1, progress=False)["skipped"] == 3
    assert json.loads((dst / "align.json").read_text()) == {"size": 112, "all_faces": False}


def test_a_face_wholly_outside_the_photo_aligns_to_black() -> None:
    photo = np.full((100, 100, 3), 200, np.uint8)
    far_right = ARCFACE_TEMPLATE * 10 + np.array([5000, 0], np.float32)  # a large face, so the photo is shrunk first
    assert not align_face(photo, far_right).any()


def test_a_killed_align_run_leaves_no_worker_behind(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for path in lfw_images(40):
        (src / path.name).write_bytes(path.read_bytes())
    run = subprocess.Popen([*CLI, "data", "align", str(src), str(dst), "--workers", "2"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((dst / "manifest.jsonl").is_file() and (dst / "manifest.jsonl").read_text()):
            assert time.monotonic() < deadline and run.poll() is None, "no photo aligned"
            time.sleep(0.1)
        workers = children(run.pid)
        assert workers, "the run has no worker processes"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    deadline = time.monotonic() + 30
    while alive := [pid for pid in workers if Path(f"/proc/{pid}").exists() and not zombie(pid)]:
        if time.monotonic() > deadline:
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"workers {alive} outlived their killed run")
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
