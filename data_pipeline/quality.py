"""Face quality: millisecond heuristics on an aligned crop and its landmarks, thresholds with named reasons, and the
error-versus-reject curve that says whether a quality score predicts recognition errors.

Landmarks are in the MTCNN/ArcFace order: left eye, right eye, nose tip, left and right mouth corners (left and
right as seen in the image). Photometric measures use the inner face of the crop only (eyes to below the mouth,
cheek to cheek), so background, hair and the black border alignment adds beyond a photo's edge do not count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from faceforge.data.image import read_image
from faceforge.data.verification import load_pairs
from faceforge.data_pipeline.align import ARCFACE_TEMPLATE, MANIFEST
from faceforge.data_pipeline.dedup import calibrate_threshold
from faceforge.eval.report import write_png

# Inner face of a 112 px ArcFace crop (rows, columns), scaled for other sizes: 20 px above the eyes to 12 below the
# mouth, 14 px outside each eye.
FACE_ROWS = (round(ARCFACE_TEMPLATE[:2, 1].mean()) - 20, round(ARCFACE_TEMPLATE[3:, 1].mean()) + 12)
FACE_COLUMNS = (round(ARCFACE_TEMPLATE[0, 0]) - 14, round(ARCFACE_TEMPLATE[1, 0]) + 14)
# How far the nose tip stands in front of the plane of the eyes and mouth corners, in inter-ocular distances
# (a generic head model). Turning the head by yaw θ moves the nose off the midline by depth·sin θ while the eyes
# close up to IOD·cos θ, so yaw = atan(offset / (NOSE_DEPTH · observed IOD)). A rough, monotone pose estimate.
NOSE_DEPTH = 0.45
# The value at which each saturating factor of `QualityScore.score` is 1/2.
BLUR_HALF = 100.0  # Laplacian variance: sharp 112 px LFW crops have a median of ~200, a Gaussian blur σ=2 ~16
INTER_OCULAR_HALF = float(np.linalg.norm(ARCFACE_TEMPLATE[1] - ARCFACE_TEMPLATE[0]))  # the template's 35.2 px
CONTRAST_HALF = 20.0  # grey-level standard deviation
CLIP_LOW, CLIP_HIGH = 5, 250  # grey levels counted as clipped (crushed shadows, blown highlights)
DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds a face must meet; the defaults suit 112 px ArcFace crops (1.7% of LFW's fail them, most on yaw)."""

    min_blur: float = 30.0  # Laplacian variance of the inner face
    min_inter_ocular: float = 20.0  # px in the original photo; below it the crop is upsampled ~1.8x or more
    max_yaw: float = 40.0  # degrees
    max_roll: float = 30.0  # degrees; alignment undoes roll, a large one mostly means misplaced landmarks
    min_brightness: float = 40.0  # mean grey level, 0-255
    max_brightness: float = 220.0
    min_contrast: float = 12.0  # grey-level standard deviation
    max_clipped: float = 0.15  # fraction of inner-face pixels at or below 5 or at or above 250
    min_embedding_norm: float | None = None  # MagFace-style models only; their norm grows with quality

    def __post_init__(self) -> None:
        if not 0 <= self.min_brightness < self.max_brightness <= 255:
            brightness = f"{self.min_brightness}, {self.max_brightness}"
            raise ValueError(f"need 0 <= min_brightness < max_brightness <= 255, got {brightness}")
        if not (0 < self.max_yaw <= 90 and 0 < self.max_roll <= 180):
            raise ValueError(f"need max_yaw in (0, 90] and max_roll in (0, 180], got {self.max_yaw}, {self.max_roll}")
        if not 0 <= self.max_clipped <= 1:
            raise ValueError(f"max_clipped is a fraction in [0, 1], got {self.max_clipped}")
        if min(self.min_blur, self.min_inter_ocular, self.min_contrast, self.min_embedding_norm or 0) < 0:
            raise ValueError("min_blur, min_inter_ocular, min_contrast and min_embedding_norm cannot be negative")


