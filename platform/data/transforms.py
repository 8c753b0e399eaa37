"""Training augmentation and the evaluation transform, both `(rgb_uint8, rng) -> 3xHxW tensor`.

All randomness comes from the generator passed in, so an `(index, aug_seed)` item from the batch
samplers gives the same tensor whatever the worker count or resume point.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from faceforge.data.image import center_crop_resize, to_tensor

# Upsampling back from a low resolution with a random kernel mimics the varied ways small faces
# reach a recogniser (camera scaler, browser, video decoder).
UPSAMPLE_INTERPOLATIONS = (cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def item_rng(item: int | tuple[int, int]) -> tuple[int, np.random.Generator]:
    """A plain index gets fresh randomness; `(index, aug_seed)` gets a reproducible generator."""
    if isinstance(item, tuple):
        index, aug_seed = item
        return int(index), np.random.default_rng(int(aug_seed))
    return int(item), np.random.default_rng()


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def colour_jitter(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast (around mean luminance) and saturation, each scaled by 1 ± strength."""
    brightness, contrast, saturation = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    x = img.astype(np.float32) * brightness
    mean_luma = float((x @ LUMA).mean())
    x = (x - mean_luma) * contrast + mean_luma
    luma = (x @ LUMA)[:, :, None]
    x = luma + (x - luma) * saturation
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def low_resolution(img: np.ndarray, min_scale: float, rng: np.random.Generator) -> np.ndarray:
    """Downscale by a random factor in [min_scale, 1) and back up with a random interpolation."""
    h, w = img.shape[:2]
    scale = rng.uniform(min_scale, 1.0)
    small_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(img, small_size, interpolation=cv2.INTER_AREA)
    interpolation = UPSAMPLE_INTERPOLATIONS[rng.integers(len(UPSAMPLE_INTERPOLATIONS))]
    return cv2.resize(small, (w, h), interpolation=interpolation)


def similarity_jitter(
    img: np.ndarray, shift: float, scale: float, rotate: float, rng: np.random.Generator
) -> np.ndarray:
    """A random similarity about the centre: shift up to `shift` of the side, scale by 1 ± `scale`, rotate up to
    ± `rotate` degrees. Aligned crops put every eye on the same pixels; this spreads them as a detector's
    landmark error does, so a model trained on few photos does not learn the template by heart."""
    h, w = img.shape[:2]
    dx, dy = rng.uniform(-shift, shift, size=2) * (w, h)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-rotate, rotate), rng.uniform(1 - scale, 1 + scale))
    matrix[:, 2] += (dx, dy)
    return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class TrainTransform:
    """Crop/resize, flip, similarity jitter, low-resolution simulation, colour jitter, random greyscale, normalise."""

    def __init__(
        self,
        input_size: int,
        crop_fraction: float = 1.0,
        flip: bool = True,
        lowres_prob: float = 0.2,
        lowres_min: float = 0.25,
        jitter: float = 0.2,
        grey_prob: float = 0.0,
        shift: float = 0.0,
        scale: float = 0.0,
        rotate: float = 0.0,
    ) -> None:
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        _check_probability("lowres_prob", lowres_prob)
        _check_probability("grey_prob", grey_prob)
        if not 0.0 < lowres_min <= 1.0:
            raise ValueError(f"lowres_min must be in (0, 1], got {lowres_min}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if not (0.0 <= shift < 0.5 and 0.0 <= scale < 1.0 and 0.0 <= rotate <= 180.0):
            raise ValueError(
                f"need 0 <= shift < 0.5, 0 <= scale < 1, 0 <= rotate <= 180, got {shift}, {scale}, {rotate}"
            )
        self.input_size = input_size
        self.crop_fraction = crop_fraction
        self.flip = flip
        self.lowres_prob = lowres_prob
        self.lowres_min = lowres_min
        self.jitter = jitter
        self.grey_prob = grey_prob
        self.shift = shift
        self.scale = scale
        self.rotate = rotate

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        img = center_crop_resize(img, self.input_size, self.crop_fraction)
        if self.flip and rng.random() < 0.5:
            img = np.ascontiguousarray(img[:, ::-1])
        if self.shift or self.scale or self.rotate:
            img = similarity_jitter(img, self.shift, self.scale, self.rotate, rng)
        if rng.random() < self.lowres_prob:
            img = low_resolution(img, self.lowres_min, rng)
        if self.jitter > 0:
            img = colour_jitter(img, self.jitter, rng)
        if rng.random() < self.grey_prob:
            img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return to_tensor(img)


class EvalTransform:
    """The deterministic crop/resize/normalise used for evaluation and export."""

    def __init__(self, input_size: int, crop_fraction: float = 1.0) -> None:
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.input_size = input_size
        self.crop_fraction = crop_fraction

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        return to_tensor(center_crop_resize(img, self.input_size, self.crop_fraction))
