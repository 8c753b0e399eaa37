"""torchrun entry point for one rank: `python -m faceforge.train.worker --config run/config.yaml`.

The config file is the resolved, validated config the launcher wrote, so ranks never run Hydra.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import yaml

from faceforge.train.config import ConfigError, TrainConfig
from faceforge.train.launch import die_with_parent
from faceforge.train.loop import train


def main() -> None:
    # torchrun gives each rank a session of its own: its group's SIGKILL (a cancelled job past its grace period)
    # would leave the rank training on, so the rank dies with torchrun.
    die_with_parent(signal.SIGKILL, os.getppid())
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--metrics-out", type=Path, default=None)
    args = parser.parse_args()
    try:
        metrics = train(TrainConfig.load(args.config), args.run_id)
    except ConfigError as err:  # what a rank finds refusable on its own (a teacher changed since the launcher's check)
        print(f"faceforge train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.metrics_out and metrics:
        args.metrics_out.write_text(yaml.safe_dump(metrics))


if __name__ == "__main__":
    main()
