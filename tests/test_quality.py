"""Face quality heuristics on real aligned LFW faces, their thresholds, and the error-versus-reject curve."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from faceforge.data import read_image
from faceforge.data_pipeline import ARCFACE_TEMPLATE, align_face, align_tree, get_detector
from faceforge.data_pipeline.quality import (
    QualityConfig,
    QualityScore,
    error_versus_reject,
    quality_eval,
    save_erc_plot,
    score_aligned,
    score_face,
)
from faceforge.eval.metrics import tar_at_far

from conftest import shared_data

GOOD = QualityScore(blur=200, inter_ocular=44, yaw=3, roll=-1, brightness=120, contrast=35, clipped=0.0)


@pytest.fixture(scope="module")
def faces() -> list[tuple[np.ndarray, np.ndarray]]:
    """(aligned 112 px crop, landmarks in the photo) of 3 real LFW photos, through MTCNN and the ArcFace template."""
    folders = sorted(p for p in (shared_data() / "lfw").iterdir() if p.is_dir())[:3]
    photos = [read_image(sorted(folder.glob("*.jpg"))[0]) for folder in folders]
    found = get_detector("mtcnn").detect(photos)
    return [(align_face(photo, f.landmarks[0]), f.landmarks[0]) for photo, f in zip(photos, found, strict=True)]


def rotated(points: np.ndarray, degrees: float) -> np.ndarray:
    """Points turned clockwise in image coordinates (y down) about their mean."""
    theta = math.radians(degrees)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    centre = points.mean(axis=0)
    return (points - centre) @ rotation.T + centre


def test_real_faces_pass_the_default_thresholds(faces: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for crop, landmarks in faces:
        score = score_face(crop, landmarks)
        assert score.reasons(QualityConfig()) == []
        assert 0 < score.score <= 1


def test_blur_ranks_a_sharp_face_above_the_same_face_blurred(faces: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for crop, landmarks in faces:
        sharp = score_face(crop, landmarks)
        softer = score_face(cv2.GaussianBlur(crop, (0, 0), 1.0), landmarks)
        blurred = score_face(cv2.GaussianBlur(crop, (0, 0), 2.5), landmarks)
        assert sharp.blur > softer.blur > blurred.blur
        assert sharp.score > softer.score > blurred.score
        assert blurred.reasons(QualityConfig()) == ["blur"]


def test_dark_clipped_and_flat_faces_are_detected(faces: list[tuple[np.ndarray, np.ndarray]]) -> None:
    config = QualityConfig()
    for crop, landmarks in faces:
        grey = crop.astype(np.float64)
        dark = score_face((grey * 0.15).astype(np.uint8), landmarks)
        blown = score_face(np.clip(grey * 1.5 + 100, 0, 255).astype(np.uint8), landmarks)
        flat = score_face((grey.mean() + (grey - grey.mean()) * 0.2).astype(np.uint8), landmarks)
        assert "brightness" in dark.reasons(config)
        assert {"clipped", "brightness"} <= set(blown.reasons(config))
        assert "contrast" in flat.reasons(config)
        assert "brightness" not in flat.reasons(config)
        original = score_face(crop, landmarks).score
        assert max(dark.score, blown.score, flat.score) < original


def test_photometric_parts_ignore_the_background(faces: list[tuple[np.ndarray, np.ndarray]]) -> None:
    crop, landmarks = faces[0]
    bordered = crop.copy()
    bordered[:, :16] = 0  # the black border alignment leaves beyond a photo's edge
    bordered[:20] = 255
    assert score_face(bordered, landmarks) == score_face(crop, landmarks)


@pytest.mark.parametrize("degrees", [-40.0, -12.5, 0.0, 7.0, 25.0])
def test_roll_follows_rotated_landmarks(degrees: float) -> None:
    frontal = score_face(np.full((112, 112, 3), 128, np.uint8), ARCFACE_TEMPLATE)
    turned = score_face(np.full((112, 112, 3), 128, np.uint8), rotated(ARCFACE_TEMPLATE.astype(np.float64), degrees))
    assert turned.roll == pytest.approx(frontal.roll + degrees, abs=1e-9)
    assert turned.yaw == pytest.approx(frontal.yaw, abs=1e-9)  # yaw is measured along the eye line
    assert turned.inter_ocular == pytest.approx(frontal.inter_ocular)


@pytest.mark.parametrize("roll", [0.0, 30.0])
def test_yaw_sign_follows_a_shifted_nose(roll: float) -> None:
    crop = np.full((112, 112, 3), 128, np.uint8)
    template = ARCFACE_TEMPLATE.astype(np.float64)
    along_eyes = (template[1] - template[0]) / np.linalg.norm(template[1] - template[0])
    yaws = []
    for shift in (-12.0, -4.0, 0.0, 4.0, 12.0):
        landmarks = template.copy()
        landmarks[2] += shift * along_eyes
        yaws.append(score_face(crop, rotated(landmarks, roll)).yaw)
    assert abs(yaws[2]) < 1.0  # the template is frontal
    assert yaws[0] < yaws[1] < 0 < yaws[3] < yaws[4]
    assert yaws[4] == pytest.approx(-yaws[0], abs=1.0)


def test_inter_ocular_is_measured_in_the_photo(faces: list[tuple[np.ndarray, np.ndarray]]) -> None:
    crop, landmarks = faces[0]
    full = score_face(crop, landmarks)
    small = score_face(crop, landmarks * 0.3)
    assert small.inter_ocular == pytest.approx(0.3 * full.inter_ocular)
    assert full.inter_ocular == pytest.approx(np.linalg.norm(landmarks[1] - landmarks[0]))
    assert small.reasons(QualityConfig()) == ["inter_ocular"]


def test_thresholds_from_the_config_name_the_failed_checks() -> None:
    assert GOOD.reasons(QualityConfig()) == []
    poor = QualityScore(blur=10, inter_ocular=12, yaw=-50, roll=35, brightness=30, contrast=5, clipped=0.4)
    assert poor.reasons(QualityConfig()) == ["blur", "inter_ocular", "yaw", "roll", "brightness", "contrast", "clipped"]
    strict = QualityConfig(min_blur=250, max_yaw=2, max_brightness=110, min_embedding_norm=20)
    assert GOOD.reasons(strict) == ["blur", "yaw", "brightness"]  # no norm to check
    assert dataclasses.replace(GOOD, embedding_norm=15.0).reasons(strict) == [
        "blur",
        "yaw",
        "brightness",
        "embedding_norm",
    ]
    assert dataclasses.replace(GOOD, embedding_norm=25.0).reasons(strict) == ["blur", "yaw", "brightness"]


def test_config_rejects_inconsistent_thresholds() -> None:
    for bad in ({"min_brightness": 200, "max_brightness": 100}, {"max_yaw": 0}, {"max_clipped": 1.5}, {"min_blur": -1}):
        with pytest.raises(ValueError):
            QualityConfig(**bad)


def test_score_is_monotone_in_every_part_and_scaled_by_the_norm() -> None:
    worse = {
        "blur": 50,
        "inter_ocular": 20,
        "yaw": -30,
        "roll": 20,
        "brightness": 230,
        "contrast": 10,
        "clipped": 0.2,
    }
    assert set(worse) == set(GOOD.factors())
    for part, value in worse.items():
        assert dataclasses.replace(GOOD, **{part: value}).score < GOOD.score, part
    assert all(0 < factor <= 1 for factor in GOOD.factors().values())
    assert dataclasses.replace(GOOD, embedding_norm=30.0).score == pytest.approx(30 * GOOD.score)
    record = json.loads(json.dumps(dataclasses.replace(GOOD, embedding_norm=30.0).to_dict()))
    assert (
        record["blur"] == 200 and record["embedding_norm"] == 30 and record["score"] == pytest.approx(30 * GOOD.score)
    )


def test_score_face_rejects_bad_input() -> None:
    crop = np.zeros((112, 112, 3), np.uint8)
    for bad_crop in (crop[..., 0], crop[:, :100], crop.astype(np.float32), crop[:20, :20]):
        with pytest.raises(ValueError):
            score_face(bad_crop, ARCFACE_TEMPLATE)
    for bad_landmarks in (ARCFACE_TEMPLATE[:4], np.full((5, 2), np.nan), np.zeros((5, 2))):
        with pytest.raises(ValueError):
            score_face(crop, bad_landmarks)


def test_error_versus_reject_on_a_hand_computed_case() -> None:
    # 4 genuine pairs, 10 impostors 0.00 .. 0.45: at FMR 0.1 only the 0.45 impostor matches (threshold just
    # above 0.40), so the genuine 0.3 is the one miss. Rejecting the worst pair (0.1, a hit) raises the FNMR;
    # rejecting the next one (0.2, the miss) removes every error.
    genuine = np.array([0.9, 0.5, 0.8, 0.3])
    similarities = np.concatenate([genuine, np.arange(10) * 0.05])
    same = np.arange(14) < 4
    quality_a = np.concatenate([[0.9, 0.1, 0.8, 0.2], np.zeros(10)])
    curve = error_versus_reject(quality_a, np.ones(14), similarities, same, fmr=0.1, fractions=(0, 0.25, 0.5))
    assert curve == [(0.0, 0.25), (0.25, pytest.approx(1 / 3)), (0.5, 0.0)]
    # The pair's quality is the worse face's: swapping sides changes nothing.
    assert error_versus_reject(np.ones(14), quality_a, similarities, same, 0.1, (0, 0.25, 0.5)) == curve


def synthetic_pairs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Genuine pairs whose similarity drops with the worse face's quality, and quality-blind impostors."""
    rng = np.random.default_rng(seed)
    genuine, impostor = 3000, 20000
    quality_a, quality_b = rng.uniform(size=(2, genuine + impostor))
    pair_quality = np.minimum(quality_a, quality_b)[:genuine]
    similarities = np.concatenate(
        [0.2 + 0.6 * pair_quality + rng.normal(0, 0.08, genuine), rng.normal(0.0, 0.1, impostor)]
    )
    return quality_a, quality_b, similarities, np.arange(genuine + impostor) < genuine


