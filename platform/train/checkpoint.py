"""Logical, world-size-independent checkpoints that reshard the classifier on load.

Layout of one checkpoint directory:
    model.pt                 backbone weights, model + train config, backbone optimizer, step
    head_<start>_<end>.pt    classifier rows [start, end) with their optimizer state (one file per writer rank)
    meta.json                class count, shard files, head optimizer step

Head files are named by global row ranges, not by rank, so a job with any W reads the rows it owns from
whichever files overlap them (memory-mapped, so no rank loads more than its share). A checkpoint is
written into a temporary directory and renamed into place, so a crash or a full disk leaves the previous
one intact.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from faceforge import models
from faceforge.parallel import HeadOptimizer, ShardedMarginSoftmax, barrier

LATEST = "latest"


def save_checkpoint(
    directory: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    head: ShardedMarginSoftmax | None,
    head_optimizer: HeadOptimizer | None,
    train_config: dict[str, Any],
    is_main: bool,
    identities: str | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Collective: every rank writes its head rows, rank 0 the rest (and `extra`, {file name: state}), then rank 0
    publishes it: what a resume needs is in the folder before `latest` names it. `identities` (the dataset's
    `identity_digest`) lets a resume tell that its classifier rows still stand for the same people."""
    final = directory / f"step_{step:08d}"
    staging = directory / f".step_{step:08d}.tmp"
    try:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        if head is not None and head_optimizer is not None:
            rows = {"weight": head.weight, **head_optimizer.state}
            _save(rows, staging / f"head_{head.class_start}_{head.class_end}.pt")
        barrier()
        if is_main:
            _save(
                {
                    "step": step,
                    "model_config": model.config,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "train_config": train_config,
                },
                staging / "model.pt",
            )
            for name, state in (extra or {}).items():
                _save(state, staging / name)
            meta = {"step": step}
            if head is not None and head_optimizer is not None:
                meta |= {
                    "num_classes": head.num_classes,
                    "embedding_dim": head.embedding_dim,
                    "head_optimizer": head_optimizer.kind,
                    "head_optimizer_steps": head_optimizer.step_count,
                    "head_files": sorted(p.name for p in staging.glob("head_*.pt")),
                    "identities": identities,
                }
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            _write_atomic(directory / LATEST, final.name)
    except BaseException:
        if is_main:  # a full disk must not stay filled by a half-written checkpoint
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    return final


def _save(obj: dict[str, Any], path: Path) -> None:
    """torch.save reports a full disk as an opaque `unexpected pos` RuntimeError: name the file and the likely cause."""
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        raise OSError(f"{path}: write failed, is the disk full? ({err})") from err


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or the directory holding `latest`."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "model.pt").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected model.pt or a 'latest' pointer)")
    return path


def read_model_state(path: Path, *keys: str) -> dict[str, Any]:
    """model.pt of a checkpoint (memory-mapped), refused with one ValueError line unless it is a readable dict with
    `keys`: a foreign or corrupt file handed to trainer.resume or init_from is then a config error, not a KeyError."""
    file = resolve_checkpoint(path) / "model.pt"
    state = load_file(file)
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{file} has no {', '.join(missing)}: not a FaceForge training checkpoint")
    return state


def load_file(file: Path, what: str = "PyTorch checkpoint") -> Any:
    """A checkpoint's file, memory-mapped; one ValueError line naming it when it cannot be read."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:  # OSError: mmap of a truncated file
        # torch's own messages run to paragraphs of unpickling advice, or blame mmap for a file of junk.
        raise ValueError(f"{file} is not a readable {what} ({type(err).__name__})") from None


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json; ValueError naming the file when it is damaged."""
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} is not a checkpoint's meta.json")
    return meta


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    head: ShardedMarginSoftmax | None,
    head_optimizer: HeadOptimizer | None,
) -> int:
    """Restore into already-built objects; the head takes its own rows from any sharding. Returns the step."""
    path = resolve_checkpoint(path)
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if head is not None and head_optimizer is not None:
        meta = read_meta(path)
        if meta.get("num_classes") != head.num_classes:
            raise ValueError(
                f"checkpoint {path} has {meta.get('num_classes')} classes, the dataset has {head.num_classes}"
            )
        tensors = {"weight": head.weight, **head_optimizer.state}
        for name in meta["head_files"]:
            start, end = (int(x) for x in name[len("head_") : -len(".pt")].split("_"))
            lo, hi = max(start, head.class_start), min(end, head.class_end)
            if lo >= hi:
                continue
            rows = torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
            for key, target in tensors.items():
                target[lo - head.class_start : hi - head.class_start] = rows[key][lo - start : hi - start]
        head_optimizer.step_count = int(meta["head_optimizer_steps"])
    return int(state["step"])


def load_backbone(path: str | Path) -> nn.Module:
    """Rebuild the backbone from a checkpoint alone (eval, export, embedding)."""
    state = read_model_state(Path(path), "model_config", "model")
    try:
        model = models.create(**state["model_config"])
        model.load_state_dict(state["model"])
    except (TypeError, RuntimeError) as err:  # a model_config edited or damaged apart from the weights
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(
            f"{path}: its weights do not fit the model it records ({lines[min(1, len(lines) - 1)]})"
        ) from None
    return model.eval()
