"""The one way to export a trained model: load it, calibrate, write the artifact, log it; `faceforge export` and
the demo both call export_model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from faceforge.data import open_dataset
from faceforge.eval.sources import load_model
from faceforge.export.artifact import export_artifact, export_lock, exported_files
from faceforge.export.card import ArtifactCard
from faceforge.export.quantize import (
    CALIBRATION_COUNT,
    DEFAULT_CALIBRATION,
    FEW_CALIBRATION_FACES,
    check_calibration_method,
    open_calibration_images,
    training_data_of,
)
from faceforge.export.tracking import EXPORTS_EXPERIMENT, log_export, resolve_source
from faceforge.jobs.paths import faceforge_home
from faceforge.registry import prepare_tracking


@dataclass(frozen=True)
class ExportResult:
    out: Path
    card: ArtifactCard
    run_id: str | None  # the run in the `exports` experiment; None when not logged


def export_model(
    source: str,
    fmt: str,
    tracking_uri: str,
    *,
    out: Path | None = None,
    checkpoint: Path | None = None,
    calibration: Path | None = None,
    crop_fraction: float | None = None,
    calibration_count: int = CALIBRATION_COUNT,
    calibration_method: str = DEFAULT_CALIBRATION,
    log: bool = True,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export `source` (a checkpoint directory or an MLflow model URI) as `fmt` and log it to `tracking_uri`.

    Args:
        out: the directory to write; default $FACEFORGE_HOME/exports/<model>-<format>.
        checkpoint: a checkpoint of the same model to load instead of `source`, which stays what the export
            links to: quicker than loading an MLflow model.
        calibration, crop_fraction: the int8 formats' calibration images and the crop they are read with;
            default the training data and crop that `source` recorded.
        calibration_method: how the int8 formats take activation ranges from them (quantize.CALIBRATION_METHODS).
        log: False writes the files only.
        overwrite: replace the export already in `out` (with --no-log, nothing else keeps it).
        say: where progress lines go (the CLI prints them).

    Raises:
        ValueError, OSError: a bad format, source or calibration set, in one line.
    """
    check_calibration_method(calibration_method)
    if crop_fraction is not None and not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop fraction must be in (0, 1], got {crop_fraction}")
    model = load_model(str(checkpoint or source), tracking_uri)  # first: a typo'd database is not created
    if log:  # a database that cannot take the run is found now, not after the export is written
        prepare_tracking(tracking_uri, EXPORTS_EXPERIMENT)
    out = out or faceforge_home() / "exports" / f"{model.config['name']}-{fmt}"
    with export_lock(out, say):
        if not overwrite and (earlier := exported_files(out)):
            raise FileExistsError(
                f"{out} already holds an export ({', '.join(earlier)}); pass --overwrite to replace it, "
                "or another --out"
            )
        found = resolve_source(tracking_uri, source)
        images = None
        if fmt != "onnx":
            training_set = calibration is None  # read as training read it, whatever else lies in its folder
            if calibration is None or crop_fraction is None:
                train_root, train_crop = training_data_of(source, tracking_uri)
                calibration = train_root if calibration is None else calibration
                crop_fraction = train_crop if crop_fraction is None else crop_fraction
            if say:
                say(
                    f"calibration: up to {calibration_count} images from {calibration}, crop {crop_fraction:g}, "
                    f"{calibration_method} ranges"
                )
            if not training_set:
                images = open_calibration_images(calibration)
            else:
                try:
                    images = open_dataset(calibration)
                except FileNotFoundError as err:  # moved since training
                    recorded = f"calibration set: the training data recorded, {err}"
                    raise FileNotFoundError(f"{recorded}; give --calibration") from None
        if images is not None and (read := min(len(images), calibration_count)) < FEW_CALIBRATION_FACES and say:
            say(f"warning: calibration reads {read} image(s); int8 ranges taken from fewer than "
                f"{FEW_CALIBRATION_FACES} faces may clip other faces' activations, and the card's fidelity is "
                "measured on faces calibration read")  # fmt: skip
        card = export_artifact(
            model,
            fmt,
            out,
            calibration=images,
            crop_fraction=1.0 if crop_fraction is None else crop_fraction,
            calibration_count=calibration_count,
            calibration_method=calibration_method,
            accuracy=found.accuracy,
        )
        return ExportResult(out, card, log_export(tracking_uri, found, out, card) if log else None)
