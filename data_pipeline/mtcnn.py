"""MTCNN (Zhang et al., 2016) as our own torch modules over the weights shipped in the facenet-pytorch wheel.

The stages follow the reference implementation: P-Net proposals over an image pyramid, then R-Net and O-Net
rescoring of square crops, O-Net adding five landmarks. Each stage handles the whole batch at once: P-Net over
each pyramid level, then R-Net and O-Net over the candidate boxes of all images together.

Memory is bounded for phone photos: the only full-size structure is a 4-byte summed-area table of the photos,
pyramid levels are read from it strip by strip as P-Net needs them, the nets see at most NET_PIXELS input pixels
a call, and a call's photos go through the cascade in batches of at most BATCH_PIXELS.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_DISTRIBUTION = "facenet-pytorch==2.5.3"
# Same-size photos share a batch up to this many pixels: batching pays for small photos, whose ops are too small to
# keep the cores busy, and would only multiply the memory of large ones.
BATCH_PIXELS = 2**22
# Input pixels of one net call: P-Net reads a pyramid level in strips this large (all photos of the batch together),
# R-Net and O-Net take their crops this many pixels at a time. Their first layers hold 100-250 bytes an input pixel:
# 0.4 GB over the 2400 x 1800 first level of a 12 Mpx photo, as much for the thousands of crops it can propose.
NET_PIXELS = 2**18


def weights_dir() -> Path:
    """The wheel's `facenet_pytorch/data` folder, found without importing the package (it imports torchvision)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MTCNN weights not installed: pip install --no-deps {WEIGHTS_DISTRIBUTION}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _normalise(pixels: Tensor) -> Tensor:
    """The input scaling the weights were trained with."""
    return (pixels - 127.5) * 0.0078125


class PNet(nn.Module):
    """Proposal net, fully convolutional: face probability and box offsets of every 12x12 window at stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_1(x).softmax(1)[:, 1], self.conv4_2(x)


def _flatten_caffe(x: Tensor) -> Tensor:
    """The weights come from Caffe models trained on MATLAB's column-major images: flatten as (W, H, C)."""
    return x.permute(0, 3, 2, 1).flatten(1)


class RNet(nn.Module):
    """Refinement net on 24x24 crops: face probability and box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_flatten_caffe(self.prelu3(self.conv3(x)))))
        return self.dense5_1(x).softmax(1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net on 48x48 crops: face probability, box offsets and landmarks (x1..x5, y1..y5 in crop units)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_flatten_caffe(self.prelu4(self.conv4(x)))))
        return self.dense6_1(x).softmax(1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def load_mtcnn_nets(device: str | torch.device = "cpu") -> tuple[PNet, RNet, ONet]:
    """The three nets with the shipped state_dicts loaded strictly, in eval mode, frozen."""
    folder = weights_dir()
    nets = (PNet(), RNet(), ONet())
    for net, name in zip(nets, ("pnet", "rnet", "onet"), strict=True):
        net.load_state_dict(torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True), strict=True)
        net.to(device).eval().requires_grad_(False)
    return nets


@dataclass(frozen=True)
class Detections:
    """The faces found in one image, best score first, in that image's pixel coordinates.

    boxes (K, 4) are x1, y1, x2, y2; scores (K,); landmarks (K, 5, 2) are the (x, y) of the left eye, right eye,
    nose tip, left and right mouth corners, left and right as seen in the image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


def check_image(image: object, where: str) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{where}: expected an RGB uint8 HxWx3 array, got {got}")
    return image


def nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, threshold: float, mode: str = "union", block: int = 256
) -> Tensor:
    """Greedy non-maximum suppression within each group (image); the kept indices, best score first.

    Overlap is IoU ("union") or intersection over the smaller box ("min"). The overlaps of `block` boxes with
    every later box are computed at once; the greedy scan over them is then one boolean OR per kept box, and
    memory stays block x N. Boxes are compared as they are (P-Net's grid makes IoUs of exactly 0.5), so an
    image's result never depends on the others in its batch.
    """
    order = scores.argsort(descending=True, stable=True)
    boxes, groups = boxes[order], groups[order]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for start in range(0, len(boxes), block):
        rows, later = boxes[start : start + block, None], boxes[None, start:]
        sides = (torch.minimum(rows[..., 2:], later[..., 2:]) - torch.maximum(rows[..., :2], later[..., :2])).clamp(0)
        inter = sides[..., 0] * sides[..., 1]
        row_area, later_area = area[start : start + block, None], area[None, start:]
        base = torch.minimum(row_area, later_area) if mode == "min" else row_area + later_area - inter
        same_image = groups[start : start + block, None] == groups[None, start:]
        overlapping = ((inter > threshold * base) & same_image).cpu().numpy()
        for i in range(len(overlapping)):
            if not suppressed[start + i]:
                keep.append(start + i)
                suppressed[start:] |= overlapping[i]
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def regress(boxes: Tensor, offsets: Tensor) -> Tensor:
    """Apply the nets' box offsets (fractions of the box's width and height) to each corner."""
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * size


