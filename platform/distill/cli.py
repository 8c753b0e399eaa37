"""`faceforge distill <overrides>`: exactly `faceforge train distill=<preset> <overrides>`.

It adds nothing to training but the preset: the run, its MLflow logging, distribution over ranks and the
queue (`faceforge queue submit distill=embedding distill.teacher=...`) are the trainer's own.
"""

from __future__ import annotations

from faceforge.jobs.spec import override_key
from faceforge.train.app import RESUME_FLAG

DEFAULT_PRESET = "embedding"


def distill_overrides(overrides: list[str]) -> list[str]:
    """The trainer's overrides: `distill=<DEFAULT_PRESET>` first unless the command line picks a preset or resumes a
    run (which keeps the preset it recorded)."""
    chooses_preset = any(override_key(item) in ("distill", RESUME_FLAG) for item in overrides)
    return list(overrides) if chooses_preset else [f"distill={DEFAULT_PRESET}", *overrides]


def main(overrides: list[str], multirun: bool = False) -> None:
    """The CLI command: `faceforge distill [-m] distill.teacher=<checkpoint or models:/...> [overrides]`."""
    from faceforge.train.app import main as train_main

    arguments = distill_overrides(overrides)
    train_main(["--multirun", *arguments] if multirun else arguments)
