"""One call from a backbone to a deployable directory: model files, C array if asked, and card.json."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from faceforge.export.c_array import write_c_array
from faceforge.export.card import ArtifactCard, artifact_card
from faceforge.export.onnx_export import DEFAULT_OPSET, export_onnx
from faceforge.export.quantize import (
    CALIBRATION_COUNT,
    DEFAULT_CALIBRATION,
    CalibrationImages,
    FaceCalibrationReader,
    int8_fidelity,
    quantize_int8,
)
from faceforge.export.runtime import LATENCY_RUNS

FORMATS = ("onnx", "onnx-int8", "c-array")
FP32_FILE, INT8_FILE, CARD_FILE, C_SYMBOL = "model.onnx", "model_int8.onnx", "card.json", "faceforge_model"
BUILDING = ".building-"  # prefix of the hidden folder inside out_dir that an export is built in
EXPORT_LOCK = ".export.lock"  # held by the export writing into out_dir


def artifact_files(fmt: str) -> list[str]:
    """The names export_artifact writes for a format, card last: what gets logged and offered for download."""
    files = [FP32_FILE] + ([INT8_FILE] if fmt != "onnx" else [])
    return files + ([f"{C_SYMBOL}.c", f"{C_SYMBOL}.h"] if fmt == "c-array" else []) + [CARD_FILE]


def exported_files(out_dir: Path) -> list[str]:
    """The files of an earlier export (of any format) that `out_dir` holds."""
    names = {name for fmt in FORMATS for name in artifact_files(fmt)}
    return sorted(name for name in names if (out_dir / name).exists())


@contextmanager
def export_lock(out_dir: Path, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Exports into one folder take turns, from the check for an earlier export to the logged run: the default
    out_dir is shared by every checkpoint of a backbone. A build folder found inside is then a killed export's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / EXPORT_LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say:
                say(f"waiting for another export into {out_dir} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in out_dir.glob(f"{BUILDING}*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


def export_artifact(
    model: nn.Module,
    fmt: str,
    out_dir: str | Path,
    *,
    calibration: CalibrationImages | None = None,
    crop_fraction: float = 1.0,
    calibration_count: int = CALIBRATION_COUNT,
    calibration_method: str = DEFAULT_CALIBRATION,
    latency_runs: int = LATENCY_RUNS,
    opset: int = DEFAULT_OPSET,
    accuracy: dict[str, float] | None = None,
) -> ArtifactCard:
    """Write model.onnx, then model_int8.onnx (int8 formats) and faceforge_model.c/.h (c-array), and card.json.

    `calibration` (required by the int8 formats) is read with `crop_fraction`, the crop the model saw, and sets
    the int8 ranges by `calibration_method` (quantize.CALIBRATION_METHODS).
    `accuracy` is what the model's training run measured (`resolve_source`), recorded on the card as is; int8
    fidelity is measured on calibration-set faces that calibration did not read.

    The files are built in a hidden folder inside `out_dir` (the same filesystem, so each move is a rename, even
    when out_dir is a mount point) and moved in only when all exist, so a failed export (bad calibration images,
    say) leaves an earlier export in `out_dir` whole. The earlier card goes first and the new one comes last, so
    a folder interrupted while the files move has no card (an incomplete export) rather than a card of another
    model. The caller holds `export_lock(out_dir)`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt != "onnx" and calibration is None:
        raise ValueError(f"format {fmt} quantises to int8 and needs calibration images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=BUILDING, dir=out_dir) as temporary:
        building = Path(temporary)
        fp32_path = export_onnx(model, model.input_size, building / FP32_FILE, opset)
        int8_path, fidelity = None, None
        if fmt != "onnx":
            reader = FaceCalibrationReader(
                calibration, input_size=model.input_size, crop_fraction=crop_fraction, count=calibration_count
            )
            int8_path = quantize_int8(fp32_path, building / INT8_FILE, reader, calibration_method)
            fidelity = int8_fidelity(fp32_path, int8_path, reader)
        method = calibration_method if int8_path else None
        card = artifact_card(model, fmt, fp32_path, int8_path, latency_runs, accuracy, fidelity, method)
        if fmt == "c-array":
            write_c_array(int8_path, building, card.largest_activation, C_SYMBOL)
        (building / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n")
        (out_dir / CARD_FILE).unlink(missing_ok=True)
        for name in artifact_files(fmt):  # the card last
            os.replace(building / name, out_dir / name)
    for stale in set(exported_files(out_dir)) - set(artifact_files(fmt)):
        (out_dir / stale).unlink()  # an earlier export's in another format: the card no longer lists it
    return card
