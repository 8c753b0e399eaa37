"""Static int8 quantisation (onnxruntime QDQ, per-channel weights) calibrated on real aligned faces."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from faceforge.data import EvalTransform, open_dataset, read_image
from faceforge.data.folder import list_images
from faceforge.eval.sources import recorded_settings
from faceforge.export.onnx_export import INPUT_NAME
from faceforge.export.runtime import embedding_agreement

CALIBRATION_COUNT = 256
CALIBRATION_BATCH = 16
FEW_CALIBRATION_FACES = 32  # below this, ranges taken from a few faces clip the activations of others
FIDELITY_COUNT = 128
FIDELITY_BARS = {"mean_cosine": 0.99, "p1_cosine": 0.97}  # what int8 must keep of fp32's embeddings
# How each activation's int8 range is taken from the calibration faces: all of it (minmax), or all but its
# 0.001% largest magnitudes (percentile). A briefly trained model has a few activations at ~100x their spread, on
# which MinMax spends the 8 bits: percentile kept mean cosine 0.91 where MinMax kept 0.76, and matched or beat it on
# trained models (docs/benchmarks.md, export). Not offered: 99.99 and 99.9 (they cost trained models' 1st
# percentile); onnxruntime's Entropy, whose 128 bins (quantize_static cannot change them) leave MinMax's range as
# its only candidate when collected at once, and candidates that depend on the batches' order when collected batch
# by batch; its Distribution, which is for float8 (0.10 mean cosine on the briefly trained model).
CALIBRATION_METHODS = {
    "minmax": (CalibrationMethod.MinMax, {}),
    "percentile": (CalibrationMethod.Percentile, {"CalibPercentile": 99.999}),
}
DEFAULT_CALIBRATION = "percentile"


class CalibrationImages(Protocol):
    """What the reader draws from: a training dataset (folder tree, RecordIO) or an ImageList."""

    def __len__(self) -> int: ...

    def read_image(self, index: int) -> np.ndarray: ...


class ImageList:
    """Loose image files: a flat folder, or a text file naming one image per line (relative to that file)."""

    def __init__(self, paths: list[Path]) -> None:
        if not paths:
            raise ValueError("the calibration image list is empty")
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def read_image(self, index: int) -> np.ndarray:
        return read_image(self.paths[index])


def open_calibration_images(source: str | Path) -> CalibrationImages:
    """A training-set directory (identity folders or train.rec), a flat folder of images, or a .txt list."""
    path = Path(source)
    if path.is_file():
        try:
            lines = [line.strip() for line in path.read_text().splitlines()]
        except UnicodeDecodeError:  # an image or a train.rec given as the set itself
            raise ValueError(f"calibration set {path} is not a folder or a .txt list of images") from None
        return ImageList([path.parent / line for line in lines if line and not line.startswith("#")])
    if not path.is_dir():
        raise FileNotFoundError(f"calibration set {path} not found (expected a folder or a .txt list of images)")
    loose = list_images(path)
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()) or (path / "train.rec").is_file():
        if loose:  # a dataset would read only its identity folders and silently leave these out
            raise ValueError(
                f"calibration set {path} holds both images ({len(loose)}) and folders: give one kind or a .txt list"
            )
        return open_dataset(path)
    return ImageList(loose)


def training_data_of(source: str, tracking_uri: str | None = None) -> tuple[Path, float]:
    """The training set and crop fraction a checkpoint or MLflow model recorded: the default calibration set."""
    settings = recorded_settings(source, tracking_uri)
    root, crop = settings.get("data.root"), settings.get("data.crop_fraction")
    if not root:
        raise ValueError(f"{source} does not record its training data; give the calibration set and crop")
    return Path(root), float(crop or 1.0)


class FaceCalibrationReader(CalibrationDataReader):
    """`count` images spread evenly over the set (so over its identities), preprocessed exactly as in evaluation.

    Every batch has one size, the largest divisor of the image count up to `batch_size` (234 images: 18 of 13; a
    prime count above it: one image at a time). onnxruntime's histogram calibrators stack a tensor's batches into
    one array and failed on a short last batch, and its strided collection (one batch at a time, quantize_int8)
    needs a count the stride divides. Nothing is dropped or repeated, so every image weighs the same.
    """

    def __init__(
        self,
        images: CalibrationImages,
        *,
        input_size: int,
        crop_fraction: float,
        count: int = CALIBRATION_COUNT,
        batch_size: int = CALIBRATION_BATCH,
    ) -> None:
        if count < 1:
            raise ValueError(f"calibration count must be >= 1, got {count}")
        self.images = images
        self.transform = EvalTransform(input_size, crop_fraction)
        self.indices = spread_indices(len(images), count)
        total = len(self.indices)
        self.batch_size = max(size for size in range(1, min(batch_size, total) + 1) if total % size == 0)
        self.batches = np.split(self.indices, total // self.batch_size)
        self.set_range(0, total)

    def __len__(self) -> int:
        return len(self.indices)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Read images [start_index, end_index) next, in whole batches; onnxruntime's strided calibration calls it."""
        self.position, self.end = start_index // self.batch_size, -(-end_index // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        batch = self.batches[self.position]
        self.position += 1
        tensors = [self.transform(self.images.read_image(int(i))) for i in batch]
        return {INPUT_NAME: torch.stack(tensors).numpy()}


