"""Registering a sweep's winner as a model version with the alias `champion`, and reading it back.

Registration is keyed by (sweep id, run id): rerunning it for the same sweep finds the version it made
before instead of adding another, so a launcher and a scheduler may both finish a sweep safely.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
    ErrorCode,
)
from mlflow.tracking import MlflowClient

from faceforge.registry.database import database_path, open_database
from faceforge.registry.selection import (
    LATENCY,
    MACS,
    PARAMS,
    SWEEP_TAG,
    Policy,
    Selection,
    check_id,
    save_policy,
    saved_policy,
    select,
    sweep_candidates,
)

REGISTERED_MODEL = "faceforge"
CHAMPION_ALIAS = "champion"
METRIC_TAG, VALUE_TAG, REASON_TAG = "faceforge.metric", "faceforge.metric_value", "faceforge.reason"


@dataclass(frozen=True)
class Version:
    """A registered model version with what selection recorded on it and its model card."""

    name: str
    version: str
    run_id: str
    aliases: list[str]
    sweep_id: str | None
    metric: str | None
    value: float | None
    reason: str | None
    card: dict[str, float] = field(default_factory=dict)  # params, macs, latency_ms of the trained backbone

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def describe(self) -> str:
        card = self.card
        lines = [
            f"model:   {self.name} v{self.version}"
            + (f"  aliases: {', '.join(self.aliases)}" if self.aliases else "")
            + f"  ({self.uri})",
            f"run:     {self.run_id}" + (f"  sweep {self.sweep_id}" if self.sweep_id else ""),
        ]
        if self.metric is not None and self.value is not None:
            lines.append(f"metric:  {self.metric} = {self.value:.4f}")
        if card.keys() == {"params", "macs", "latency_ms"}:
            lines.append(
                f"card:    params {card['params'] / 1e6:.3f} M  MACs {card['macs'] / 1e6:.1f} M  "
                f"latency {card['latency_ms']:.2f} ms (1 thread, batch 1)"
            )
        if self.reason:
            lines.append(f"reason:  {self.reason}")
        return "\n".join(lines)


def _run_metrics(client: MlflowClient, run_id: str | None) -> dict[str, float]:
    """The run's metrics; none once `mlflow gc` has removed the run, which leaves the version itself readable."""
    if not run_id:
        return {}
    try:
        return client.get_run(run_id).data.metrics
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return {}


def _version(client: MlflowClient, mv: ModelVersion) -> Version:
    tags = mv.tags or {}
    metrics = _run_metrics(client, mv.run_id)
    keys = {"params": PARAMS, "macs": MACS, "latency_ms": LATENCY}
    return Version(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
        aliases=list(mv.aliases or []),
        sweep_id=tags.get(SWEEP_TAG),
        metric=tags.get(METRIC_TAG),
        value=float(tags[VALUE_TAG]) if VALUE_TAG in tags else None,
        reason=tags.get(REASON_TAG),
        card={short: metrics[key] for short, key in keys.items() if key in metrics},
    )


