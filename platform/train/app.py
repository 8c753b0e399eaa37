"""`faceforge train`: the Hydra application over configs/ (single runs and `-m` sweeps)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from faceforge.train.checkpoint import LATEST
from faceforge.train.config import ConfigError, from_dict
from faceforge.train.launch import launch

CONFIG_DIR = Path(os.environ.get("FACEFORGE_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


def _objective(metrics: dict[str, float]) -> float | None:
    """What a sweeper optimises: verification accuracy when evaluation ran."""
    return metrics.get("accuracy")


def _refuse(err: ConfigError) -> NoReturn:
    """A bad config or command line: one line and exit status 2, not a traceback."""
    print(f"faceforge train: error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def hydra_main(config: DictConfig) -> float | None:
    try:
        cfg = from_dict(OmegaConf.to_container(config, resolve=True))
        run_folder = Path(HydraConfig.get().runtime.output_dir)
        if Path(cfg.output_dir).resolve() != run_folder.resolve():
            raise ConfigError(
                f"output_dir={cfg.output_dir} is not the run's folder ({run_folder}): set hydra.run.dir instead, so "
                "that one folder holds the checkpoints and the record `faceforge train --resume` reads"
            )
        metrics = launch(cfg)
    except ConfigError as err:
        _refuse(err)
    if metrics:
        print("final: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return _objective(metrics)


RESUME_FLAG = "--resume"


def resume_arguments(argv: list[str]) -> list[str]:
    """`--resume RUN [overrides]` as the trainer's arguments: the overrides Hydra recorded for RUN, with `overrides`
    replacing the values of the keys they set, continued in RUN from its latest checkpoint (before its first, from
    the one it started from). A resume then never depends on retyping the run's command line, and a forgotten
    override cannot silently change the run. Without the flag, `argv` as it is."""
    at = next((i for i, word in enumerate(argv) if word.partition("=")[0] == RESUME_FLAG), None)
    if at is None:
        return argv
    from faceforge.jobs.spec import merge_overrides, override_key, quoted_path

    flag, _, run = argv[at].partition("=")
    rest = argv[:at] + argv[at + (1 if run else 2) :]
    run = run or (argv[at + 1] if at + 1 < len(argv) else "")
    recorded = Path(run) / ".hydra" / "overrides.yaml"
    if not run or run.startswith("-"):
        raise ConfigError(f"{flag} needs the run's folder (runs/train/<run>)")
    if not recorded.is_file():
        raise ConfigError(f"{flag} {run}: not a training run's folder (it has no {recorded.relative_to(run)})")
    overrides = [word for word in rest if "=" in word and not word.startswith("-")]
    hydra_flags = [word for word in rest if word not in overrides]  # --cfg job, --info, ...
    if {"-m", "--multirun"} & set(hydra_flags):
        raise ConfigError(f"{flag} continues one run; it cannot be a sweep (-m)")
    owned = ("trainer.resume", "output_dir", "hydra.run.dir")
    if clashing := [word for word in overrides if override_key(word) in owned]:
        raise ConfigError(f"{flag} sets {', '.join(owned)} itself; drop {' '.join(clashing)}")
    folder = quoted_path(Path(run).resolve())
    saved = [str(word) for word in OmegaConf.to_container(OmegaConf.load(recorded))]
    # A run started from another run's checkpoint, stopped before a checkpoint of its own, starts from that again.
    started_from = [word for word in saved if override_key(word) == "trainer.resume"]
    own_checkpoint = (Path(run) / "checkpoints" / LATEST).is_file()
    resume = started_from[-1] if started_from and not own_checkpoint else "trainer.resume=auto"
    identity = [resume, f"output_dir={folder}", f"hydra.run.dir={folder}"]
    return [*hydra_flags, *merge_overrides(saved, [*overrides, *identity])]


def main(argv: list[str] | None = None) -> None:
    """Run the Hydra app with `argv` (default: the command line) as its arguments; Hydra reads sys.argv itself."""
    try:
        argv = resume_arguments(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        _refuse(err)
    sys.argv = ["faceforge train", *argv]
    hydra_main()
