"""`faceforge train`: the Hydra application over configs/ (single runs and `-m` sweeps)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from faceforge.train.config import ConfigError, from_dict
from faceforge.train.launch import launch

CONFIG_DIR = Path(os.environ.get("FACEFORGE_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


def _objective(metrics: dict[str, float]) -> float | None:
    """What a sweeper optimises: verification accuracy when evaluation ran."""
    return metrics.get("accuracy")


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def hydra_main(config: DictConfig) -> float | None:
    try:
        cfg = from_dict(OmegaConf.to_container(config, resolve=True))
        metrics = launch(cfg)
    except ConfigError as err:
        print(f"faceforge train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if metrics:
        print("final: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return _objective(metrics)


def main(argv: list[str] | None = None) -> None:
    """Run the Hydra app with `argv` as its overrides (Hydra reads sys.argv itself)."""
    if argv is not None:
        sys.argv = ["faceforge train", *argv]
    hydra_main()
