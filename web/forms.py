"""The job form as Hydra overrides, and back (for clone-with-edits).

Later overrides replace earlier ones with the same key: the form's fields, then the free overrides, then the
sweep grammar. Paths in overrides are confined to the data roots, and stored as the absolute paths checked,
before anything is composed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

from starlette.datastructures import FormData

from faceforge.jobs import Job, expand_sweep, override_value, quoted_path
from faceforge.web.datasets import DEMO, confine

# Form field -> config key; blank means the config's default.
HYPERPARAMETERS = {
    "lr": "optim.lr",
    "steps": "trainer.steps",
    "batch_size": "data.batch_size",
    "width": "model.width",
    "input_size": "model.input_size",
}
PATH_KEYS = ("data.root", "eval.pairs", "eval.root", "eval.bin")


@dataclass
class JobForm:
    dataset: str = DEMO
    model: str = "mobilefacenet"
    head: str = "arcface"
    lr: str = ""
    steps: str = ""
    batch_size: str = ""
    width: str = ""
    input_size: str = ""
    overrides: str = ""
    sweep: str = ""
    name: str = ""
    slots: str = ""
    priority: str = "0"
    executor: str = "local"

    @classmethod
    def from_form(cls, form: FormData) -> JobForm:
        names = {f.name for f in fields(cls)}
        return cls(**{key: str(value).strip() for key, value in form.items() if key in names})

    @classmethod
    def from_job(cls, job: Job) -> JobForm:
        """Pre-fill from a job's overrides: known keys into their fields, the rest into the free overrides."""
        form, rest = cls(name=f"{job.name}-clone", priority=str(job.priority), executor=job.executor), []
        by_key = {value: name for name, value in HYPERPARAMETERS.items()}
        for override in job.overrides:
            key, _, value = override.partition("=")
            if key in ("model", "head"):
                setattr(form, key, value)
            elif key in by_key:
                setattr(form, by_key[key], value)
            elif key == "data.root":
                form.dataset = override_value(override) or ""
            elif override not in ("data=folder", "data=demo"):
                rest.append(override)
        form.overrides = "\n".join(rest)
        form.slots = str(job.slots)
        return form

    def overrides_list(self, roots: list[Path]) -> list[str]:
        """All overrides for make_jobs; ValueError with one line for a bad field or a path outside the roots."""
        chosen: dict[str, str] = {}

        def put(override: str) -> None:
            chosen[override_key(override)] = override

        if self.dataset == DEMO:
            put("data=demo")
        else:
            root = confine(self.dataset, roots)
            if not root.is_dir():
                raise ValueError(f"dataset {self.dataset}: not a directory")
            put("data=folder")
            put(f"data.root={quoted_path(root)}")
        put(f"model={self.model}")
        put(f"head={self.head}")
        for name, key in HYPERPARAMETERS.items():
            if value := getattr(self, name):
                put(f"{key}={value}")
        for override in [*tokens(self.overrides, "overrides"), *tokens(self.sweep, "sweep")]:
            put(override)
        return [confined(override, roots) for override in chosen.values()]

    def number(self, name: str) -> int | None:
        """A whole-number field; None when left blank."""
        value = getattr(self, name)
        if not value:
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None


# An override runs to the next space or newline outside quotes; a quote may open mid-word (`data.root='/a b'`), as
# Hydra's grammar allows, and a backslash escapes the next character inside one.
OVERRIDE = re.compile(r"""(?:'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"|[^\s'"])+""")


def tokens(text: str, what: str) -> list[str]:
    """Overrides separated by spaces or newlines; quotes are kept for Hydra's own parser."""
    if OVERRIDE.sub(" ", text).strip():  # all that no override took is a quote left open
        raise ValueError(f"{what}: a quote is not closed")
    return OVERRIDE.findall(text)


def confined(override: str, roots: list[Path]) -> str:
    """A path override with each value (one, or a sweep's) the absolute path `confine` checked.

    The trainer would take a relative path from the scheduler's working directory, not from the root it was checked in.
    """
    key = override.partition("=")[0]
    if override_key(key) not in PATH_KEYS:
        return override
    values = []
    for [point] in expand_sweep([override]):
        value = point.partition("=")[2]
        if path := override_value(point):
            resolved = confine(path, roots)
            if not resolved.exists():
                raise ValueError(f"{point}: no such file or directory")
            value = quoted_path(resolved)
        values.append(value)
    return f"{key}={','.join(values)}"


def override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")
