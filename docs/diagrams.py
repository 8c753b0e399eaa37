"""Draw the two architecture diagrams of docs/architecture.md: `python docs/diagrams.py` rewrites docs/img/*.png."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).parent / "img"


def box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, color: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333", lw=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9, wrap=True)


def arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], label: str = "") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, lw=1.3, color="#333"))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center", fontsize=8, color="#555")


def loop_diagram() -> None:
    fig, ax = plt.subplots(figsize=(11, 5.2))
    stages = [
        (0.2, 3.2, "Inbox\n(albums of raw photos)", "#fde2e4"),
        (2.6, 3.2, "Auto-label\ndetect · align · quality\nembed · cluster · dedup", "#fff1c1"),
        (5.0, 3.2, "Dataset version\n(manifest, crops, stats)", "#e2f0cb"),
        (7.4, 3.2, "Queue\n(SQLite jobs, sweeps)", "#cde7f0"),
        (7.4, 0.8, "Executors\nlocal torchrun · Ray Jobs", "#cde7f0"),
        (5.0, 0.8, "Trainer\nDDP backbone +\nsharded margin softmax", "#dcd3ff"),
        (2.6, 0.8, "MLflow\nruns · selection ·\nchampion alias", "#ffd8be"),
        (0.2, 0.8, "Shrink\ndistil · ONNX · int8 ·\nC array", "#e4e4e4"),
    ]
    for x, y, text, color in stages:
        box(ax, x, y, 2.0, 1.2, text, color)
    arrow(ax, (2.2, 3.8), (2.6, 3.8))
    arrow(ax, (4.6, 3.8), (5.0, 3.8))
    arrow(ax, (7.0, 3.8), (7.4, 3.8), "retrain")
    arrow(ax, (8.4, 3.2), (8.4, 2.0))
    arrow(ax, (7.4, 1.4), (7.0, 1.4))
    arrow(ax, (5.0, 1.4), (4.6, 1.4))
    arrow(ax, (2.6, 1.4), (2.2, 1.4))
    arrow(ax, (3.6, 2.0), (3.6, 3.2), "champion embeds\nthe next round")
    ax.text(9.7, 4.6, "web UI and CLI over every stage", fontsize=9, ha="right", style="italic")
    ax.set_xlim(0, 9.8)
    ax.set_ylim(0.4, 4.8)
    ax.axis("off")
    ax.set_title("The FaceForge loop", fontsize=12)
    fig.tight_layout()
    fig.savefig(OUT / "loop.png", dpi=110)
    plt.close(fig)


def step_diagram() -> None:
    fig, ax = plt.subplots(figsize=(11, 5.2))
    for rank, y in ((0, 3.0), (1, 0.6)):
        box(ax, 0.2, y, 1.6, 1.2, f"rank {rank}\nimages B", "#e2f0cb")
        box(ax, 2.3, y, 1.8, 1.2, "backbone\n(DDP replica)", "#dcd3ff")
        box(ax, 6.4, y, 2.2, 1.2, f"classifier shard {rank}\nC/W × D rows\n(Partial FC: r·C/W)", "#ffd8be")
        arrow(ax, (1.8, y + 0.6), (2.3, y + 0.6))
        arrow(ax, (4.1, y + 0.6), (4.6, 2.4 if rank else 2.6), "B × D")
        arrow(ax, (5.8, 2.4 if rank else 2.6), (6.4, y + 0.6), "W·B × D")
        arrow(ax, (8.6, y + 0.6), (9.0, 2.4 if rank else 2.6))
    box(ax, 4.6, 1.9, 1.2, 1.2, "all-gather\nfeatures\n+ labels", "#cde7f0")
    box(ax, 9.0, 1.9, 1.6, 1.2, "all-reduce\nMAX, then SUM\n(N floats each)", "#cde7f0")
    ax.text(
        5.4,
        4.55,
        "Only features, labels and per-sample scalars cross the network; logits stay C/W × N on each rank.\n"
        "Backward: the all-gather returns each rank's feature gradient (×W for DDP's mean); DDP all-reduces the "
        "backbone.",
        ha="center",
        fontsize=8.5,
    )
    ax.set_xlim(0, 10.8)
    ax.set_ylim(0.3, 5.0)
    ax.axis("off")
    ax.set_title("One training step: data parallel backbone, model parallel classifier (W = 2)", fontsize=12)
    fig.tight_layout()
    fig.savefig(OUT / "training_step.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    loop_diagram()
    step_diagram()
    print(f"written to {OUT}")