def test_error_versus_reject_falls_when_low_quality_pairs_are_the_errors() -> None:
    quality_a, quality_b, similarities, same = synthetic_pairs()
    fractions = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    curve = error_versus_reject(quality_a, quality_b, similarities, same, fmr=1e-3, fractions=fractions)
    fnmr = [value for _, value in curve]
    assert [fraction for fraction, _ in curve] == list(fractions)
    assert all(later <= earlier for earlier, later in itertools.pairwise(fnmr))
    assert fnmr[0] > 0.05 and fnmr[-1] < fnmr[0] / 5
    # Fraction 0 is the plain FNMR at that FMR, as the ROC module computes it.
    assert fnmr[0] == pytest.approx(1 - tar_at_far(similarities, same, [1e-3])[1e-3])
    # A quality that says nothing (random) leaves the curve about flat.
    rng = np.random.default_rng(1)
    blind = error_versus_reject(rng.uniform(size=len(same)), np.ones(len(same)), similarities, same, 1e-3, fractions)
    assert all(abs(value - fnmr[0]) < 0.03 for _, value in blind)


def test_tied_qualities_are_rejected_at_random_in_expectation() -> None:
    _, _, similarities, same = synthetic_pairs()
    ones = np.ones(len(same))
    flat = error_versus_reject(ones, ones, similarities, same, fmr=1e-3, fractions=(0.0, 0.2, 0.6))
    assert [value for _, value in flat] == pytest.approx([flat[0][1]] * 3)


