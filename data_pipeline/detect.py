"""Pluggable face detectors: anything with a `name` and `detect(images) -> list[Detections]`, looked up by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
from torch import Tensor

from faceforge.data_pipeline.mtcnn import (
    MTCNN,
    Detections,
    ONet,
    check_image,
    load_mtcnn_nets,
    onet_stage,
    split_by_image,
    square_crops,
    summed_area_table,
)


class Detector(Protocol):
    name: str

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Faces in each RGB uint8 HxWx3 image, best score first."""
        ...


def onet_in_boxes(onet: ONet, image: np.ndarray, boxes: Tensor) -> Detections:
    """O-Net on boxes found some other way: its face probability as the score, its landmarks; the boxes kept.

    A box under a pixel (a 1 px photo's central box) has no crop for O-Net to look at, so it is no face.
    """
    crops, usable = square_crops(boxes)
    if not usable.any():
        return Detections.empty()
    boxes, crops = boxes[usable], crops[usable]
    image_index = torch.zeros(len(boxes), dtype=torch.long, device=boxes.device)
    table = summed_area_table([image], boxes.device)
    scores, _, landmarks = onet_stage(onet, table, image_index, crops)
    return split_by_image(1, image_index, boxes, scores, landmarks)[0]


class HaarDetector:
    """OpenCV's frontal-face Haar cascade for boxes, MTCNN's O-Net on those boxes for scores and landmarks.

    The fallback detector: it ships inside opencv-python-headless and fails differently from MTCNN. Boxes are the
    cascade's own; scores are O-Net's face probability, and boxes below `min_score` (the cascade's false alarms,
    which would otherwise be aligned as faces) are dropped.
    """

    name = "haar"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: int = 20,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_score: float = 0.5,
    ) -> None:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise FileNotFoundError(f"{path}: OpenCV's frontal-face cascade is missing or unreadable")
        if min_face_size < 1 or scale_factor <= 1.0 or min_neighbors < 0 or not 0.0 <= min_score < 1.0:
            raise ValueError(
                f"need min_face_size >= 1, scale_factor > 1, min_neighbors >= 0, 0 <= min_score < 1; "
                f"got {min_face_size}, {scale_factor}, {min_neighbors}, {min_score}"
            )
        self.device = torch.device(device)
        self.min_face_size, self.scale_factor, self.min_neighbors = min_face_size, scale_factor, min_neighbors
        self.min_score = min_score
        self.onet = load_mtcnn_nets(self.device)[2]

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        found = []
        for i, image in enumerate(images):
            grey = cv2.cvtColor(check_image(image, f"image {i}"), cv2.COLOR_RGB2GRAY)
            side = (self.min_face_size, self.min_face_size)
            rects = self.cascade.detectMultiScale(grey, self.scale_factor, self.min_neighbors, minSize=side)
            boxes = torch.as_tensor(np.asarray(rects, dtype=np.float32).reshape(-1, 4), device=self.device)
            boxes[:, 2:] += boxes[:, :2]
            faces = onet_in_boxes(self.onet, image, boxes)
            face = faces.scores >= self.min_score
            found.append(Detections(faces.boxes[face], faces.scores[face], faces.landmarks[face]))
        return found


class CenterDetector:
    """One face assumed in the middle of the photo, as in pre-cropped sets (LFW, ORL): O-Net's landmarks inside
    the central square box of `fraction` of the shorter side.

    The last resort for evaluation sets, where every image needs a crop; its score says how face-like the box is.
    """

    name = "center"

    def __init__(self, device: str | torch.device = "cpu", fraction: float = 0.45) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.device, self.fraction = torch.device(device), fraction
        self.onet = load_mtcnn_nets(self.device)[2]

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        found = []
        for i, image in enumerate(images):
            height, width = check_image(image, f"image {i}").shape[:2]
            side = self.fraction * min(height, width)
            box = [(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2]
            found.append(onet_in_boxes(self.onet, image, torch.tensor([box], device=self.device)))
        return found


# The registry: add an entry to plug in another detector.
DETECTORS: dict[str, Callable[..., Detector]] = {"mtcnn": MTCNN, "haar": HaarDetector, "center": CenterDetector}


def get_detector(name: str, **options: object) -> Detector:
    """A detector by registry name; options go to its constructor (device, min_face_size, ...)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**options)