@dataclass(frozen=True)
class QualityScore:
    """Every measured part of one face's quality."""

    blur: float  # Laplacian variance of the inner face: low when blurred or upsampled
    inter_ocular: float  # eye-to-eye distance in the original photo, px
    yaw: float  # degrees, > 0 when the nose is right of the eye/mouth midline in the image
    roll: float  # degrees the eye line is turned clockwise in the image (right eye lower)
    brightness: float  # mean grey level of the inner face
    contrast: float  # its grey-level standard deviation
    clipped: float  # its fraction of clipped pixels
    embedding_norm: float | None = None

    def reasons(self, config: QualityConfig) -> list[str]:
        """The checks this face fails, named after its parts (brightness covers too dark and too bright); the
        embedding norm is checked only when the config sets a minimum and the face has a norm."""
        failed = {
            "blur": self.blur < config.min_blur,
            "inter_ocular": self.inter_ocular < config.min_inter_ocular,
            "yaw": abs(self.yaw) > config.max_yaw,
            "roll": abs(self.roll) > config.max_roll,
            "brightness": not config.min_brightness <= self.brightness <= config.max_brightness,
            "contrast": self.contrast < config.min_contrast,
            "clipped": self.clipped > config.max_clipped,
            "embedding_norm": config.min_embedding_norm is not None
            and self.embedding_norm is not None
            and self.embedding_norm < config.min_embedding_norm,
        }
        return [name for name, fails in failed.items() if fails]

    def factors(self) -> dict[str, float]:
        """Each heuristic part mapped to [0, 1], non-decreasing as the face gets better: sharpness, size and
        contrast saturate (x / (x + half)), pose is a cosine, brightness peaks at mid-grey, clipping counts down."""
        return {
            "blur": self.blur / (self.blur + BLUR_HALF),
            "inter_ocular": self.inter_ocular / (self.inter_ocular + INTER_OCULAR_HALF),
            "yaw": math.cos(math.radians(self.yaw)),
            "roll": max(0.0, math.cos(math.radians(self.roll))),
            "brightness": max(0.0, 1.0 - ((self.brightness - 127.5) / 127.5) ** 2),
            "contrast": self.contrast / (self.contrast + CONTRAST_HALF),
            "clipped": 1.0 - self.clipped,
        }

    @property
    def heuristic(self) -> float:
        """The product of the factors, in [0, 1]: it falls with any single bad part and never rises when a part gets
        worse. It does not depend on the model, so it ranks faces that different models embedded."""
        return math.prod(self.factors().values())

    @property
    def score(self) -> float:
        """The ranking scalar within one model's faces: the heuristic times the embedding norm when there is one
        (raw, so it ranks the same whatever scale that model's norms have)."""
        return self.heuristic * (1.0 if self.embedding_norm is None else self.embedding_norm)

    @classmethod
    def from_dict(cls, parts: dict[str, float | None]) -> QualityScore:
        """A score read back from its `to_dict` record."""
        return cls(**{field.name: parts[field.name] for field in fields(cls)})

    def to_dict(self) -> dict[str, float | None]:
        """The parts and the score, rounded for a JSON manifest."""
        parts = {name: None if value is None else round(value, 4) for name, value in asdict(self).items()}
        return {**parts, "score": round(self.score, 6)}


def face_region(crop: np.ndarray) -> np.ndarray:
    """The inner face of a square aligned crop, as grey levels."""
    scale = crop.shape[0] / 112
    (top, bottom), (left, right) = ([round(v * scale) for v in span] for span in (FACE_ROWS, FACE_COLUMNS))
    return cv2.cvtColor(crop[top:bottom, left:right], cv2.COLOR_RGB2GRAY)


def pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(inter-ocular distance, yaw, roll) from the 5 landmarks; the midline is the mean of eyes and mouth corners,
    and offsets are measured along the eye line, so roll does not leak into yaw."""
    left_eye, right_eye, nose = landmarks[0], landmarks[1], landmarks[2]
    inter_ocular = float(np.linalg.norm(right_eye - left_eye))
    if inter_ocular < 1e-6:
        raise ValueError(f"degenerate landmarks: the two eyes coincide at {left_eye.tolist()}")
    across = (right_eye - left_eye) / inter_ocular
    offset = float((nose - landmarks[[0, 1, 3, 4]].mean(axis=0)) @ across)
    yaw = math.degrees(math.atan2(offset, NOSE_DEPTH * inter_ocular))
    return inter_ocular, yaw, math.degrees(math.atan2(across[1], across[0]))


def score_face(
    crop_rgb: np.ndarray, landmarks_in_photo: np.ndarray, embedding_norm: float | None = None
) -> QualityScore:
    """The quality parts of one face: its square aligned RGB crop (112 px for the default thresholds) and its
    5 landmarks in the original photo, whose scale the inter-ocular distance must reflect."""
    crop_rgb, landmarks = np.asarray(crop_rgb), np.asarray(landmarks_in_photo, dtype=np.float64)
    if crop_rgb.dtype != np.uint8 or crop_rgb.ndim != 3 or crop_rgb.shape[2] != 3 or crop_rgb.shape[0] < 32:
        raise ValueError(f"expected an RGB uint8 HxWx3 crop of at least 32 px, got {crop_rgb.dtype} {crop_rgb.shape}")
    if crop_rgb.shape[0] != crop_rgb.shape[1]:
        raise ValueError(f"expected a square aligned crop, got {crop_rgb.shape[1]}x{crop_rgb.shape[0]}")
    if landmarks.shape != (5, 2) or not np.isfinite(landmarks).all():
        raise ValueError(f"expected 5 finite (x, y) landmarks, got an array of shape {landmarks.shape}")
    if embedding_norm is not None and not math.isfinite(embedding_norm):
        raise ValueError(f"embedding_norm must be finite, got {embedding_norm}")
    grey = face_region(crop_rgb)
    inter_ocular, yaw, roll = pose(landmarks)
    return QualityScore(
        blur=float(cv2.Laplacian(grey, cv2.CV_64F).var()),
        inter_ocular=inter_ocular,
        yaw=yaw,
        roll=roll,
        brightness=float(grey.mean()),
        contrast=float(grey.std()),
        clipped=float(np.mean((grey <= CLIP_LOW) | (grey >= CLIP_HIGH))),
        embedding_norm=None if embedding_norm is None else float(embedding_norm),
    )


def score_aligned(folder: str | Path) -> dict[str, QualityScore]:
    """Quality of every face `align_tree` wrote into folder (its crop and manifest landmarks), by source photo."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no alignment manifest (run `faceforge data align` first)")
    scores: dict[str, QualityScore] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["status"] != "aligned":
            continue
        if record["source"] in scores:
            raise ValueError(f"{path}: {record['source']} has several faces; align one face per photo to score it")
        crop = read_image(Path(folder) / record["output"])
        scores[record["source"]] = score_face(crop, np.array(record["landmarks"]))
    return scores


