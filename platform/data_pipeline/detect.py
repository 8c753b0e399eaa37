"""Pluggable face detectors: anything with a `name` and `detect(images) -> list[Detections]`, looked up by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from faceforge.data_pipeline.mtcnn import (
    MTCNN,
    Detections,
    check_image,
    images_to_batch,
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


class HaarDetector:
    """OpenCV's frontal-face Haar cascade for boxes, MTCNN's O-Net on those boxes for scores and landmarks.

    The fallback detector: it ships inside opencv-python-headless and fails differently from MTCNN. Boxes are the
    cascade's own; scores are O-Net's face probability, so a caller can drop the cascade's false alarms.
    """

    name = "haar"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: int = 20,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
    ) -> None:
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise FileNotFoundError(f"{path}: OpenCV's frontal-face cascade is missing or unreadable")
        if min_face_size < 1 or scale_factor <= 1.0 or min_neighbors < 0:
            raise ValueError(
                f"need min_face_size >= 1, scale_factor > 1, min_neighbors >= 0; "
                f"got {min_face_size}, {scale_factor}, {min_neighbors}"
            )
        self.device = torch.device(device)
        self.min_face_size, self.scale_factor, self.min_neighbors = min_face_size, scale_factor, min_neighbors
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
            crops, _ = square_crops(boxes)  # cascade boxes are square already; this makes them integer
            image_index = torch.zeros(len(boxes), dtype=torch.long, device=self.device)
            table = summed_area_table(images_to_batch([image], self.device))
            scores, _, landmarks = onet_stage(self.onet, table, image_index, crops)
            found += split_by_image(1, image_index, boxes, scores, landmarks)
        return found


# The registry: add an entry to plug in another detector.
DETECTORS: dict[str, Callable[..., Detector]] = {"mtcnn": MTCNN, "haar": HaarDetector}


def get_detector(name: str, **options: object) -> Detector:
    """A detector by registry name; options go to its constructor (device, min_face_size, ...)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**options)
