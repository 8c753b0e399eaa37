"""The card of an exported artifact: what a deployment target budget is checked against."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from faceforge.export.c_array import Activation, largest_activation
from faceforge.export.onnx_export import fold_batchnorm
from faceforge.export.quantize import FIDELITY_BARS
from faceforge.export.runtime import LATENCY_RUNS, onnx_latency_ms
from faceforge.models.card import count_macs, count_params
from faceforge.registry.selection import DEFAULT_METRIC, TIE_BREAK


@dataclass
class ArtifactCard:
    format: str
    model: dict[str, Any]
    # The weights model.onnx stores (BatchNorm folded); trained_params is the count of the model as trained, which
    # the model cards and the training run's model.params report.
    params: int
    trained_params: int
    macs: int
    fp32_bytes: int
    fp32_latency_ms: float
    int8_bytes: int | None
    int8_latency_ms: float | None
    # Of the deployed graph: the int8 one when there is one.
    largest_activation: Activation
    # The source run's verification metrics (the fp32 model as trained, short names); int8 is not re-evaluated.
    accuracy: dict[str, float] = field(default_factory=dict)
    # int8 against fp32 embeddings on held-out calibration faces (quantize.int8_fidelity); empty without int8.
    int8_fidelity: dict[str, float] = field(default_factory=dict)
    # How the int8 activation ranges were calibrated (quantize.CALIBRATION_METHODS); None without int8.
    int8_calibration: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few aligned lines for the terminal."""
        act = self.largest_activation
        rows = {
            "model": " ".join(f"{k}={v}" for k, v in self.model.items()),
            "params": f"{self.params:,} exported ({self.trained_params:,} as trained, before BatchNorm folding)",
            "MACs": f"{self.macs / 1e6:.1f} M",
            "fp32": f"{self.fp32_bytes / 1024:.1f} KiB, {self.fp32_latency_ms:.2f} ms",
        }
        if self.int8_bytes is not None and self.int8_latency_ms is not None:
            speedup = self.fp32_latency_ms / self.int8_latency_ms
            rows["int8"] = (
                f"{self.int8_bytes / 1024:.1f} KiB, {self.int8_latency_ms:.2f} ms ({speedup:.2f}x), "
                f"{self.int8_calibration} calibration"
            )
        if self.int8_fidelity:
            fidelity = self.int8_fidelity
            below = any(fidelity[key] < bar for key, bar in FIDELITY_BARS.items())
            rows["int8 fidelity"] = (
                f"cosine to fp32 mean {fidelity['mean_cosine']:.4f}, 1st percentile {fidelity['p1_cosine']:.4f} "
                f"({fidelity['faces']:.0f} {'held-out' if fidelity['held_out'] else 'calibration'} faces)"
                + (
                    f"; BELOW the bars (mean {FIDELITY_BARS['mean_cosine']}, 1st percentile "
                    f"{FIDELITY_BARS['p1_cosine']}): check int8 accuracy before deploying"
                    if below
                    else ""
                )
            )
        shape = "x".join(str(d) for d in act.shape)
        rows["largest activation"] = f"{act.bytes / 1024:.1f} KiB ({act.name}, {shape})"
        measured = [f"{key} {self.accuracy[key]:.4f}" for key in (TIE_BREAK, DEFAULT_METRIC) if key in self.accuracy]
        if measured:
            rows["accuracy (fp32)"] = ", ".join(measured)
        return "\n".join(f"{key:<19}{value}" for key, value in rows.items())


def artifact_card(
    model: nn.Module,
    fmt: str,
    fp32_path: Path,
    int8_path: Path | None = None,
    latency_runs: int = LATENCY_RUNS,
    accuracy: dict[str, float] | None = None,
    int8_fidelity: dict[str, float] | None = None,
    int8_calibration: str | None = None,
) -> ArtifactCard:
    """Latencies are onnxruntime's at batch 1 on one thread (median of `latency_runs`)."""
    input_size = model.input_size
    deployed = int8_path or fp32_path
    exported = fold_batchnorm(model)
    # A BatchNorm left unfolded becomes a BatchNormalization node, whose running statistics the file stores as weights.
    statistics = sum(buffer.numel() for buffer in exported.buffers() if buffer.is_floating_point())
    return ArtifactCard(
        format=fmt,
        model=dict(getattr(model, "config", {})),
        params=count_params(exported) + statistics,
        trained_params=count_params(model),
        macs=count_macs(exported, input_size),
        fp32_bytes=fp32_path.stat().st_size,
        fp32_latency_ms=onnx_latency_ms(fp32_path, input_size, latency_runs),
        int8_bytes=int8_path.stat().st_size if int8_path else None,
        int8_latency_ms=onnx_latency_ms(int8_path, input_size, latency_runs) if int8_path else None,
        largest_activation=largest_activation(deployed),
        accuracy=dict(accuracy or {}),
        int8_fidelity=dict(int8_fidelity or {}),
        int8_calibration=int8_calibration,
    )
