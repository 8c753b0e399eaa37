"""Scoring a detector against dlib imglab annotations: recall at an IoU, false positives, 5-point landmark error."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceforge.data_pipeline.mtcnn import Detections


@dataclass(frozen=True)
class AnnotatedImage:
    """One image's true boxes (K x 4, x1 y1 x2 y2) and, when annotated, their 5 points (K x 5 x 2)."""

    file: str
    boxes: np.ndarray
    points: np.ndarray | None


def five_points(parts: dict[int, tuple[float, float]]) -> np.ndarray:
    """The detector's 5 landmarks from iBUG's 68: eye centres as the mean of each eye's contour, nose tip,
    mouth corners; left and right as seen in the image."""
    xy = np.array([parts[i] for i in range(68)], dtype=np.float32)
    return np.stack([xy[36:42].mean(0), xy[42:48].mean(0), xy[30], xy[48], xy[54]])


def read_imglab(xml_path: str | Path) -> list[AnnotatedImage]:
    """The images of a dlib imglab XML (`<image file><box top left width height><part name x y/>`)."""
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"{xml_path}: annotation file not found")
    images = []
    for image in ET.parse(xml_path).getroot().iter("image"):
        boxes, points = [], []
        for box in image.iter("box"):
            left, top, width, height = (float(box.get(key)) for key in ("left", "top", "width", "height"))
            boxes.append([left, top, left + width, top + height])
            parts = {int(part.get("name")): (float(part.get("x")), float(part.get("y"))) for part in box.iter("part")}
            if parts:
                points.append(five_points(parts))
        annotated = np.array(points, dtype=np.float32) if len(points) == len(boxes) and points else None
        images.append(AnnotatedImage(image.get("file"), np.array(boxes, dtype=np.float32).reshape(-1, 4), annotated))
    return images


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """N x M intersection over union of x1 y1 x2 y2 boxes."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(high - low, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).prod(1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@dataclass
class DetectionScore:
    """Totals over a set of images; landmark errors are per matched face, in pixels and over the eye distance."""

    images: int = 0
    faces: int = 0
    matched: int = 0
    false_positives: int = 0
    landmark_px: list[float] = field(default_factory=list)
    landmark_nme: list[float] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.matched / max(self.faces, 1)

    @property
    def false_positives_per_image(self) -> float:
        return self.false_positives / max(self.images, 1)

    def add(self, truth: AnnotatedImage, found: Detections, iou_threshold: float = 0.3) -> None:
        """Match detections, best score first, each to the unmatched true box it overlaps most (IoU >= threshold)."""
        self.images += 1
        self.faces += len(truth.boxes)
        overlap = box_iou(found.boxes, truth.boxes) if len(found) and len(truth.boxes) else np.zeros((len(found), 0))
        free = np.ones(len(truth.boxes), dtype=bool)
        for k in np.argsort(-found.scores):
            candidates = np.where(free & (overlap[k] >= iou_threshold))[0]
            if not len(candidates):
                self.false_positives += 1
                continue
            j = candidates[np.argmax(overlap[k, candidates])]
            free[j] = False
            self.matched += 1
            if truth.points is not None:
                error = np.linalg.norm(found.landmarks[k] - truth.points[j], axis=1).mean()
                self.landmark_px.append(float(error))
                self.landmark_nme.append(float(error / np.linalg.norm(truth.points[j][1] - truth.points[j][0])))
