"""Export: trained backbones to deployable artifacts (ONNX, int8 QDQ ONNX, C arrays) with cards, logged to MLflow."""

from faceforge.export.artifact import FORMATS, artifact_files, export_artifact
from faceforge.export.c_array import Activation, largest_activation, write_c_array
from faceforge.export.card import ArtifactCard, artifact_card
from faceforge.export.onnx_export import DEFAULT_OPSET, equalize_channels, export_onnx, fold_batchnorm, output_gap
from faceforge.export.pipeline import ExportResult, export_model
from faceforge.export.quantize import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION,
    CalibrationImages,
    FaceCalibrationReader,
    ImageList,
    int8_fidelity,
    open_calibration_images,
    quantize_int8,
    training_data_of,
)
from faceforge.export.runtime import OnnxEmbedder, embedding_agreement, onnx_latency_ms, onnx_session
from faceforge.export.tracking import (
    EXPORTS_EXPERIMENT,
    ExportSource,
    LoggedExport,
    export_file,
    list_exports,
    log_export,
    resolve_source,
)

__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_CALIBRATION",
    "DEFAULT_OPSET",
    "EXPORTS_EXPERIMENT",
    "FORMATS",
    "Activation",
    "ArtifactCard",
    "CalibrationImages",
    "ExportResult",
    "ExportSource",
    "FaceCalibrationReader",
    "ImageList",
    "LoggedExport",
    "OnnxEmbedder",
    "artifact_card",
    "artifact_files",
    "embedding_agreement",
    "equalize_channels",
    "export_artifact",
    "export_file",
    "export_model",
    "export_onnx",
    "fold_batchnorm",
    "int8_fidelity",
    "largest_activation",
    "list_exports",
    "log_export",
    "onnx_latency_ms",
    "onnx_session",
    "open_calibration_images",
    "output_gap",
    "quantize_int8",
    "resolve_source",
    "training_data_of",
    "write_c_array",
]
