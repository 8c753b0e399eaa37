"""Metric curves and Pareto fronts as inline SVG: no plotting library in the browser and nothing to fetch."""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING

from markupsafe import Markup

if TYPE_CHECKING:
    from faceforge.registry import Front

WIDTH, HEIGHT, PAD_LEFT, PAD_RIGHT, PAD_Y = 360, 170, 58, 10, 22


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def finite(value: float) -> bool:
    """MLflow stores infinity as the largest double, ±1.797e308."""
    return math.isfinite(value) and abs(value) < 1e308


def line_chart(title: str, points: list[tuple[float, float]]) -> Markup:
    """One metric against step, with its range on the axes; `points` need at least two distinct steps."""
    assert len(points) >= 2, "a curve needs two points"
    steps = [step for step, _ in points]
    diverged = [step for step, value in points if not finite(value)]
    if diverged:  # a diverged run: the axis spans only the real values, so they stay readable
        title = f"{title} ({len(diverged)} not finite, the first at step {_label(min(diverged))})"
        points = [point for point in points if finite(point[1])]
    values = [value for _, value in points] or [0.0]  # nothing finite: an empty plot, no line
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if y0 == y1:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1.0), y1 + 0.5 * (abs(y1) or 1.0)
    plot_w, plot_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - 2 * PAD_Y

    def xy(step: float, value: float) -> str:
        x = PAD_LEFT + (step - x0) / ((x1 - x0) or 1.0) * plot_w
        y = PAD_Y + (1.0 - (value - y0) / (y1 - y0)) * plot_h
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(s, v) for s, v in points)
    bottom = HEIGHT - PAD_Y
    name = escape(title)
    return Markup(
        f'<svg class="chart" role="img" aria-label="{name}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{name}</title>"
        f'<text x="{PAD_LEFT}" y="14" font-size="12" font-weight="bold">{name}</text>'
        f'<rect x="{PAD_LEFT}" y="{PAD_Y}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>'
        f'<text x="{PAD_LEFT - 4}" y="{PAD_Y + 4}" font-size="10" text-anchor="end">{_label(y1)}</text>'
        f'<text x="{PAD_LEFT - 4}" y="{bottom}" font-size="10" text-anchor="end">{_label(y0)}</text>'
        f'<text x="{PAD_LEFT}" y="{bottom + 14}" font-size="10">{_label(x0)}</text>'
        f'<text x="{WIDTH - PAD_RIGHT}" y="{bottom + 14}" font-size="10" text-anchor="end">step {_label(x1)}</text>'
        f'<polyline class="curve" points="{line}" fill="none" stroke="#1f6feb" stroke-width="1.5"/>'
        "</svg>"
    )


def pareto_chart(front: Front, marked_run_id: str | None = None, mark: str = "champion") -> Markup:
    """Runs as dots over (cost, metric), the front in blue joined as a staircase, the marked run ringed in red.

    Each dot's tooltip names its run; `front.points` must not be empty.
    """
    assert front.points, "a front needs at least one run"
    width, height, pad_bottom = 420, 240, 34
    costs, values = [p.cost for p in front.points], [p.value for p in front.points]
    x0, x1, y0, y1 = min(costs), max(costs), min(values), max(values)
    # 6% margins keep the extreme dots inside the frame; the corner labels are the padded axis range.
    x_margin, y_margin = 0.06 * ((x1 - x0) or abs(x0) or 1.0), 0.06 * ((y1 - y0) or abs(y0) or 1.0)
    x0, x1, y0, y1 = x0 - x_margin, x1 + x_margin, y0 - y_margin, y1 + y_margin
    plot_w, plot_h = width - PAD_LEFT - PAD_RIGHT, height - PAD_Y - pad_bottom

    def xy(cost: float, value: float) -> tuple[float, float]:
        return PAD_LEFT + (cost - x0) / (x1 - x0) * plot_w, PAD_Y + (1.0 - (value - y0) / (y1 - y0)) * plot_h

    staircase, previous = [], None
    for point in front.front:
        x, y = xy(point.cost, point.value)
        if previous is not None:
            staircase.append(f"{x:.1f},{previous:.1f}")
        staircase.append(f"{x:.1f},{y:.1f}")
        previous = y
    dots = []
    for point in front.points:
        x, y = xy(point.cost, point.value)
        tip = escape(
            f"{point.candidate.label}: {front.metric} {point.value:.4f}, {front.cost} {point.cost:.4g}"
            + (" (Pareto front)" if point.on_front else "")
        )
        kind, colour = ("run front", "#1f6feb") if point.on_front else ("run", "#8c959f")
        dots.append(
            f'<circle class="{kind}" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"><title>{tip}</title></circle>'
        )
        if point.candidate.run_id == marked_run_id:
            dots.append(
                f'<circle class="{escape(mark)}" cx="{x:.1f}" cy="{y:.1f}" r="8" fill="none" stroke="#cf222e" '
                f'stroke-width="2"><title>{escape(mark)}: {tip}</title></circle>'
            )
    bottom, right = PAD_Y + plot_h, PAD_LEFT + plot_w
    name = escape(f"{front.metric} against {front.cost}: {len(front.front)} of {len(front.points)} run(s) on the front")
    y_title = escape(f"{front.metric} ({'lower' if front.lower_is_better else 'higher'} is better)")
    line = " ".join(staircase)
    return Markup(
        f'<svg class="chart pareto" role="img" aria-label="{name}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{name}</title>"
        f'<text x="{PAD_LEFT}" y="14" font-size="12" font-weight="bold">{y_title}</text>'
        f'<rect x="{PAD_LEFT}" y="{PAD_Y}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>'
        f'<text x="{PAD_LEFT - 4}" y="{PAD_Y + 4}" font-size="10" text-anchor="end">{_label(y1)}</text>'
        f'<text x="{PAD_LEFT - 4}" y="{bottom}" font-size="10" text-anchor="end">{_label(y0)}</text>'
        f'<text x="{PAD_LEFT}" y="{bottom + 14}" font-size="10">{_label(x0)}</text>'
        f'<text x="{right}" y="{bottom + 14}" font-size="10" text-anchor="end">{_label(x1)}</text>'
        f'<text x="{PAD_LEFT + plot_w / 2:.0f}" y="{bottom + 28}" font-size="10" text-anchor="middle">'
        f"{escape(front.cost)} (lower is better)</text>"
        f'<polyline class="staircase" points="{line}" fill="none" stroke="#1f6feb" stroke-opacity="0.5"/>'
        + "".join(dots)
        + "</svg>"
    )
