"""Decoding and the deterministic crop/normalise step shared by training, evaluation and export."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import cv2
import numpy as np
import torch

# Decoding refuses images whose pixel count could exhaust memory (decompression bombs).
MAX_PIXELS = 40_000_000


# A 16-bit image whose brightest level is below this decodes to at most 15 of 255: refused, not trained on.
DIM_16_BIT = 4096


class ImageDecodeError(ValueError):
    """An input file is not a decodable image."""


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); DHT, JPG and DAC share the range.
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
PNM_HEADER = re.compile(rb"P[1-6](?:\s|#[^\r\n]*)+(\d+)(?:\s|#[^\r\n]*)+(\d+)")
PNM_MAXVAL = re.compile(rb"P[2356](?:(?:\s|#[^\r\n]*)+\d+){2}(?:\s|#[^\r\n]*)+(\d+)")  # greyscale and colour


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 9 <= len(data):
        if data[pos] != 0xFF:  # stray bytes before a marker: libjpeg skips them with a warning, and so do we
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        marker = data[pos + 1]
        if marker == 0x00:  # a stuffed FF is no marker: libjpeg scans on for one, never reading a length here
            pos += 2
            continue
        if marker in JPEG_SOF_MARKERS:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        if marker == 0xFF:  # fill byte
            pos += 1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = struct.unpack_from("<I", data, 21)[0]
        return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG, PNG, BMP, WebP or PNM header, without decoding; None for anything else.

    Checking this first is what stops a decompression bomb: a few KB can declare a gigapixel image, and
    OpenCV allocates and fills the whole canvas before it returns.
    """
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack_from(">II", data, 16)
    if data.startswith(b"BM") and len(data) >= 26:
        if struct.unpack_from("<I", data, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER
            return struct.unpack_from("<HH", data, 18)
        width, height = struct.unpack_from("<ii", data, 18)
        return abs(width), abs(height)  # a negative height means rows stored top-down
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_size(data)
    if match := PNM_HEADER.match(data, 0, 1024):
        return int(match[1]), int(match[2])
    return None


def decode_image(data: bytes | bytearray | memoryview, source: str = "<bytes>") -> np.ndarray:
    """Decode JPEG, PNG, BMP, WebP or PNM bytes (whatever the file name says) to RGB uint8 HxWx3; greyscale is
    replicated to three channels."""
    data = bytes(data)
    if not data:
        raise ImageDecodeError(f"{source}: empty file")
    size = declared_size(data)
    if size is None:
        raise ImageDecodeError(f"{source}: not a decodable image (not a JPEG, PNG, BMP, WebP or PNM header)")
    if size[0] * size[1] > MAX_PIXELS:
        raise ImageDecodeError(f"{source}: {size[0]}x{size[1]} exceeds the {MAX_PIXELS} pixel limit")
    try:
        # IMREAD_COLOR applies the EXIF orientation (phone photos), replicates greyscale and drops alpha.
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    except cv2.error:  # OpenCV's own limits and assertions
        img = None
    if img is None:
        raise ImageDecodeError(f"{source}: not a decodable image (corrupt, truncated or unsupported)")
    if img.dtype == np.uint16:
        img = _to_8_bit(img, data, source)
    elif data[:2] in (b"P5", b"P6") and (match := PNM_MAXVAL.match(data, 0, 1024)) and int(match[1]) < 255:
        img = _stretch(img, int(match[1]))  # OpenCV stretches a text PNM's levels to 0..255, not a binary one's
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _stretch(img: np.ndarray, maxval: int) -> np.ndarray:
    return np.round(img * (255.0 / max(maxval, 1))).clip(0, 255).astype(np.uint8)


def _to_8_bit(img: np.ndarray, data: bytes, source: str) -> np.ndarray:
    """Scale by the file's full scale, never by the image's own maximum, so every image keeps its brightness.

    PNM states its full scale (maxval); a 16-bit PNG's is 65535, where 8- or 12-bit levels stored in 16 bits would
    come out all but black: such an image is refused rather than trained on.
    """
    if match := PNM_MAXVAL.match(data, 0, 1024):
        return _stretch(img, int(match[1]))
    brightest = int(img.max())
    if brightest < DIM_16_BIT:
        raise ImageDecodeError(
            f"{source}: a 16-bit image whose brightest level is {brightest} of 65535 would be black at 8 bits "
            "(8- or 12-bit data in a 16-bit file?); convert it to 8 bits first"
        )
    return (img >> 8).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read and decode an image file to RGB uint8; a file that cannot be read is as unusable as a corrupt one."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageDecodeError(f"{path}: cannot be read ({err.strerror or err})") from None
    return decode_image(data, str(path))


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
