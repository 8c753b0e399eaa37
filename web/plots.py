"""Metric curves as inline SVG: no plotting library in the browser and nothing to fetch."""

from __future__ import annotations

from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, PAD_LEFT, PAD_RIGHT, PAD_Y = 360, 170, 58, 10, 22


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def line_chart(title: str, points: list[tuple[float, float]]) -> Markup:
    """One metric against step, with its range on the axes; `points` need at least two distinct steps."""
    assert len(points) >= 2, "a curve needs two points"
    steps, values = [p[0] for p in points], [p[1] for p in points]
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
