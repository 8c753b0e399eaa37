"""Training: typed config, launcher, the per-rank step loop, checkpoints and MLflow tracking."""

from faceforge.train.checkpoint import load_backbone, load_checkpoint, save_checkpoint
from faceforge.train.config import ConfigError, TrainConfig, from_dict

__all__ = ["ConfigError", "TrainConfig", "from_dict", "load_backbone", "load_checkpoint", "save_checkpoint"]
