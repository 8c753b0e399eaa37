"""The Pareto front of a sweep: the runs no other run beats on both quality and cost (MnasNet-style trade-off).

A run is on the front unless another run is at least as good on the metric and at least as cheap, and strictly
better on one of them; two runs with the same metric and cost are both on it. The plot is logged to a
sweep-level MLflow run (tagged `faceforge.pareto_of`, not `faceforge.sweep_id`, so it never competes in
selection): a sweep may have no champion (no logged model), but its trade-off is still worth seeing.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from faceforge.registry.database import open_database
from faceforge.registry.selection import (
    LATENCY,
    TIE_BREAK,
    Candidate,
    check_id,
    lower_is_better,
    needs_pairs,
    unique_label,
)

PARETO_TAG = "faceforge.pareto_of"
PLOT, TABLE = "pareto.png", "pareto.json"


@dataclass(frozen=True)
class Point:
    candidate: Candidate
    value: float  # the metric
    cost: float
    on_front: bool


@dataclass(frozen=True)
class Front:
    sweep_id: str
    metric: str
    cost: str
    points: list[Point]  # every finished run with both numbers, cheapest first
    skipped: dict[str, str]  # run label -> why it is not plotted

    @property
    def front(self) -> list[Point]:
        return [point for point in self.points if point.on_front]

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.metric)

    def describe(self) -> str:
        listed = ", ".join(
            f"{p.candidate.label} {self.metric}={p.value:.4f} {self.cost}={p.cost:.4g}" for p in self.front
        )
        return f"Pareto front of {len(self.points)} run(s) over {self.metric} and {self.cost}: {listed or 'empty'}"


def pareto_front(candidates: list[Candidate], metric: str, cost: str = LATENCY, sweep_id: str = "") -> Front:
    """The front over finished runs. When no run measured `metric` (a FAR needing more pairs than the evaluation
    had), the front is over accuracy instead, as selection falls back to it."""
    finished = [c for c in candidates if c.status == "FINISHED"]
    if finished and needs_pairs(metric) and all(c.metric(metric) is None for c in finished):
        metric = TIE_BREAK
    sign = -1.0 if lower_is_better(metric) else 1.0
    measured, skipped = [], {}
    for candidate in candidates:
        value, price = candidate.metric(metric), candidate.metric(cost)
        if candidate.status != "FINISHED":
            why = f"run {candidate.status.lower()}"
        elif value is None or not math.isfinite(value):
            why = f"no {metric} logged"
        elif price is None or not math.isfinite(price):
            why = f"no {cost} logged"
        else:
            measured.append((candidate, value, price))
            continue
        skipped[unique_label(candidate, skipped)] = why

    def dominated(value: float, price: float) -> bool:
        return any(
            sign * v >= sign * value and p <= price and (sign * v > sign * value or p < price) for _, v, p in measured
        )

    points = [Point(c, v, p, not dominated(v, p)) for c, v, p in measured]
    points.sort(key=lambda point: (point.cost, -sign * point.value))
    return Front(sweep_id, metric, cost, points, skipped)


def plot_front(front: Front, path: Path, champion_run_id: str | None = None) -> Path:
    """A PNG: every run grey, the front blue and joined as the staircase of best trade-offs, the champion starred."""
    if not front.points:
        raise ValueError(f"sweep {front.sweep_id}: no finished run has both {front.metric} and {front.cost}")
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in a server process

    from faceforge.eval.report import write_png

    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.subplots()
    others = [p for p in front.points if not p.on_front]
    ax.scatter([p.cost for p in others], [p.value for p in others], c="#8c959f", label="run")
    best = front.front
    ax.step([p.cost for p in best], [p.value for p in best], where="post", c="#1f6feb", alpha=0.5)
    ax.scatter([p.cost for p in best], [p.value for p in best], c="#1f6feb", label="Pareto front", zorder=3)
    for point in best:
        ax.annotate(
            point.candidate.label, (point.cost, point.value), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    chosen = [p for p in front.points if p.candidate.run_id == champion_run_id]
    if chosen:
        ax.scatter([chosen[0].cost], [chosen[0].value], marker="*", s=260, c="#cf222e", label="champion", zorder=4)
    ax.set_xlabel(f"{front.cost} (lower is better)")
    ax.set_ylabel(f"{front.metric} ({'lower' if front.lower_is_better else 'higher'} is better)")
    ax.set_title(f"sweep {front.sweep_id}: {len(best)} of {len(front.points)} run(s) on the front", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return write_png(fig, path)


def log_front(tracking_uri: str, front: Front, champion_run_id: str | None = None) -> str:
    """Log the plot and the points as artifacts of the sweep's Pareto run (made once, in the experiment of the
    sweep's runs, refreshed by later calls); returns that run's id."""
    check_id(front.sweep_id, "sweep id")
    client = open_database(tracking_uri)
    rows = [
        {"run_id": p.candidate.run_id, "label": p.candidate.label, front.metric: p.value, front.cost: p.cost}
        | {"on_front": p.on_front, "champion": p.candidate.run_id == champion_run_id}
        for p in front.points
    ]
    with tempfile.TemporaryDirectory() as folder:
        plot = plot_front(front, Path(folder) / PLOT, champion_run_id)  # raises first when there is nothing to plot
        table = Path(folder) / TABLE
        table.write_text(json.dumps({"metric": front.metric, "cost": front.cost, "runs": rows}, indent=1))
        experiment_id = client.get_run(front.points[0].candidate.run_id).info.experiment_id
        found = client.search_runs([experiment_id], filter_string=f"tags.`{PARETO_TAG}` = '{front.sweep_id}'")
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {PARETO_TAG: front.sweep_id}
            run_id = client.create_run(experiment_id, run_name=f"pareto {front.sweep_id}", tags=tags).info.run_id
        client.log_artifact(run_id, str(plot))
        client.log_artifact(run_id, str(table))
    client.set_terminated(run_id, "FINISHED")
    return run_id
