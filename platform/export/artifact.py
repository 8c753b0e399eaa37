"""One call from a backbone to a deployable directory: model files, C array if asked, and card.json."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from faceforge.export.c_array import write_c_array
from faceforge.export.card import ArtifactCard, artifact_card
from faceforge.export.onnx_export import DEFAULT_OPSET, export_onnx
from faceforge.export.quantize import CALIBRATION_COUNT, CalibrationImages, FaceCalibrationReader, quantize_int8
from faceforge.export.runtime import LATENCY_RUNS

FORMATS = ("onnx", "onnx-int8", "c-array")


def export_artifact(
    model: nn.Module,
    fmt: str,
    out_dir: str | Path,
    *,
    calibration: CalibrationImages | None = None,
    crop_fraction: float = 1.0,
    calibration_count: int = CALIBRATION_COUNT,
    latency_runs: int = LATENCY_RUNS,
    opset: int = DEFAULT_OPSET,
) -> ArtifactCard:
    """Write model.onnx, then model_int8.onnx (int8 formats) and faceforge_model.c/.h (c-array), and card.json.

    `calibration` (required by the int8 formats) is read with `crop_fraction`, the crop the model saw.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "onnx" and calibration is None:
        raise ValueError(f"format {fmt} quantises to int8 and needs calibration images")
    out_dir = Path(out_dir)
    fp32_path = export_onnx(model, model.input_size, out_dir / "model.onnx", opset)
    int8_path = None
    if fmt != "onnx":
        reader = FaceCalibrationReader(
            calibration, input_size=model.input_size, crop_fraction=crop_fraction, count=calibration_count
        )
        int8_path = quantize_int8(fp32_path, out_dir / "model_int8.onnx", reader)
    if fmt == "c-array":
        write_c_array(int8_path, out_dir)
    card = artifact_card(model, fmt, fp32_path, int8_path, latency_runs)
    (out_dir / "card.json").write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return card
