"""Which run of a sweep wins: the best metric among finished runs that meet the policy's limits, and why.

A sweep's runs are the MLflow runs tagged `faceforge.sweep_id`. The trainer logs evaluation metrics as
`eval.<name>` and the trained backbone's model card as `model.params`, `model.macs` and `model.latency_ms`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.entities import LoggedModel, Run
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from faceforge.registry.database import open_database

SWEEP_TAG, JOB_TAG = "faceforge.sweep_id", "faceforge.job_id"
POLICY_TAG = "faceforge.policy."  # + sweep id: an experiment tag holding how that sweep's champion is chosen
REGISTERED_MODEL_TAG = "faceforge.registered_model."  # + sweep id: the model name that champion is registered under
LATENCY, PARAMS, MACS = "model.latency_ms", "model.params", "model.macs"
LOWER_IS_BETTER = frozenset({"eer", "accuracy_std", "loss", LATENCY, PARAMS, MACS})  # errors and costs
# TAR at FAR 1e-4 needs >= 10,000 impostor pairs (LFW has 3,000): a run without it competes on the tie-break.
DEFAULT_METRIC = "tar_far_1e-04"
TIE_BREAK = "accuracy"
LISTED_EXCLUSIONS = 10  # a reason stays readable (and within MLflow's tag limits) for large sweeps
_SAFE_ID = re.compile(r"^[\w.-]+$")


def lower_is_better(metric: str) -> bool:
    return metric.removeprefix("eval.") in LOWER_IS_BETTER  # `Candidate.metric` takes either name


def needs_pairs(metric: str) -> bool:
    """A TAR at a FAR below what the evaluation's impostor pairs can measure is not logged: such runs compete on
    the tie-break instead. Any other metric a run did not log excludes it (a misspelt name matches no run)."""
    return metric.removeprefix("eval.").startswith("tar_far_")


def unique_label(candidate: Candidate, taken: dict[str, str]) -> str:
    """The run's label, with its id when another run's is taken: runs may share a name and backbone."""
    return candidate.label if candidate.label not in taken else f"{candidate.label} [{candidate.run_id}]"


@dataclass(frozen=True)
class Policy:
    """The metric to optimise (maximised, or minimised for error rates) and optional limits on the model."""

    metric: str = DEFAULT_METRIC
    max_latency_ms: float | None = None
    max_params: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_latency_ms", "max_params"):
            limit = getattr(self, name)
            if limit is not None and not limit > 0:
                raise ValueError(f"{name} must be positive, got {limit}")

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.metric)

    def limits(self) -> str:
        limits = [f"latency <= {self.max_latency_ms:g} ms"] if self.max_latency_ms is not None else []
        limits += [f"params <= {self.max_params:,}"] if self.max_params is not None else []
        return ", ".join(limits)

    def describe(self) -> str:
        goal = "lowest" if self.lower_is_better else "best"
        return f"{goal} {self.metric}" + (f" with {self.limits()}" if self.limits() else "")


@dataclass(frozen=True)
class Candidate:
    """One run of a sweep as selection sees it."""

    run_id: str
    run_name: str
    job_id: str | None
    backbone: str | None
    status: str
    start_time: int
    metrics: dict[str, float]
    model_id: str | None  # the run's logged MLflow model; without one there is nothing to register
    model_files_missing: bool = False  # its files were removed from disk: registered, it would load nowhere

    @property
    def label(self) -> str:
        return f"{self.run_name} ({self.backbone})" if self.backbone else self.run_name

    def metric(self, name: str) -> float | None:
        """An evaluation metric by its short name (`accuracy`, `tar_far_1e-03`) or any logged metric by key."""
        return self.metrics.get(f"eval.{name}", self.metrics.get(name))

    def value_for(self, metric: str) -> float | None:
        """The metric, or the tie-break when the run could not measure it (too few pairs for a FAR)."""
        value = self.metric(metric)
        return self.metric(TIE_BREAK) if value is None and needs_pairs(metric) else value


@dataclass(frozen=True)
class Selection:
    sweep_id: str
    policy: Policy
    winner: Candidate | None
    reason: str
    excluded: dict[str, str]  # run label -> why it could not win

    @property
    def ranked_by(self) -> str:
        """The metric the winner won on: the policy's, or the tie-break when no eligible run could measure it."""
        if self.winner is None or self.winner.metric(self.policy.metric) is not None:
            return self.policy.metric
        return TIE_BREAK

    @property
    def value(self) -> float | None:
        return self.winner.metric(self.ranked_by) if self.winner else None