def test_error_versus_reject_rejects_bad_arguments() -> None:
    quality_a, quality_b, similarities, same = synthetic_pairs()
    with pytest.raises(ValueError, match="equal length"):
        error_versus_reject(quality_a[:-1], quality_b, similarities, same)
    with pytest.raises(ValueError, match="boolean"):
        error_versus_reject(quality_a, quality_b, similarities, same.astype(int))
    with pytest.raises(ValueError, match="fractions"):
        error_versus_reject(quality_a, quality_b, similarities, same, fractions=(0.0, 1.0))
    with pytest.raises(ValueError, match="fmr"):
        error_versus_reject(quality_a, quality_b, similarities, same, fmr=1.5)
    with pytest.raises(ValueError, match="impostor"):
        error_versus_reject(quality_a, quality_b, similarities, same, fmr=1e-6)
    with pytest.raises(ValueError, match="finite"):
        error_versus_reject(quality_a, quality_b, np.where(same, np.nan, similarities), same)


def test_erc_plot_is_a_png(tmp_path: Path) -> None:
    quality_a, quality_b, similarities, same = synthetic_pairs()
    curves = {"synthetic": error_versus_reject(quality_a, quality_b, similarities, same)}
    path = save_erc_plot(curves, tmp_path / "plots" / "erc.png", "synthetic pairs")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_eval_on_real_lfw_pairs(tiny_pairs: Path, tmp_path: Path) -> None:
    """40 real LFW pairs: photos aligned by the pipeline, dlib's features; fraction 0 is the features' own FNMR."""
    lfw, features = shared_data() / "lfw", shared_data() / "lfw_dlib128_features.npz"
    rows = [line.split() for line in tiny_pairs.read_text().splitlines()[1:]]
    sides = [((r[0], r[1]), (r[0], r[2])) if len(r) == 3 else ((r[0], r[1]), (r[2], r[3])) for r in rows]
    photos = tmp_path / "photos"
    for name, number in {face for pair in sides for face in pair}:
        (photos / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(lfw / name / f"{name}_{int(number):04d}.jpg", photos / name)
    align_tree(photos, tmp_path / "aligned", workers=1, fallbacks=("center",), progress=False)
    assert len(score_aligned(tmp_path / "aligned")) == len(list(photos.rglob("*.jpg")))

    curves = quality_eval(tiny_pairs, photos, tmp_path / "aligned", features, fmr=0.1, fractions=(0.0, 0.25))
    assert set(curves) == {"score", *GOOD.factors()}
    data = np.load(features)
    row_of = {file: k for k, file in enumerate(data["files"].tolist())}
    feats = data["feats"] / np.linalg.norm(data["feats"], axis=1, keepdims=True)
    left, right = (
        [row_of[f"{name}_{int(number):04d}.jpg"] for name, number in side] for side in zip(*sides, strict=True)
    )
    similarities = np.einsum("ij,ij->i", feats[left], feats[right])
    same = np.array([len(r) == 3 for r in rows])
    plain = 1 - tar_at_far(similarities, same, [0.1])[0.1]
    for curve in curves.values():
        assert curve[0] == (0.0, pytest.approx(plain))
        assert 0 <= curve[1][1] <= 1


def test_score_aligned_needs_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest"):
        score_aligned(tmp_path)
