"""From Hydra overrides to validated jobs: sweep expansion, config composition, the trainer's command line.

Every submission path (CLI, web form, Hydra launcher) goes through `make_jobs`, so a bad override is
refused with one clear line before anything is enqueued.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, RangeSweep
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from faceforge.jobs.store import Job, new_id
from faceforge.train.app import CONFIG_DIR
from faceforge.train.config import ConfigError, TrainConfig, from_dict

# Set per job by the executor, never by the user: the job's own directory and identity.
RESERVED_KEYS = ("output_dir", "hydra.run.dir", "mlflow.job_id", "mlflow.sweep_id", "trainer.resume")
# A sweep is composed point by point under a lock, and previewed by anyone: `range(0,100000)` twice is 10^10 points.
MAX_SWEEP_POINTS = 1000


def _one_line(err: Exception) -> str:
    """Hydra's parse errors span lines and end with a link to the grammar; keep what went wrong, on one line."""
    return ": ".join(line for line in str(err).splitlines() if line and not line.startswith("See https://"))


def quoted_path(path: str | Path) -> str:
    """A path quoted for Hydra's override grammar: a comma, space, bracket or quote in it is then not a sweep or a list.

    Inside Hydra's quotes only backslashes before a quote or the end need doubling. For OmegaConf, `${` is escaped
    and so is each backslash before it, or `\\${` would leave a literal backslash and a live interpolation.
    """
    escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\" + m[2] if m[2] else ""), str(path))
    escaped = re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", escaped)
    return f"'{escaped}'"


def override_value(override: str) -> str | None:
    """The value an override sets, unquoted and unescaped as the trainer will read it (None for null)."""
    try:
        value = OmegaConf.create({"value": OverridesParser.create().parse_override(override).value()}).value
        return None if value is None else str(value)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad override: {_one_line(err)}") from None


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's sweep grammar (`optim.lr=0.1,0.05`, `range(...)`, `choice(...)`) as the cartesian product."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"bad override: {_one_line(err)}") from None
    axes, points = [], 1
    for override in parsed:
        key = override.key_or_group  # `hydra` whole (`++hydra={job_logging:...}`) would write any file: refused too
        if key in RESERVED_KEYS or key == "hydra" or key.startswith(("hydra.", "hydra/")):
            raise ConfigError(f"{override.key_or_group} is set by the queue for each job; leave it out")
        if override.is_sweep_override():
            points *= _axis_length(override)
            if points > MAX_SWEEP_POINTS:
                raise ConfigError(f"the sweep has more than {MAX_SWEEP_POINTS} points; split it into smaller sweeps")
            key = override.get_key_element()
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([override.input_line])
    points = [list(point) for point in itertools.product(*axes)]
    if not points:
        raise ConfigError("the sweep has no points (an empty range or choice?)")
    return points


def _axis_length(override: Override) -> int:
    """How many values a sweep takes, counted only to just past the cap (Hydra lists a shuffled range in full)."""
    value = override.value()
    try:
        values = value.range() if isinstance(value, RangeSweep) else override.sweep_string_iterator()
        return sum(1 for _ in itertools.islice(values, MAX_SWEEP_POINTS + 1))
    except (HydraException, ValueError) as err:  # interval() and glob() have no values to list; a zero range step
        raise ConfigError(f"{override.input_line}: not a sweep the queue can run ({_one_line(err)})") from None


def override_key(override: str) -> str:
    """The key an override sets, without its +, ++ or ~ prefix."""
    return override.partition("=")[0].lstrip("+~")


def merge_overrides(base: list[str], changes: list[str]) -> list[str]:
    """`base` with every key that `changes` sets replaced by its new value: a clone with edits."""
    parser = OverridesParser.create()
    try:
        changed = {(o.key_or_group, o.package) for o in parser.parse_overrides(changes)}
        kept = [o.input_line for o in parser.parse_overrides(base) if (o.key_or_group, o.package) not in changed]
    except HydraException as err:
        raise ConfigError(f"bad override: {_one_line(err)}") from None
    return [*kept, *changes]


def compose_config(overrides: list[str], output_dir: str = "runs/train") -> TrainConfig:
    """The resolved, validated config of one point; raises ConfigError with one line."""
    try:
        point = [*overrides, f"output_dir={output_dir}"]
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app, e.g. the queue launcher
            config = compose("train", overrides=point)
        else:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                config = compose("train", overrides=point)
        values = OmegaConf.to_container(config, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    except TypeError as err:  # Hydra itself trips over values of the wrong kind, such as a list for a group
        raise ConfigError(f"could not compose the config from these overrides ({err})") from None
    assert isinstance(values, dict)
    return from_dict(values)


def make_jobs(
    overrides: list[str],
    *,
    name: str | None = None,
    priority: int = 0,
    slots: int | None = None,
    executor: str = "local",
    sweep_id: str | None = None,
) -> list[Job]:
    """One job per sweep point; more than one point share a sweep id. `slots` defaults to trainer.nproc."""
    points = expand_sweep(overrides)
    if len(points) > 1 and sweep_id is None:
        sweep_id = new_id("sweep")
    jobs = []
    for index, point in enumerate(points):
        cfg = compose_config(point)
        job_slots = slots if slots is not None else cfg.trainer.nproc
        if job_slots < cfg.trainer.nproc:
            raise ConfigError(f"trainer.nproc={cfg.trainer.nproc} needs at least as many slots, got {job_slots}")
        base = name or f"{cfg.model.name}-{cfg.head.preset if cfg.head.type == 'margin' else cfg.head.type}"
        jobs.append(
            Job(
                id=new_id(),
                name=f"{base}-{index}" if len(points) > 1 else base,
                overrides=point,
                config_yaml=yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                sweep_id=sweep_id,
                priority=priority,
                slots=job_slots,
                executor=executor,
            )
        )
    return jobs


def train_command(job: Job, job_dir: Path) -> list[str]:
    """The trainer's command line for a job; rerunning it in the same directory resumes, never duplicates."""
    identity = [
        f"output_dir={job_dir}",
        f"hydra.run.dir={job_dir}",
        f"mlflow.job_id={job.id}",
        "trainer.resume=auto",
    ]
    if job.sweep_id:
        identity.append(f"mlflow.sweep_id={job.sweep_id}")
    return [sys.executable, "-m", "faceforge.train", *job.overrides, *identity]
