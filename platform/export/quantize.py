"""Static int8 quantisation (onnxruntime QDQ, per-channel weights) calibrated on real aligned faces."""

from __future__ import annotations

import tempfile
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
FEW_CALIBRATION_FACES = 32  # below this, MinMax ranges from a few faces clip the activations of others
FIDELITY_COUNT = 128
FIDELITY_BARS = {"mean_cosine": 0.99, "p1_cosine": 0.97}  # what int8 must keep of fp32's embeddings


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
    """`count` images spread evenly over the set (so over its identities), preprocessed exactly as in evaluation."""

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
        self.batches = [self.indices[i : i + batch_size] for i in range(0, len(self.indices), batch_size)]
        self.position = 0

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position == len(self.batches):
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


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, reader: FaceCalibrationReader) -> Path:
    """Shape inference and graph optimisation first (onnxruntime's advice), then static QDQ quantisation.

    Weights are int8 per output channel: depthwise convolutions need it, their channels' ranges differ by
    orders of magnitude. Activations are uint8 because onnxruntime's x86 kernels fuse only u8 depthwise
    convolutions: with int8 activations those stay float, and the demo MobileFaceNet ran twice as slow.
    reduce_range keeps weights to 7 bits, as onnxruntime advises for u8 x s8 on CPUs without VNNI, whose
    pairwise 16-bit accumulation saturates otherwise (1st-percentile embedding cosine 0.979 -> 0.997 on
    the demo model).
    """
    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="faceforge-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    onnx.save(compact_qdq(onnx.load(str(int8_path))), str(int8_path))
    return int8_path


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
