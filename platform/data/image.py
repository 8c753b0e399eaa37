"""Decoding and the deterministic crop/normalise step shared by training, evaluation and export."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

# Decoding refuses images whose pixel count could exhaust memory (decompression bombs).
MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """An input file is not a decodable image."""


def decode_image(data: bytes | bytearray | memoryview, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded bytes to an RGB uint8 HxWx3 array; greyscale is replicated to three channels."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        raise ImageDecodeError(f"{source}: empty file")
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageDecodeError(f"{source}: not a decodable image (corrupt, truncated or unsupported)")
    if img.shape[0] * img.shape[1] > MAX_PIXELS:
        raise ImageDecodeError(f"{source}: {img.shape[1]}x{img.shape[0]} exceeds the {MAX_PIXELS} pixel limit")
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """Read and decode an image file to RGB uint8."""
    return decode_image(Path(path).read_bytes(), str(path))


def center_crop_resize(img: np.ndarray, input_size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """Keep the central square `crop_fraction` of the shorter side, then resize to input_size.

    Pre-cropped face sets (LFW's 250x250, ORL) centre the face; this is the stand-in for alignment.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    h, w = img.shape[:2]
    side = max(1, round(min(h, w) * crop_fraction))
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[top : top + side, left : left + side]
    if side == input_size:
        return np.ascontiguousarray(crop)
    interp = cv2.INTER_AREA if side > input_size else cv2.INTER_LINEAR
    return cv2.resize(crop, (input_size, input_size), interpolation=interp)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """RGB uint8 HxWx3 -> float32 3xHxW in [-1, 1], the input convention of every backbone."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)