def spread_indices(total: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over `total` (so over a dataset's identities), first and last included."""
    return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))


def int8_fidelity(
    fp32_path: Path, int8_path: Path, reader: FaceCalibrationReader, count: int = FIDELITY_COUNT
) -> dict[str, float]:
    """Cosine between the int8 and fp32 embeddings of up to `count` faces of the calibration set: its mean, 1st
    percentile, the number of faces, and `held_out` 1.0 when calibration did not read them (0.0 when it read the
    whole set). Every export measures it, because int8 can fail a whole architecture (MobileNetV2 kept a mean of
    0.90 after 80 training steps, docs/benchmarks.md)."""
    unseen = np.setdiff1d(np.arange(len(reader.images)), reader.indices)
    pool = unseen if len(unseen) else reader.indices
    faces = [reader.images.read_image(int(i)) for i in pool[spread_indices(len(pool), count)]]
    transform = reader.transform
    agreement = embedding_agreement(
        fp32_path, int8_path, faces, input_size=transform.input_size, crop_fraction=transform.crop_fraction
    )
    return agreement | {"faces": float(len(faces)), "held_out": float(len(unseen) > 0)}


def check_calibration_method(method: str) -> str:
    """`method`, if quantize_int8 knows it: exports check before loading anything."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(CALIBRATION_METHODS)}")
    return method


def quantize_int8(
    fp32_path: str | Path, int8_path: str | Path, reader: FaceCalibrationReader, method: str = DEFAULT_CALIBRATION
) -> Path:
    """Shape inference and graph optimisation first (onnxruntime's advice), then static QDQ quantisation.

    Weights are int8 per output channel: depthwise convolutions need it, their channels' ranges differ by
    orders of magnitude. Activations are uint8 because onnxruntime's x86 kernels fuse only u8 depthwise
    convolutions: with int8 activations those stay float, and the demo MobileFaceNet ran twice as slow.
    reduce_range keeps weights to 7 bits, as onnxruntime advises for u8 x s8 on CPUs without VNNI, whose
    pairwise 16-bit accumulation saturates otherwise (1st-percentile embedding cosine 0.979 -> 0.997 on
    the demo model). `method` is a key of CALIBRATION_METHODS.
    """
    calibrate_method, options = CALIBRATION_METHODS[check_calibration_method(method)]
    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output, inside the export's build folder: a killed export's leftovers go with that folder. So do
    # onnxruntime's own (its augmented model), which it keeps in a temporary folder it makes where tempfile says.
    with tempfile.TemporaryDirectory(prefix="quant-", dir=int8_path.parent) as tmp, temporary_files_in(tmp):
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        # Histogram calibration prints a line per batch collected: hundreds on the export's console.
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared),
                str(int8_path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calibrate_method,
                # Collect one batch at a time, whatever the method (onnxruntime merges ranges and histograms):
                # percentile otherwise keeps every activation of every calibration face at once (6.7 GB peak for a
                # 64 px width-1 MobileFaceNet, against 0.9 GB batch by batch). MinMax ranges come out bit-identical.
                extra_options={**options, "CalibStridedMinMax": reader.batch_size},
            )
    onnx.save(compact_qdq(onnx.load(str(int8_path))), str(int8_path))
    return int8_path


@contextlib.contextmanager
def temporary_files_in(folder: str) -> Iterator[None]:
    """Point tempfile's default folder at `folder` for the block: a library's temporary files go there too."""
    default, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = default


def compact_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in fewer bytes, for flash-limited targets; onnxruntime's outputs stay bit-identical.

    quantize_static stores an all-zero zero point beside every per-channel weight and int32 bias (optional inputs
    of DequantizeLinear: absent means 0), and names of ~40 characters that each tensor repeats in 2-3 places. At
    512-d MobileFaceNet that was 150 KB of a 1.49 MB file. Tensors other than the graph's inputs and outputs get
    short hexadecimal names; node names and the intermediate shape annotations go.
    """
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in initializers:
            continue
        zero_point = initializers.get(node.input[2])
        if zero_point is not None and not numpy_helper.to_array(zero_point).any():
            del node.input[2]
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    interface = {value.name for value in (*graph.input, *graph.output)}
    short_names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in interface:
            return name
        return short_names.setdefault(name, format(len(short_names), "x"))

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
    del graph.value_info[:]
    return model
