"""Export: turning trained backbones into deployable artifacts (ONNX, int8 QDQ ONNX, C arrays) with their cards."""

from faceforge.export.artifact import FORMATS, export_artifact
from faceforge.export.c_array import Activation, largest_activation, write_c_array
from faceforge.export.card import ArtifactCard, artifact_card
from faceforge.export.onnx_export import DEFAULT_OPSET, equalize_channels, export_onnx, fold_batchnorm, output_gap
from faceforge.export.quantize import (
    CalibrationImages,
    FaceCalibrationReader,
    ImageList,
    open_calibration_images,
    quantize_int8,
    training_data_of,
)
from faceforge.export.runtime import OnnxEmbedder, onnx_latency_ms, onnx_session

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "Activation",
    "ArtifactCard",
    "CalibrationImages",
    "FaceCalibrationReader",
    "ImageList",
    "OnnxEmbedder",
    "artifact_card",
    "equalize_channels",
    "export_artifact",
    "export_onnx",
    "fold_batchnorm",
    "largest_activation",
    "onnx_latency_ms",
    "onnx_session",
    "open_calibration_images",
    "output_gap",
    "quantize_int8",
    "training_data_of",
    "write_c_array",
]
