"""Exports in MLflow: one run per export with its files and card, linked to the model version it came from.

Each export is its own run in the `exports` experiment rather than artifacts added to the source run. The source
run is finished and is what sweep selection and the Pareto front read: int8 latencies logged into it would sit
beside the trained model's card under the same names, and a second export would overwrite the first. Its own run
keeps every export's figures queryable (`tags."faceforge.model_version" = '3'`, `metrics.int8_latency_ms < 5`)
and training experiments free of runs that are not training runs. Tags carry the link back to the source.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from faceforge.eval.sources import MLFLOW_SCHEMES
from faceforge.export.artifact import artifact_files
from faceforge.export.card import ArtifactCard
from faceforge.registry.champion import registered_version
from faceforge.registry.database import open_database, prepare_tracking
from faceforge.registry.selection import check_id
from faceforge.train.tracking import run_always_ended

EXPORTS_EXPERIMENT = "exports"
SOURCE_TAG, SOURCE_RUN_TAG, FORMAT_TAG = "faceforge.source", "faceforge.source_run_id", "faceforge.export_format"
MODEL_NAME_TAG, MODEL_VERSION_TAG = "faceforge.model_name", "faceforge.model_version"
CARD_METRICS = ("params", "trained_params", "macs", "fp32_bytes", "fp32_latency_ms", "int8_bytes", "int8_latency_ms")
ACTIVATION_METRIC = "largest_activation_bytes"
LISTED_EXPORTS = 200  # the newest; older ones stay queryable in MLflow


@dataclass(frozen=True)
class ExportSource:
    """What an export was made from: the source as given and, for MLflow sources, its run and model version."""

    source: str
    run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # the run's eval.<name> metrics, by short name


@dataclass(frozen=True)
class LoggedExport:
    """An export run as the models page lists it."""

    run_id: str
    experiment_id: str
    format: str
    source: str
    source_run_id: str | None
    model_name: str | None
    model_version: str | None
    start_time: float  # seconds since the epoch
    metrics: dict[str, float]
    params: dict[str, str]
    files: dict[str, int]  # artifact name -> bytes, in export_artifact's order


def resolve_source(tracking_uri: str, source: str) -> ExportSource:
    """The run and version behind `models:/name/3`, `models:/name@alias`, `models:/<model id>` or `runs:/<id>/...`.

    A checkpoint path links to nothing and is recorded resolved; other MLflow URIs (stages, `latest`) are recorded
    as given.
    """
    if not source.startswith(MLFLOW_SCHEMES):
        return ExportSource(str(Path(source).resolve()))
    client = open_database(tracking_uri)
    run_id = name = version = None
    if source.startswith("runs:/"):
        run_id = source.removeprefix("runs:/").split("/", 1)[0]
    elif (found := registered_version(client, source)) is not None:
        run_id, name, version = found.run_id, found.name, str(found.version)
    elif source.startswith("models:/") and "/" not in (model_id := source.removeprefix("models:/").rstrip("/")):
        run_id = client.get_logged_model(model_id).source_run_id  # an MLflow 3 logged model id
    if run_id is None:
        return ExportSource(source)
    metrics = client.get_run(run_id).data.metrics
    accuracy = {key.removeprefix("eval."): value for key, value in metrics.items() if key.startswith("eval.")}
    return ExportSource(source, run_id, name, version, accuracy)


def log_export(tracking_uri: str, source: ExportSource, out_dir: str | Path, card: ArtifactCard) -> str:
    """Log an export_artifact directory as a new run of the `exports` experiment; returns the run id.

    The card's figures become metrics (its source run's accuracy as `eval.<name>`, as training runs log it),
    the model config and largest activation params, and the format's files the run's artifacts.
    """
    out_dir = Path(out_dir)
    files = [out_dir / name for name in artifact_files(card.format)]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir} lacks {', '.join(missing)} of a {card.format} export")
    experiment_id = prepare_tracking(tracking_uri, EXPORTS_EXPERIMENT)
    client = open_database(tracking_uri)
    tags = {SOURCE_TAG: source.source, FORMAT_TAG: card.format}
    links = {SOURCE_RUN_TAG: source.run_id, MODEL_NAME_TAG: source.model_name, MODEL_VERSION_TAG: source.model_version}
    tags |= {key: value for key, value in links.items() if value is not None}
    label = f"v{source.model_version}" if source.model_version else card.model.get("name", "model")
    hint = f"the export in {out_dir} is whole but not logged; rerun with --overwrite to log it"

    def open_run() -> str:
        return client.create_run(experiment_id, run_name=f"{label}-{card.format}", tags=tags).info.run_id

    with run_always_ended(tracking_uri, hint, open_run) as run_id:
        _log_files(client, run_id, card, files)
    return run_id


def _log_files(client: MlflowClient, run_id: str, card: ArtifactCard, files: list[Path]) -> None:
    """The card's figures as metrics, the model config as params, the format's files as artifacts."""
    now = int(time.time() * 1000)
    figures = {key: getattr(card, key) for key in CARD_METRICS if getattr(card, key) is not None}
    figures[ACTIVATION_METRIC] = card.largest_activation.bytes
    figures |= {f"eval.{key}": value for key, value in card.accuracy.items()}
    figures |= {f"int8_fidelity.{key}": value for key, value in card.int8_fidelity.items()}
    act = card.largest_activation
    params = {"format": card.format, **{f"model.{key}": value for key, value in card.model.items()}}
    params |= {"largest_activation.name": act.name, "largest_activation.shape": "x".join(map(str, act.shape))}
    if card.int8_calibration is not None:
        params["int8_calibration"] = card.int8_calibration
    client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in figures.items()],
        params=[Param(key, str(value)) for key, value in params.items()],
    )
    for path in files:
        client.log_artifact(run_id, str(path))


def list_exports(tracking_uri: str, limit: int = LISTED_EXPORTS) -> list[LoggedExport]:
    """Finished export runs, newest first, with their artifact files; none before the first export."""
    client = open_database(tracking_uri)
    experiment = client.get_experiment_by_name(EXPORTS_EXPERIMENT)
    if experiment is None:
        return []
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    exports = []
    for run in found:
        tags = run.data.tags
        listed = {info.path: info.file_size for info in client.list_artifacts(run.info.run_id) if not info.is_dir}
        files = {name: listed[name] for name in artifact_files(tags.get(FORMAT_TAG, "")) if name in listed}
        exports.append(
            LoggedExport(
                run_id=run.info.run_id,
                experiment_id=run.info.experiment_id,
                format=tags.get(FORMAT_TAG, ""),
                source=tags.get(SOURCE_TAG, ""),
                source_run_id=tags.get(SOURCE_RUN_TAG),
                model_name=tags.get(MODEL_NAME_TAG),
                model_version=tags.get(MODEL_VERSION_TAG),
                start_time=(run.info.start_time or 0) / 1000,
                metrics=dict(run.data.metrics),
                params=dict(run.data.params),
                files=files,
            )
        )
    return exports


def export_file(tracking_uri: str, run_id: str, name: str) -> Path:
    """The local path of one artifact of an export run; FileNotFoundError for anything else.

    Only runs of the `exports` experiment, only files inside the run's own artifact directory (after resolving
    `..` and symlinks), and only artifact stores on this machine.
    """
    check_id(run_id, "run id")
    client = open_database(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise FileNotFoundError(f"no run {run_id}") from None
    experiment = client.get_experiment(run.info.experiment_id)
    if experiment.name != EXPORTS_EXPERIMENT:
        raise FileNotFoundError(f"run {run_id} is not an export")
    location = urlparse(run.info.artifact_uri)
    if location.scheme != "file":
        raise FileNotFoundError(f"the artifacts of run {run_id} are not on this machine ({run.info.artifact_uri})")
    root = Path(unquote(location.path)).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise FileNotFoundError(f"run {run_id} has no artifact {name!r}")
    return path