def check_id(value: str, what: str) -> str:
    """Ids end up in MLflow filter strings, so only word characters, dots and dashes are accepted."""
    if not _SAFE_ID.match(value):
        raise ValueError(f"bad {what} {value!r}: use letters, digits, '_', '-' and '.' only")
    return value


def sweep_candidates(tracking_uri: str, sweep_id: str) -> list[Candidate]:
    """Every run tagged with the sweep id in any experiment, oldest first, with its logged model if any."""
    check_id(sweep_id, "sweep id")
    client = open_database(tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}'",
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            break
    return [_candidate(run, _logged_model(client, run)) for run in runs]


def _candidate(run: Run, model: LoggedModel | None) -> Candidate:
    return Candidate(
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.info.run_id,
        job_id=run.data.tags.get(JOB_TAG),
        backbone=run.data.params.get("model.name"),
        status=run.info.status,
        start_time=run.info.start_time or 0,
        metrics=dict(run.data.metrics),
        model_id=model.model_id if model else None,
        model_files_missing=model is not None and _files_missing(model.artifact_location),
    )


def save_policy(tracking_uri: str, experiment_id: str, sweep_id: str, policy: Policy, registered_model: str) -> None:
    """Remember how a sweep is judged and where its champion goes, so that whoever selects when it ends (the
    scheduler) does the same."""
    check_id(sweep_id, "sweep id")
    check_id(registered_model, "registered model name")  # refused now, not once the sweep has trained
    client = open_database(tracking_uri)
    client.set_experiment_tag(experiment_id, POLICY_TAG + sweep_id, json.dumps(asdict(policy)))
    client.set_experiment_tag(experiment_id, REGISTERED_MODEL_TAG + sweep_id, registered_model)


def saved_policy(tracking_uri: str, sweep_id: str) -> tuple[Policy, str | None]:
    """The policy the sweep was launched with (or the default one) and its registered model name, if saved."""
    client = open_database(tracking_uri)
    for experiment in client.search_experiments():
        if POLICY_TAG + sweep_id in experiment.tags:
            policy = Policy(**json.loads(experiment.tags[POLICY_TAG + sweep_id]))
            return policy, experiment.tags.get(REGISTERED_MODEL_TAG + sweep_id)
    return Policy(), None


def sweep_policy(tracking_uri: str, sweep_id: str, **changes: object) -> tuple[Policy, str | None]:
    """saved_policy with the settings given (not None) replaced: another metric keeps the sweep's limits."""
    policy, name = saved_policy(tracking_uri, sweep_id)
    return replace(policy, **{key: value for key, value in changes.items() if value is not None}), name


def _logged_model(client: MlflowClient, run: Run) -> LoggedModel | None:
    """The run's logged model, None once the user deleted it (the run still names it); when a resumed run logged
    more than one, the latest step's, and of those the last logged (a run killed after logging its model logs it
    again at the same step)."""
    found = []
    for output in run.outputs.model_outputs if run.outputs else []:
        try:
            model = client.get_logged_model(output.model_id)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
        else:
            found.append((output.step, model.creation_timestamp, model))
    return max(found, key=lambda entry: entry[:2])[2] if found else None


def _files_missing(artifact_location: str) -> bool:
    """Whether a model stored on this machine lost its MLmodel file (cleaned from disk); a remote store is not
    checked, as that would need its credentials and a round trip per run."""
    parsed = urlparse(artifact_location)
    if parsed.scheme == "file":
        return not (Path(url2pathname(parsed.path)) / "MLmodel").is_file()
    return not parsed.scheme and not (Path(artifact_location) / "MLmodel").is_file()