def error_versus_reject(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    similarities: np.ndarray,
    same: np.ndarray,
    fmr: float = 1e-3,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> list[tuple[float, float]]:
    """(fraction, FNMR) points of the error-versus-reject curve (Grother and Tabassi, 2007).

    The threshold is set once, at `fmr` over all impostor pairs (a pair matches when similarity >= threshold).
    A pair's quality is the lower of its two faces' scores; for each fraction, that share of the genuine pairs,
    worst quality first, is discarded and the FNMR of the rest reported. A good quality score makes the curve
    fall. Pairs tied in quality at the cut are discarded at random, in expectation (their misses count pro rata),
    so a score with many ties is not flattered by the pairs' order.
    """
    scores_a, scores_b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    similarities, same = np.asarray(similarities, dtype=np.float64), np.asarray(same)
    if not scores_a.ndim == 1 or not scores_a.shape == scores_b.shape == similarities.shape == same.shape:
        raise ValueError(
            f"scores_a {scores_a.shape}, scores_b {scores_b.shape}, similarities {similarities.shape} and "
            f"same {same.shape} must be 1-D of equal length"
        )
    if same.dtype != bool:
        raise ValueError(f"same must be boolean, got {same.dtype}")
    if not np.isfinite(similarities).all() or np.isnan(scores_a).any() or np.isnan(scores_b).any():
        raise ValueError("similarities must be finite and quality scores not NaN")
    if not all(0 <= fraction < 1 for fraction in fractions):
        raise ValueError(f"reject fractions must be in [0, 1), got {list(fractions)}")
    threshold = calibrate_threshold(similarities[same], similarities[~same], fmr).threshold
    order = np.argsort(np.minimum(scores_a, scores_b)[same], kind="stable")
    quality = np.minimum(scores_a, scores_b)[same][order]
    missed = (similarities[same] < threshold)[order]
    curve = []
    for fraction in fractions:
        dropped = math.floor(fraction * len(quality) + 1e-9)
        tie_start = np.searchsorted(quality, quality[dropped], side="left")
        tie_end = np.searchsorted(quality, quality[dropped], side="right")
        misses = missed[tie_end:].sum() + (tie_end - dropped) * missed[tie_start:tie_end].mean()
        curve.append((float(fraction), float(misses / (len(quality) - dropped))))
    return curve


def save_erc_plot(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str) -> Path:
    """Write error-versus-reject curves, one line per quality measure, as a PNG."""
    fig = Figure(figsize=(5.5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot(*zip(*curve, strict=True), marker=".", label=name)
    ax.set_xlabel("fraction of genuine pairs rejected (lowest quality first)")
    ax.set_ylabel("FNMR at the fixed threshold")
    ax.set_ylim(bottom=0.0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return write_png(fig, path)


def quality_eval(
    pairs_txt: str | Path,
    root: str | Path,
    aligned: str | Path,
    features_npz: str | Path,
    fmr: float = 1e-3,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, list[tuple[float, float]]]:
    """Error-versus-reject curves of the score and of each factor on a pairs protocol, keyed by measure.

    Photos under `root` are matched by content to the pairs (LFW holds byte-identical files), to their crops in
    `aligned` (`align_tree` of root; a photo with no face there has quality 0) and to features in `features_npz`
    (arrays `names`, `files`, `feats`, one row per root/<name>/<file>, like lfw_dlib128_features.npz).
    """
    root = Path(root)
    vset = load_pairs(pairs_txt, root)
    position = {image: i for i, image in enumerate(vset.images)}
    quality: dict[str, np.ndarray] = {}
    for source, face in score_aligned(aligned).items():
        if (i := position.get((root / source).read_bytes())) is not None:
            for name, value in {"score": face.score, **face.factors()}.items():
                quality.setdefault(name, np.zeros(len(vset.images)))[i] = value
    if not quality:
        raise ValueError(f"{aligned}: none of its crops comes from a photo the pairs use")
    data = np.load(features_npz)
    features = np.full((len(vset.images), data["feats"].shape[1]), np.nan)
    for name, file, feature in zip(data["names"], data["files"], data["feats"], strict=True):
        if (root / name / file).is_file() and (i := position.get((root / name / file).read_bytes())) is not None:
            features[i] = feature / np.linalg.norm(feature)
    if np.isnan(features).any():
        missing = int(np.isnan(features).any(axis=1).sum())
        raise ValueError(f"{features_npz}: no features for {missing} of the {len(features)} images the pairs use")
    similarities = np.einsum("ij,ij->i", features[vset.left], features[vset.right])
    return {
        name: error_versus_reject(row[vset.left], row[vset.right], similarities, vset.issame, fmr, fractions)
        for name, row in quality.items()
    }
