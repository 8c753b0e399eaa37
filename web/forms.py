"""The job form as Hydra overrides, and back (for clone-with-edits).

Later overrides replace earlier ones with the same key (the free overrides, then the sweep grammar), but a
hyperparameter field and an override of its key are refused: one of the two would be silently lost. So is an
override that leaves out what the Backbone, Head or Dataset select chose (one that keeps it, a sweep, loses none).
Paths in overrides are confined to the data roots, and stored as the absolute paths checked, before composing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from faceforge.eval.sources import MLFLOW_SCHEMES
from faceforge.jobs import Job, expand_sweep, faceforge_home, override_key, override_value, quoted_path
from faceforge.train.app import CONFIG_DIR
from faceforge.web.datasets import DEMO, Dataset, confine, demo_dataset

# Form field -> config key; blank means the config's default.
HYPERPARAMETERS = {
    "lr": "optim.lr",
    "steps": "trainer.steps",
    "batch_size": "data.batch_size",
    "width": "model.width",
    "input_size": "model.input_size",
}
# Data a job reads: inside the data roots.
PATH_KEYS = ("data.root", "eval.pairs", "eval.root", "eval.bin")
# The MLflow models a web job may name: a registered version or a run's logged model, never a path within either.
WEB_MODEL_URI = re.compile(r"models:/[\w-]+(@[\w-]+|/\d+)|runs:/[0-9a-f]{32}/model")
# The platform's own files a job starts from or writes: inside the data roots or $FACEFORGE_HOME.
HOME_PATH_KEYS = ("trainer.init_from", "distill.teacher", "distill.cache_dir")
# Web jobs log to the platform's MLflow database, which the pages read: never chosen in the form.
FIXED_KEYS = ("mlflow.tracking_uri",)


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
    def from_form(cls, form: Mapping[str, Any]) -> JobForm:
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
            elif key == "data.root" and "data=folder" in job.overrides:  # data=demo takes a root as an override
                form.dataset = override_value(override) or ""
            elif override not in ("data=folder", "data=demo"):
                rest.append(override)
        form.overrides = "\n".join(rest)
        form.slots = str(job.slots)
        return form

    def overrides_list(self, roots: list[Path]) -> list[str]:
        """All overrides for make_jobs; ValueError with one line for a bad field or a path outside the roots."""
        for name in ("model", "head", *HYPERPARAMETERS, "overrides", "sweep"):
            if "${" in getattr(self, name):  # resolved in the server: ${oc.env:...} would put its secrets on a page
                raise ValueError(f"{name}: interpolations (${{...}}) cannot be used from the web form")
        chosen: dict[str, str] = {}

        def put(override: str) -> None:
            chosen[override_key(override)] = override

        # Config key -> (select, its choice). The demo's recipe may take another root (a clone keeps one), so only a
        # folder's select holds data.root.
        selected = {"model": ("model", self.model), "head": ("head", self.head), "data": ("dataset", DEMO)}
        if self.dataset == DEMO:
            put("data=demo")
        else:
            root = confine(self.dataset, roots)
            if not looked_up(root, Path.is_dir, f"dataset {self.dataset}"):
                raise ValueError(f"dataset {self.dataset}: not a directory")
            put("data=folder")
            put(f"data.root={quoted_path(root)}")
            selected |= {"data": ("dataset", "folder"), "data.root": ("dataset", str(root))}
        put(f"model={self.model}")
        put(f"head={self.head}")
        fields = self.field_overrides()
        for override in fields:
            put(override)
        typed = {override_key(override): name for override, name in zip(fields, self.filled(), strict=True)}
        for override in self.typed_overrides():
            key = override_key(override)
            if (name := typed.get(key)) is not None:  # one of the two would silently lose
                raise ValueError(f"{name} is also set in the overrides ({override}): set it in one place")
            # A select cannot be left blank: an override of its key is taken while it keeps the choice (a sweep).
            if key in selected and selected[key][1] not in values(confined(override, roots)):
                select = selected[key][0]
                raise ValueError(f"{select} is also set in the overrides ({override}), leaving out the {select} chosen")
            put(override)
        return [confined(override, roots) for override in chosen.values()]

    def filled(self) -> list[str]:
        return [name for name in HYPERPARAMETERS if getattr(self, name)]

    def field_overrides(self) -> list[str]:
        """The hyperparameter fields filled in, as overrides (each may hold a sweep: `0.1,0.05`)."""
        return [f"{HYPERPARAMETERS[name]}={getattr(self, name)}" for name in self.filled()]

    def typed_overrides(self) -> list[str]:
        return [*tokens(self.overrides, "overrides"), *tokens(self.sweep, "sweep")]

    def number(self, name: str) -> int | None:
        """A whole-number field; None when left blank."""
        value = getattr(self, name)
        if not value:
            return None
        if not re.fullmatch(r"[+-]?[0-9]+", value):  # int() also takes "١٢" and "1_000"
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)


# Far more than any real list of overrides; it bounds what a request can make the server parse.
MAX_OVERRIDE_CHARS = 65_536


def tokens(text: str, what: str) -> list[str]:
    """Overrides separated by spaces or newlines; quotes are kept for Hydra's own parser.

    An override runs to the next space or newline outside quotes; a quote may open mid-word (`data.root='/a b'`),
    as Hydra's grammar allows, and a backslash escapes the next character inside one. One pass, so the time is
    linear in the text (a backtracking regex took seconds on a few KB of quotes and backslashes).
    """
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ValueError(f"{what}: {len(text)} characters, more than the {MAX_OVERRIDE_CHARS} allowed")
    found: list[str] = []
    current: list[str] = []
    quote, escaped = "", False
    for char in text:
        if quote:
            current.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char.isspace():
            if current:
                found.append("".join(current))
                current = []
        else:
            current.append(char)
            if char in "'\"":
                quote = char
    if quote:
        raise ValueError(f"{what}: a quote is not closed")
    if current:
        found.append("".join(current))
    return found


def confined(override: str, roots: list[Path]) -> str:
    """A path override with each value (one, or a sweep's) the absolute path `confine` checked.

    The trainer would take a relative path from the scheduler's working directory, not from the root it was checked in.
    """
    key = override.partition("=")[0]
    name = override_key(key)
    if "@" in name:
        raise ValueError(f"{key}: package overrides (@) cannot be used from the web form")
    if name in FIXED_KEYS:
        raise ValueError(f"{name} cannot be set from the web form: web jobs log to the platform's MLflow")
    guarded = [k for k in (*PATH_KEYS, *HOME_PATH_KEYS, *FIXED_KEYS) if k.startswith(f"{name}.")]
    if guarded and not all(is_group_choice(name, override_value(point)) for [point] in expand_sweep([override])):
        raise ValueError(f"{override}: only a config of configs/{name}/ may be chosen; set {guarded[0]} on its own")
    if name not in (*PATH_KEYS, *HOME_PATH_KEYS):
        return override
    allowed = roots if name in PATH_KEYS else [*roots, faceforge_home()]
    values = []
    for [point] in expand_sweep([override]):
        value = point.partition("=")[2]
        path = override_value(point)
        if name == "data.root" and path == "":  # the trainer would read the working directory
            raise ValueError(f"{point} names no dataset: choose one in the Dataset select")
        if path and path.startswith(MLFLOW_SCHEMES):  # a registered teacher is a name, not a file
            if not WEB_MODEL_URI.fullmatch(path):
                raise ValueError(f"{point}: give models:/<name>@<alias>, models:/<name>/<version> or runs:/<id>/model")
        elif path:
            resolved = confine(path, allowed)
            if name != "distill.cache_dir" and not looked_up(resolved, Path.exists, point):  # the cache is made
                raise ValueError(f"{point}: no such file or directory")
            value = quoted_path(resolved)
        values.append(value)
    return f"{key}={','.join(values)}"


def looked_up(path: Path, test: Callable[[Path], bool], what: str) -> bool:
    """`test(path)`; ValueError naming `what` for a path the system refuses to look up (a name longer than it allows),
    which pathlib raises rather than answering no."""
    try:
        return test(path)
    except OSError as err:
        raise ValueError(f"{what}: {err.strerror}") from None


def values(override: str) -> list[str | None]:
    """What an override sets, one value per sweep point."""
    return [override_value(point) for [point] in expand_sweep([override])]


def trained_datasets(overrides: list[str]) -> list[Dataset]:
    """The datasets the jobs of `overrides` (checked by `overrides_list`) train on: each data.root, else the demo's."""
    values = [
        override_value(point)
        for override in overrides
        if override_key(override) == "data.root"
        for [point] in expand_sweep([override])
    ]
    return [Dataset(Path(v).name, Path(v), v) if v else demo_dataset() for v in dict.fromkeys(values or [None])]


def is_group_choice(group: str, value: str | None) -> bool:
    """Whether `value` names one of the group's config files (`data=folder`), not a whole node (`data={root:...}`)."""
    if value is None or not re.fullmatch(r"[\w-]+", value):
        return False
    return (CONFIG_DIR / group / f"{value}.yaml").is_file()
