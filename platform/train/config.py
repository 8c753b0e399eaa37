"""Typed training configuration: the Hydra config is validated into these dataclasses once, at the edge."""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import yaml

from faceforge import models
from faceforge.heads import MARGIN_PRESETS, margin_spec
from faceforge.models.layers import MIN_INPUT_SIZE


class ConfigError(ValueError):
    """A user's configuration mistake; reported as one line, never a traceback."""


@dataclass
class ModelConfig:
    name: str = "mobilefacenet"
    embedding_dim: int = 512
    width: float = 1.0
    input_size: int = 112
    act: str = "prelu"


@dataclass
class HeadConfig:
    type: str = "margin"
    preset: str = "arcface"
    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    sample_rate: float = 1.0
    # MagFace (preset magface): norm range [l_a, u_a], margin range [l_m, u_m], regulariser weight.
    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0
    margin: float = 0.3
    p: int = 16
    k: int = 4

    def loss_settings(self) -> dict[str, object]:
        """What the loss, and so a checkpoint's classifier, depends on: a resume must not change it."""
        if self.type != "margin":
            return {"type": self.type, "margin": self.margin}
        return {"type": self.type, "preset": self.preset, **self.margin_parameters()}

    def margin_parameters(self) -> dict[str, float]:
        """The keyword arguments of `margin_spec(preset, ...)`: MagFace's only for a MagFace preset."""
        shared = {"s": self.s, "m1": self.m1, "m2": self.m2, "m3": self.m3}
        if MARGIN_PRESETS[self.preset].magface is None:
            return shared
        return shared | {"l_a": self.l_a, "u_a": self.u_a, "l_m": self.l_m, "u_m": self.u_m, "lambda_g": self.lambda_g}


@dataclass
class AugmentConfig:
    flip: bool = True
    lowres_prob: float = 0.2
    lowres_min: float = 0.25
    jitter: float = 0.2
    grey_prob: float = 0.0
    shift: float = 0.0
    scale: float = 0.0
    rotate: float = 0.0


@dataclass
class DataConfig:
    root: str | None = None
    batch_size: int = 128
    crop_fraction: float = 1.0
    num_workers: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    power: float = 2.0


@dataclass
class TrainerConfig:
    nproc: int = 1
    steps: int = 1000
    device: str = "auto"
    threads: int = 1
    amp: bool = False
    channels_last: bool = False
    grad_clip: float = 0.0
    accumulate: int = 1
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 500
    resume: str | None = None
    init_from: str | None = None