@contextmanager
def registry_lock(tracking_uri: str, exclusive: bool) -> Iterator[None]:
    """Exclusive: one registration at a time per database, so two finishers of a sweep never add two versions.
    Shared: a reader waits for a registration to finish, so it never sees a new version before its alias moves.
    """
    with database_path(tracking_uri).with_suffix(".registry.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)  # released when the file closes
        yield


def register(tracking_uri: str, selection: Selection, name: str = REGISTERED_MODEL) -> Version:
    """Register the winner's logged model (once per sweep), tag it with the selection and make it champion.

    ValueError when no run won, or when MLflow refuses (the model deleted since selection): the CLI, the
    scheduler and the web app report it as one line. A database locked by another writer stays an MlflowException,
    which the scheduler tries again later.
    """
    winner = selection.winner
    if winner is None:
        raise ValueError(f"sweep {selection.sweep_id}: {selection.reason}")
    assert winner.model_id is not None, "selection only lets runs with a logged model win"
    check_id(name, "registered model name")
    client = open_database(tracking_uri)
    try:
        with registry_lock(tracking_uri, exclusive=True):
            try:
                client.create_registered_model(name, description="Face embedding backbones chosen by faceforge sweeps.")
            except MlflowException as err:
                if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
            tags = {
                SWEEP_TAG: selection.sweep_id,
                METRIC_TAG: selection.ranked_by,
                VALUE_TAG: f"{selection.value:.6g}",
                REASON_TAG: selection.reason,
            }
            existing = client.search_model_versions(f"name = '{name}' AND run_id = '{winner.run_id}'")
            mv = next((v for v in existing if (v.tags or {}).get(SWEEP_TAG) == selection.sweep_id), None)
            if mv is None:
                # The artifact location, not models:/<id>: MLflow resolves that through the global tracking URI.
                source = client.get_logged_model(winner.model_id).artifact_location
                mv = client.create_model_version(
                    name, source, run_id=winner.run_id, tags=tags, model_id=winner.model_id
                )
            else:  # the same sweep again: refresh what a changed policy may have changed
                for key, value in tags.items():
                    client.set_model_version_tag(name, mv.version, key, value)
            client.set_registered_model_alias(name, CHAMPION_ALIAS, mv.version)
        return _version(client, client.get_model_version(name, mv.version))
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(TEMPORARILY_UNAVAILABLE):  # locked by another writer: try again later
            raise
        refused = err.message.splitlines()[0]  # SQLAlchemy adds the statement on lines of its own
        raise ValueError(f"sweep {selection.sweep_id}: could not register {winner.label}: {refused}") from None


def select_and_register(
    tracking_uri: str, sweep_id: str, policy: Policy | None = None, name: str | None = None
) -> tuple[Selection, Version]:
    """Select over the sweep's runs and register the winner; ValueError when no run qualifies.

    Without a policy or a name, those the sweep was launched with (`save_policy`), else the defaults. A policy or
    name given is saved as the sweep's once its winner is registered: a later selection (the scheduler's, when a
    retried job of the sweep ends) judges the sweep as the user last chose.
    """
    launched_with, launched_name = saved_policy(tracking_uri, sweep_id)
    selection = select(sweep_candidates(tracking_uri, sweep_id), policy or launched_with, sweep_id)
    version = register(tracking_uri, selection, name or launched_name or REGISTERED_MODEL)
    if policy is not None or name is not None:
        experiment_id = open_database(tracking_uri).get_run(version.run_id).info.experiment_id
        save_policy(tracking_uri, experiment_id, sweep_id, selection.policy, version.name)
    return selection, version


def registered_version(client: MlflowClient, uri: str) -> ModelVersion | None:
    """The version behind `models:/name@alias` or `models:/name/3`, so that a caller can pin what an alias meant
    when it read it; None for any other URI. ValueError when no such model, version or alias exists."""
    registered, at, alias = uri.removeprefix("models:/").rstrip("/").partition("@")
    registered, _, number = registered.partition("/")
    if not uri.startswith("models:/") or not (at or number.isdigit()):
        return None
    try:
        if at:
            return client.get_model_version_by_alias(registered, alias)
        return client.get_model_version(registered, number)
    except MlflowException as err:
        # A missing model or version is RESOURCE_DOES_NOT_EXIST; a missing alias of a model is INVALID_PARAMETER_VALUE.
        if err.error_code not in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)):
            raise
        raise ValueError(f"no {uri} in the registry yet") from None


def champion(tracking_uri: str, name: str = REGISTERED_MODEL) -> Version:
    check_id(name, "registered model name")  # a/b would be read as model a, version b
    client = open_database(tracking_uri)
    mv = registered_version(client, f"models:/{name}@{CHAMPION_ALIAS}")
    assert mv is not None  # an alias URI always names a version
    return _version(client, mv)


def versions(tracking_uri: str, name: str = REGISTERED_MODEL) -> list[Version]:
    """Every version of the registered model, newest first, with aliases (search results omit them)."""
    client = open_database(tracking_uri)
    check_id(name, "registered model name")
    with registry_lock(tracking_uri, exclusive=False):
        found = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"])
        return [_version(client, client.get_model_version(name, mv.version)) for mv in found]
