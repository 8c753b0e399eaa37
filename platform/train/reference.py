"""The configuration reference (docs/configuration.md), generated from configs/ so it never drifts from them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from faceforge.train.tracking import flatten

_KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w]*):")


def split_description(text: str) -> tuple[str, list[str]]:
    """A config file's leading comment block (what the option is) and the lines after it."""
    lines = text.splitlines()
    count = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return " ".join(line.lstrip("#").strip() for line in lines[:count]), lines[count:]


def key_comments(lines: list[str]) -> dict[str, str]:
    """The comment lines written just above each (dotted) key."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    parents: list[tuple[int, str]] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = _KEY_LINE.match(line)
        if match:
            indent, key = len(match.group(1)), match.group(2)
            parents = [(i, k) for i, k in parents if i < indent]
            if pending:
                comments[".".join([k for _, k in parents] + [key])] = " ".join(pending)
            parents.append((indent, key))
        pending = []
    return comments


def _cell(value: Any) -> str:
    return "`null`" if value is None else f"`{value}`"


def _group_section(group_dir: Path, default: str) -> list[str]:
    files = {path.stem: path for path in sorted(group_dir.glob("*.yaml"))}
    description, body = split_description(files[default].read_text())
    base = flatten(yaml.safe_load(files[default].read_text()) or {})
    comments = key_comments(body)
    options = ", ".join(f"`{name}`" for name in files)
    lines = [f"## `{group_dir.name}`", "", f"Options: {options}. Default `{default}`: {description}", ""]
    lines += ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{group_dir.name}.{key}` | {_cell(value)} | {comments.get(key, '')} |" for key, value in base.items()]
    others = []
    for name, path in files.items():
        if name != default:
            values = flatten(yaml.safe_load(path.read_text()) or {})
            changed = ", ".join(f"`{key}={value}`" for key, value in values.items() if base.get(key, object()) != value)
            others.append(f"- `{group_dir.name}={name}`: {split_description(path.read_text())[0]} Sets {changed}.")
    return [*lines, *(["", *others] if others else []), ""]


def configuration_reference(config_dir: Path) -> str:
    primary_text = (config_dir / "train.yaml").read_text()
    primary = yaml.safe_load(primary_text)
    defaults = {
        group: option for entry in primary["defaults"] if isinstance(entry, dict) for group, option in entry.items()
    }
    lines = [
        "# Configuration reference",
        "",
        "Generated from `configs/` by `faceforge config-reference` (a test checks that it is current). Every key can",
        "be overridden on the command line (`faceforge train optim.lr=0.05`), and a group can be switched as a whole",
        "(`faceforge train model=shufflefacenet`). Values are checked once, before any process starts.",
        "",
    ]
    for group, option in defaults.items():
        lines += _group_section(config_dir / group, option)
    comments = key_comments(split_description(primary_text)[1])
    top = flatten({key: value for key, value in primary.items() if key not in ("defaults", "hydra")})
    lines += ["## Top-level keys (`train.yaml`)", "", "| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {_cell(value)} | {comments.get(key, '')} |" for key, value in top.items()]
    lines += ["", *_file_section(config_dir / "autolabel.yaml")]
    return "\n".join(lines) + "\n"


def _file_section(path: Path) -> list[str]:
    """A stand-alone config file (not a group of the trainer): its description and keys."""
    description, body = split_description(path.read_text())
    comments = key_comments(body)
    values = flatten(yaml.safe_load(path.read_text()) or {})
    lines = [f"## `{path.name}`", "", description, "", "| key | default | meaning |", "| --- | --- | --- |"]
    return lines + [f"| `{key}` | {_cell(value)} | {comments.get(key, '')} |" for key, value in values.items()]
