"""Learning-rate schedules: linear warmup, then cosine or polynomial decay, as a pure function of the step."""

from __future__ import annotations

import math

from faceforge.train.config import ScheduleConfig


def lr_at(step: int, total_steps: int, base_lr: float, schedule: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based); pure, so resuming needs no scheduler state."""
    warmup = min(schedule.warmup_steps, total_steps - 1)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule.name == "cosine":
        floor = base_lr * schedule.min_lr_ratio
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (1.0 - progress) ** schedule.power