def _exclusion(candidate: Candidate, policy: Policy) -> str | None:
    if candidate.status != "FINISHED":
        return f"run {candidate.status.lower()}"
    value = candidate.value_for(policy.metric)
    if value is None:
        return f"no {policy.metric}{f' or {TIE_BREAK}' if needs_pairs(policy.metric) else ''} logged"
    if not math.isfinite(value):
        return f"{policy.metric if candidate.metric(policy.metric) is not None else TIE_BREAK} is {value}"
    if policy.max_latency_ms is not None:
        latency = candidate.metrics.get(LATENCY)
        if latency is None or not math.isfinite(latency):
            return f"latency {latency if latency is not None else 'not logged'}"
        if latency > policy.max_latency_ms:
            return f"latency {latency:.2f} ms > {policy.max_latency_ms:g} ms"
    if policy.max_params is not None:
        params = candidate.metrics.get(PARAMS)
        if params is None or not math.isfinite(params):
            return f"params {params if params is not None else 'not logged'}"
        if params > policy.max_params:
            return f"params {int(params):,} > {policy.max_params:,}"
    if candidate.model_id is None:
        return "no logged model to register"
    if candidate.model_files_missing:
        return "its model's files are missing"
    return None


def select(candidates: list[Candidate], policy: Policy, sweep_id: str) -> Selection:
    """The best eligible run; ties go to higher accuracy, then to the earlier run. Runs that could not measure the
    metric (too few pairs for its FAR) rank after those that did, by accuracy."""
    excluded, eligible = {}, []
    for candidate in candidates:
        why = _exclusion(candidate, policy)
        if why is None:
            eligible.append(candidate)
        else:
            excluded[unique_label(candidate, excluded)] = why
    sign = -1.0 if policy.lower_is_better else 1.0

    def rank(candidate: Candidate) -> tuple[bool, float, float, int]:
        value, tie_break = candidate.metric(policy.metric), candidate.metric(TIE_BREAK)
        return (
            value is not None,
            sign * value if value is not None else 0.0,
            tie_break if tie_break is not None and math.isfinite(tie_break) else -math.inf,
            -candidate.start_time,
        )

    ranked = sorted(eligible, key=rank, reverse=True)
    winner = ranked[0] if ranked else None
    return Selection(sweep_id, policy, winner, _reason(ranked, excluded, policy, len(candidates)), excluded)


def _reason(ranked: list[Candidate], excluded: dict[str, str], policy: Policy, total: int) -> str:
    if not ranked:
        head = f"no run qualifies for {policy.describe()} among {total} run(s)"
    else:
        winner = ranked[0]
        metric, goal = policy.metric, policy.describe()
        if winner.metric(metric) is None:
            metric, goal = TIE_BREAK, replace(policy, metric=TIE_BREAK).describe()
            head = f"no eligible run logged {policy.metric}"
            head += " (too few pairs for that FAR)" if "far" in policy.metric else ""
            head += f", so by {TIE_BREAK}: "
        else:
            head = ""
        head += f"{winner.label} has the {goal} ({winner.metric(metric):.4f}) of {len(ranked)} eligible"
        runner_up = ranked[1] if len(ranked) > 1 else None
        if runner_up is not None and runner_up.metric(metric) is not None:
            head += f"; runner-up {runner_up.label} {runner_up.metric(metric):.4f}"
            if runner_up.metric(metric) == winner.metric(metric):
                head += f" (tie broken by {TIE_BREAK}, then by start time)"
    if excluded:
        listed = [f"{label}: {why}" for label, why in list(excluded.items())[:LISTED_EXCLUSIONS]]
        more = len(excluded) - len(listed)
        head += f"; excluded {', '.join(listed)}" + (f" and {more} more" if more else "")
    return head