@dataclass
class EvalConfig:
    pairs: str | None = None
    root: str | None = None
    bin: str | None = None
    crop_fraction: float = 1.0
    batch_size: int = 64
    disabled: bool = False


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "faceforge"
    run_name: str | None = None
    log_model: bool = True
    # Set by the job queue: tags that tie the run to its job and sweep (faceforge.job_id, faceforge.sweep_id).
    job_id: str | None = None
    sweep_id: str | None = None


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (`faceforge.distill`); off while `teacher` is null."""

    teacher: str | None = None
    head_weight: float = 1.0
    embedding_weight: float = 0.0
    embedding_loss: str = "cosine"
    centre_weight: float = 0.0
    centre_s: float = 64.0
    centre_m: float = 0.5
    cache: bool = False
    cache_dir: str = "runs/distill_cache"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    output_dir: str = "runs/train"

    @property
    def per_rank_batch(self) -> int:
        return self.data.batch_size // self.trainer.nproc

    @property
    def micro_batch(self) -> int:
        return self.per_rank_batch // self.trainer.accumulate

    @property
    def resume_hint(self) -> str:
        """How a stopped run continues: its folder records everything else."""
        return f"resume with: faceforge train --resume {shlex.quote(str(self.output_dir))}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return from_dict(yaml.safe_load(Path(path).read_text()))


def build_typed(cls: type, values: Any, where: str = "") -> Any:
    """A dataclass from nested dicts (YAML, Hydra): an unknown key, a wrongly typed scalar or a value the dataclass
    refuses is one ConfigError line naming the key. Nested dataclass fields are built the same way."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping of keys to values, got {values!r}")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(f'{where}{k}' for k in sorted(unknown))}")
    hints = get_type_hints(cls)
    kwargs = {
        name: build_typed(hints[name], value or {}, f"{where}{name}.")
        if is_dataclass(hints[name])
        else _checked(value, hints[name], f"{where}{name}")
        for name, value in values.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {err}") from None


def _checked(value: Any, hint: Any, key: str) -> Any:
    """Refuse a value of the wrong scalar type (`optim.lr=abc`) with one line; ints pass for floats."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    allowed = [t for t in options if t in (bool, int, float, str, type(None))]
    if not allowed or any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in allowed):
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if str in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a path or name that YAML read as a number
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and validate; every mistake becomes one ConfigError line."""
    values = {k: v for k, v in values.items() if k != "hydra"}
    cfg = build_typed(TrainConfig, values)
    cfg.optim.betas = tuple(cfg.optim.betas)  # YAML gives a list
    if cfg.trainer.init_from is not None:
        adopt_init_model(cfg)
    validate(cfg)
    return cfg


def adopt_init_model(cfg: TrainConfig) -> None:
    """trainer.init_from's backbone is where training starts, so its model config replaces model.* (the loop
    builds the network, pruned widths included, from the checkpoint itself). Read at submission too, so a
    queued job with a mistyped path is refused at once."""
    from faceforge.train.checkpoint import read_model_state

    keys = [f.name for f in fields(ModelConfig)]
    try:
        saved = read_model_state(Path(cfg.trainer.init_from), "model_config", "model")["model_config"]
    except (OSError, ValueError) as err:
        raise ConfigError(f"trainer.init_from: {err}") from None
    missing = [key for key in keys if not isinstance(saved, dict) or key not in saved]
    _require(not missing, f"trainer.init_from {cfg.trainer.init_from}: its model_config has no {', '.join(missing)}")
    for key in keys:
        setattr(cfg.model, key, saved[key])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data on disk; `faceforge.train.launch` checks paths and class counts."""
    known = models.list_models()
    _require(cfg.model.name in known, f"unknown backbone {cfg.model.name!r}; choose one of {', '.join(known)}")
    _require(cfg.model.act in ("prelu", "relu"), f"model.act must be prelu or relu, got {cfg.model.act!r}")
    _require(cfg.head.type in ("margin", "triplet", "contrastive"), f"unknown head.type {cfg.head.type!r}")
    if cfg.head.type == "margin":
        _require(cfg.head.preset in MARGIN_PRESETS, f"unknown head.preset {cfg.head.preset!r}")
        _require(
            0.0 < cfg.head.sample_rate <= 1.0,
            f"head.sample_rate must be in (0, 1], got {cfg.head.sample_rate}",
        )
        try:
            margin_spec(cfg.head.preset, **cfg.head.margin_parameters())
        except ValueError as err:
            raise ConfigError(f"head: {err}") from None
    _require(cfg.optim.name in ("sgd", "adamw"), f"optim.name must be sgd or adamw, got {cfg.optim.name!r}")
    _require(cfg.optim.lr > 0, f"optim.lr must be positive, got {cfg.optim.lr}")
    _require(
        cfg.schedule.name in ("cosine", "poly"),
        f"schedule.name must be cosine or poly, got {cfg.schedule.name!r}",
    )
    trainer = cfg.trainer
    _require(trainer.nproc >= 1, f"trainer.nproc must be >= 1, got {trainer.nproc}")
    _require(trainer.steps >= 1, f"trainer.steps must be >= 1, got {trainer.steps}")
    _require(trainer.accumulate >= 1, f"trainer.accumulate must be >= 1, got {trainer.accumulate}")
    _require(trainer.threads >= 1, f"trainer.threads must be >= 1, got {trainer.threads}")
    batch, ways = cfg.data.batch_size, trainer.nproc * trainer.accumulate
    _require(batch >= 1, f"data.batch_size must be >= 1, got {batch}")
    _require(
        batch % ways == 0,
        f"data.batch_size={batch} does not divide into trainer.nproc={trainer.nproc} x "
        f"trainer.accumulate={trainer.accumulate} equal micro-batches",
    )
    _require(0 <= cfg.seed < 2**64, f"seed must be between 0 and {2**64 - 1}, got {cfg.seed}")  # torch's seed range
    if cfg.head.type != "margin":
        _require(
            cfg.head.p >= 2 and cfg.head.k >= 2,
            f"{cfg.head.type} loss needs head.p >= 2 and head.k >= 2 (a positive and a negative for each face), "
            f"got p={cfg.head.p} k={cfg.head.k}",
        )
        _require(
            cfg.per_rank_batch == cfg.head.p * cfg.head.k,
            f"{cfg.head.type} loss needs data.batch_size = nproc x p x k = "
            f"{trainer.nproc * cfg.head.p * cfg.head.k}, got {batch}",
        )
        _require(trainer.accumulate == 1, f"{cfg.head.type} loss does not support trainer.accumulate > 1")
        _require(
            math.isfinite(cfg.head.margin) and cfg.head.margin > 0,
            f"{cfg.head.type} loss needs a positive head.margin, got {cfg.head.margin}",
        )
    _require(0.0 < cfg.data.crop_fraction <= 1.0, "data.crop_fraction must be in (0, 1]")
    _require(0.0 < cfg.eval.crop_fraction <= 1.0, "eval.crop_fraction must be in (0, 1]")
    betas = cfg.optim.betas
    _require(
        len(betas) == 2 and all(0.0 <= beta < 1.0 for beta in betas),
        f"optim.betas must be two values in [0, 1), got {list(betas)}",
    )
    _require(cfg.mlflow.tracking_uri.startswith("sqlite:///"), "mlflow.tracking_uri must be sqlite:///<path>")
    _require(
        cfg.mlflow.experiment.strip() != "",
        f"mlflow.experiment must name an MLflow experiment, got {cfg.mlflow.experiment!r}",
    )
    _check_ranges(cfg)
    try:
        with torch.device("meta"):  # shapes only, no memory: each backbone's own limits, refused at submission
            models.create(**asdict(cfg.model))
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    if cfg.distill.teacher is not None:
        validate_distill(cfg.distill)


def _check_ranges(cfg: TrainConfig) -> None:
    """Values that would crash a run hours in, or ask the machine for the absurd, stop here instead."""
    model, optim, trainer, augment = cfg.model, cfg.optim, cfg.trainer, cfg.data.augment
    ranges = [
        ("model.width", model.width, 0.05, 8.0),
        ("model.input_size", model.input_size, MIN_INPUT_SIZE, 1024),
        ("model.embedding_dim", model.embedding_dim, 2, 65536),
        ("optim.lr", optim.lr, 1e-12, 100.0),
        ("optim.momentum", optim.momentum, 0.0, 1.0),
        ("optim.weight_decay", optim.weight_decay, 0.0, 1.0),
        # A negative floor or power would turn the decay into gradient ascent or a growing learning rate.
        ("schedule.warmup_steps", cfg.schedule.warmup_steps, 0, math.inf),
        ("schedule.min_lr_ratio", cfg.schedule.min_lr_ratio, 0.0, 1.0),
        ("schedule.power", cfg.schedule.power, 0.01, 10.0),
        ("trainer.grad_clip", trainer.grad_clip, 0.0, math.inf),
        ("trainer.log_every", trainer.log_every, 1, math.inf),
        ("trainer.checkpoint_every", trainer.checkpoint_every, 1, math.inf),
        ("trainer.eval_every", trainer.eval_every, 0, math.inf),  # 0: once, at the end
        ("trainer.threads", trainer.threads, 1, 1024),
        ("data.num_workers", cfg.data.num_workers, 0, 256),
        ("eval.batch_size", cfg.eval.batch_size, 1, 65536),
        ("data.augment.lowres_prob", augment.lowres_prob, 0.0, 1.0),
        ("data.augment.grey_prob", augment.grey_prob, 0.0, 1.0),
        ("data.augment.lowres_min", augment.lowres_min, 0.01, 1.0),
        ("data.augment.shift", augment.shift, 0.0, 0.49),
        ("data.augment.scale", augment.scale, 0.0, 0.99),
        ("data.augment.rotate", augment.rotate, 0.0, 180.0),
        ("data.augment.jitter", augment.jitter, 0.0, 0.99),
    ]
    for key, value, low, high in ranges:
        _require(low <= value <= high, f"{key} must be between {low:g} and {high:g}, got {value}")
    # No cuda:N: each rank takes the CUDA device numbered by its local rank.
    _require(
        trainer.device in ("auto", "cpu", "cuda"), f"trainer.device must be auto, cpu or cuda, got {trainer.device!r}"
    )


def validate_distill(distill: DistillConfig) -> None:
    """Also checks that a checkpoint teacher exists, so a queued job with a mistyped path is refused at submission;
    an MLflow teacher is resolved when the ranks start."""
    from faceforge.eval.sources import MLFLOW_SCHEMES
    from faceforge.train.checkpoint import resolve_checkpoint

    teacher = distill.teacher
    _require(teacher not in ("", "???"), "distill.teacher must be set: a checkpoint directory or models:/name@alias")
    weights = {
        "head_weight": distill.head_weight,
        "embedding_weight": distill.embedding_weight,
        "centre_weight": distill.centre_weight,
    }
    for key, weight in weights.items():
        _require(weight >= 0, f"distill.{key} must be >= 0, got {weight}")
    _require(
        distill.embedding_weight + distill.centre_weight > 0,
        "distill.teacher is set but distill.embedding_weight and distill.centre_weight are 0: "
        "choose distill=embedding or distill=arcdistill",
    )
    _require(
        distill.embedding_loss in ("cosine", "l2"),
        f"distill.embedding_loss must be cosine or l2, got {distill.embedding_loss!r}",
    )
    _require(distill.centre_s > 0 and distill.centre_m >= 0, "distill.centre_s must be > 0 and distill.centre_m >= 0")
    if not teacher.startswith(MLFLOW_SCHEMES):
        try:
            resolve_checkpoint(Path(teacher))
        except FileNotFoundError as err:
            raise ConfigError(f"distill.teacher: {err}") from None