def square_crops(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Integer square boxes around the same centres (the nets' input is square); and which are at least 1 px."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True).round()
    corner = (centre - side / 2).round()
    return torch.cat([corner, corner + side], 1).long(), side[:, 0] >= 1


def summed_area_table(images: Sequence[np.ndarray], device: torch.device) -> Tensor:
    """B x (H+1) x (W+1) x C prefix sums of same-size RGB uint8 images, modulo 2**32 (int32 bits), on device.

    Four bytes a value and built in place: float32 would lose whole grey levels over a large photo, float64 takes
    twice the memory. The sums wrap, but `area_means` takes each rectangle's sum modulo 2**32 as well, which is
    exact for any rectangle under 2**32 / 255 = 16.8 M pixels, far more than one output pixel of a crop or a
    pyramid level covers.
    """
    height, width, channels = images[0].shape
    table = np.zeros((len(images), height + 1, width + 1, channels), np.uint32)
    for sums, image in zip(table, images, strict=True):
        sums[1:, 1:] = image
    np.cumsum(table, axis=1, out=table)  # in place, same dtype: no temporary copy
    np.cumsum(table, axis=2, out=table)
    return torch.from_numpy(table.view(np.int32)).to(device)


def bin_edges(
    start: Tensor, length: Tensor, size: int, first: int = 0, stop: int | None = None
) -> tuple[Tensor, Tensor]:
    """Source rows (or columns) [lo, hi) of output pixels first..stop-1 when `length` pixels from `start` (one per
    row of K) are resized to `size`: floor(i length / size) to ceil((i + 1) length / size), as F.interpolate(mode=
    "area") bins them. K x (stop - first) each."""
    steps = torch.arange(first, (size if stop is None else stop) + 1, device=start.device)
    lo = start[:, None] + steps[None, :-1] * length[:, None] // size
    hi = start[:, None] - (-steps[None, 1:] * length[:, None] // size)
    return lo, hi


def area_means(table: Tensor, image_index: Tensor, rows: tuple[Tensor, Tensor], cols: tuple[Tensor, Tensor]) -> Tensor:
    """K x C x h x w float32 means of the source rectangles rows[0] <= y < rows[1], cols[0] <= x < cols[1] (K x h and
    K x w edges) of images image_index (K), pixels outside the image counting as zero: four look-ups a pixel."""
    height, width, channels = table.shape[1] - 1, table.shape[2] - 1, table.shape[3]
    (y_lo, y_hi), (x_lo, x_hi) = rows, cols
    flat, first_row = table.view(-1, channels), (image_index * (height + 1))[:, None, None]

    def corner(ys: Tensor, xs: Tensor) -> Tensor:
        ys, xs = ys.clamp(0, height), xs.clamp(0, width)
        return flat[((first_row + ys[:, :, None]) * (width + 1) + xs[:, None, :]).flatten()].long()

    sums = corner(y_hi, x_hi)
    sums -= corner(y_lo, x_hi)
    sums -= corner(y_hi, x_lo)
    sums += corner(y_lo, x_lo)
    sums &= 0xFFFFFFFF  # the rectangle's sum modulo 2**32: the true sum, as it is smaller
    area = ((y_hi - y_lo)[:, :, None] * (x_hi - x_lo)[:, None, :]).flatten()[:, None]
    means = (sums.double() / area).float()
    return means.view(len(image_index), y_lo.shape[1], x_lo.shape[1], channels).permute(0, 3, 1, 2)


def area_crops(table: Tensor, image_index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Resize integer boxes (x1, y1, x2, y2; zero outside the image) to size x size, every box in one op, as
    F.interpolate(mode="area") resizes a single crop."""
    rows = bin_edges(boxes[:, 1], boxes[:, 3] - boxes[:, 1], size)
    return area_means(table, image_index, rows, bin_edges(boxes[:, 0], boxes[:, 2] - boxes[:, 0], size))


def pnet_strips(
    pnet: PNet, table: Tensor, size: tuple[int, int], strip_pixels: int = NET_PIXELS
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """P-Net over every image of the table area-resized to size (height, width), in strips of rows of about
    strip_pixels: each strip's first output row, its face probabilities (B x S x W') and offsets (B x 4 x S x W').

    Output row r sees input rows 2r to 2r + 11, so strips of 2S + 10 rows from an even row give exactly those
    rows of the whole level's maps; the last strip runs to the level's end, where ceil_mode pooling adds its row.
    """
    count, height, width = table.shape[0], table.shape[1] - 1, table.shape[2] - 1
    level_height, level_width = size
    out_rows = (level_height - 1) // 2 - 4  # conv 3, max-pool 2 (ceil), conv 3, conv 3
    step = max(1, (strip_pixels // (count * level_width) - 10) // 2)
    image_index = torch.arange(count, device=table.device)
    zeros = torch.zeros(count, dtype=torch.long, device=table.device)
    cols = bin_edges(zeros, torch.full_like(zeros, width), level_width)
    for first in range(0, out_rows, step):
        stop = level_height if first + step >= out_rows else 2 * (first + step) + 10
        rows = bin_edges(zeros, torch.full_like(zeros, height), level_height, 2 * first, stop)
        probs, offsets = pnet(_normalise(area_means(table, image_index, rows, cols)))
        yield first, probs, offsets


def on_crops(net: RNet | ONet, table: Tensor, image_index: Tensor, crops: Tensor, size: int) -> tuple[Tensor, ...]:
    """The net's outputs for integer square crops resized to size x size, NET_PIXELS of input at a time."""
    step = max(1, NET_PIXELS // size**2)
    parts = [
        net(_normalise(area_crops(table, image_index[i : i + step], crops[i : i + step], size)))
        for i in range(0, max(len(crops), 1), step)  # one call when there is no crop: empty outputs
    ]
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))


def onet_stage(onet: ONet, table: Tensor, image_index: Tensor, crops: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """O-Net on integer square crops: face probabilities, regressed boxes and landmarks (K x 5 x 2)."""
    probs, offsets, points = on_crops(onet, table, image_index, crops, 48)
    crops = crops.float()
    side = (crops[:, 2] - crops[:, 0])[:, None, None]
    # Landmarks were trained as 1-based positions inside the crop; -1 makes them 0-based pixel indices.
    landmarks = crops[:, None, :2] + points.view(len(points), 2, 5).transpose(1, 2) * side - 1
    return probs, regress(crops, offsets), landmarks


def split_by_image(
    count: int, image_index: Tensor, boxes: Tensor, scores: Tensor, landmarks: Tensor
) -> list[Detections]:
    """Per-image Detections, best score first."""
    found = []
    for i in range(count):
        mine = (image_index == i).nonzero()[:, 0]
        mine = mine[scores[mine].argsort(descending=True, stable=True)]
        found.append(
            Detections(
                boxes=boxes[mine].cpu().numpy().astype(np.float32),
                scores=scores[mine].cpu().numpy().astype(np.float32),
                landmarks=landmarks[mine].cpu().numpy().astype(np.float32),
            )
        )
    return found


class MTCNN:
    """The three-stage cascade; thresholds are the face-probability cut of P-Net, R-Net and O-Net."""

    name = "mtcnn"

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: float = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
    ) -> None:
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, got {min_face_size}")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be three probabilities (P-Net, R-Net, O-Net), got {thresholds}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor (pyramid scale step) must be in (0, 1), got {factor}")
        self.device = torch.device(device)
        self.min_face_size, self.thresholds, self.factor = min_face_size, tuple(thresholds), factor
        self.pnet, self.rnet, self.onet = load_mtcnn_nets(self.device)

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Faces in each RGB uint8 image; images of one size go through the cascade as one batch."""
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(check_image(image, f"image {i}").shape, []).append(i)
        found: dict[int, Detections] = {}
        for shape, indices in by_size.items():
            per_batch = max(1, BATCH_PIXELS // max(1, shape[0] * shape[1]))
            for start in range(0, len(indices), per_batch):
                chunk = indices[start : start + per_batch]
                table = summed_area_table([images[i] for i in chunk], self.device)
                found.update(zip(chunk, self._detect_batch(table), strict=True))
                del table  # before the next chunk's is built
        return [found[i] for i in range(len(images))]

    def _propose(self, table: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 1: P-Net over the pyramid; per level NMS, then across levels; regressed square crops."""
        height, width = table.shape[1] - 1, table.shape[2] - 1
        candidates = []
        scale = 12.0 / self.min_face_size
        while min(height, width) * scale >= 12:
            level = []
            for first, probs, offsets in pnet_strips(
                self.pnet, table, (math.ceil(height * scale), math.ceil(width * scale))
            ):
                image_index, row, col = (probs >= self.thresholds[0]).nonzero(as_tuple=True)
                level.append(
                    (image_index, row + first, col, probs[image_index, row, col], offsets[image_index, :, row, col])
                )
            image_index, row, col, scores, offsets = (torch.cat(parts) for parts in zip(*level, strict=True))
            windows = torch.stack([col, row, col + 6, row + 6], 1) * (2.0 / scale)
            keep = nms(windows, scores, image_index, 0.5)
            candidates.append((image_index[keep], windows[keep], scores[keep], offsets[keep]))
            scale *= self.factor
        if not candidates:  # the image is smaller than one 12 px window at min_face_size
            none = table.new_zeros((0, 4), dtype=torch.long)
            return none[:, 0], none
        image_index, windows, scores, offsets = (torch.cat(parts) for parts in zip(*candidates, strict=True))
        keep = nms(windows, scores, image_index, 0.7)
        crops, usable = square_crops(regress(windows[keep], offsets[keep]))
        return image_index[keep][usable], crops[usable]

    def _detect_batch(self, table: Tensor) -> list[Detections]:
        image_index, crops = self._propose(table)
        # Stage 2: R-Net rescoring of 24x24 crops.
        probs, offsets = on_crops(self.rnet, table, image_index, crops, 24)
        passed = probs > self.thresholds[1]
        image_index, boxes, probs = image_index[passed], regress(crops[passed].float(), offsets[passed]), probs[passed]
        keep = nms(boxes, probs, image_index, 0.7)
        crops, usable = square_crops(boxes[keep])
        image_index, crops = image_index[keep][usable], crops[usable]
        # Stage 3: O-Net rescoring, final boxes and landmarks of 48x48 crops.
        probs, boxes, landmarks = onet_stage(self.onet, table, image_index, crops)
        passed = probs > self.thresholds[2]
        image_index, boxes, probs, landmarks = image_index[passed], boxes[passed], probs[passed], landmarks[passed]
        keep = nms(boxes, probs, image_index, 0.7, mode="min")
        return split_by_image(len(table), image_index[keep], boxes[keep], probs[keep], landmarks[keep])
