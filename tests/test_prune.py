"""Channel pruning: MAC budgets, exactness (ratio 1, dead channels), rebuild from a checkpoint, fine-tuning."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from faceforge import models
from faceforge.models.card import count_macs, count_params
from faceforge.models.layers import PReLU
from faceforge.prune import apply_pruning, prunable_blocks, prune, select_channels
from faceforge.prune.cli import save_pruned
from faceforge.train.checkpoint import load_backbone
from faceforge.train.config import ConfigError

from conftest import CLI, REPO, tiny_config

BACKBONES = [("mobilefacenet", "prelu"), ("mobilefacenet", "relu"), ("mobilenet_v2", "prelu"), ("mobilenet_v2", "relu")]
SIZE = 56


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Batch-1 forwards of tiny models: a second thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_like(name: str, act: str, width: float = 0.5, seed: int = 0) -> nn.Module:
    """Random BN statistics, scales, shifts and PReLU slopes, as after training (fresh ones are 0/1 everywhere)."""
    torch.manual_seed(seed)
    model = models.create(name, width=width, input_size=SIZE, embedding_dim=32, act=act)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.2, 2)
                module.bias.uniform_(-1, 1)
            elif isinstance(module, PReLU):
                module.weight.uniform_(0, 0.5)
    return model.eval()


def faces(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize(("name", "act"), BACKBONES)
def test_ratio_one_rebuilds_the_same_function_exactly(name: str, act: str) -> None:
    model = trained_like(name, act)
    same = prune(model, macs_ratio=1.0)
    assert count_params(same) == count_params(model)
    with torch.no_grad():
        assert torch.equal(same.eval()(faces()), model(faces()))


@pytest.mark.parametrize(("name", "act"), BACKBONES[::2])
@pytest.mark.parametrize("criterion", ["bn", "l1"])
def test_pruned_macs_are_at_most_the_target_and_close_to_it(name: str, act: str, criterion: str) -> None:
    model = trained_like(name, act)
    full = count_macs(model, SIZE)
    one_channel = max(block.macs_per_channel for block in prunable_blocks(model))
    for ratio in (0.75, 0.5, 0.35):
        pruned = prune(model, macs_ratio=ratio, criterion=criterion)
        target = int(full * ratio)
        assert target - one_channel < count_macs(pruned, SIZE) <= target
        assert count_params(pruned) < count_params(model)
        assert pruned(faces()).shape == (4, 32)
    absolute = prune(model, target_macs=full // 2, criterion=criterion)
    assert count_macs(absolute, SIZE) <= full // 2
    assert count_macs(model, SIZE) == full  # the input model is left as it is


@pytest.mark.parametrize(("name", "act"), BACKBONES)
def test_removing_dead_channels_leaves_the_outputs_unchanged(name: str, act: str) -> None:
    """gamma = beta = 0 makes a hidden channel act(0) = 0 after its expand stage; the depthwise BN then turns it
    into a constant, which pruning must fold into the project BN for the outputs to stay the same."""
    model = trained_like(name, act)
    blocks = prunable_blocks(model)
    dead, saved = {}, 0
    with torch.no_grad():
        for block in blocks[::2]:
            channels = torch.arange(1, block.width, 3)
            block.block.layers[0][1].weight[channels] = 0
            block.block.layers[0][1].bias[channels] = 0
            dead[block.position] = set(channels.tolist())
            saved += len(channels) * block.macs_per_channel
    full = count_macs(model, SIZE)
    keep = select_channels(model, full - saved, criterion="bn")
    for block in blocks:
        kept = set(keep[block.position].tolist())
        assert kept == set(range(block.width)) - dead.get(block.position, set())
    pruned = apply_pruning(model, keep).eval()
    assert count_macs(pruned, SIZE) == full - saved
    with torch.no_grad():
        torch.testing.assert_close(pruned(faces()), model(faces()), atol=1e-5, rtol=1e-5)


def test_l1_criterion_removes_the_smallest_expand_filters_first() -> None:
    model = trained_like("mobilefacenet", "prelu")
    blocks = prunable_blocks(model)
    with torch.no_grad():
        blocks[0].block.layers[0][0].weight[:4] *= 1e-3
    one_block_four_channels = count_macs(model, SIZE) - 4 * blocks[0].macs_per_channel
    keep = select_channels(model, one_block_four_channels, criterion="l1")
    assert keep[blocks[0].position].tolist() == list(range(4, blocks[0].width))
    assert all(len(keep[b.position]) == b.width for b in blocks[1:])


def test_min_channels_and_an_unreachable_budget() -> None:
    model = trained_like("mobilefacenet", "relu")
    pruned = prune(model, macs_ratio=0.35, min_channels=16)
    assert min(pruned.config["hidden"]) >= 16
    with pytest.raises(ValueError, match=r"cannot reach 1,000 MACs: with min_channels=8"):
        prune(model, target_macs=1000)
    with pytest.raises(ValueError, match="exactly one of target_macs and macs_ratio"):
        prune(model)
    with pytest.raises(ValueError, match="macs_ratio must be in"):
        prune(model, macs_ratio=1.5)
    with pytest.raises(ValueError, match="unknown pruning criterion 'l2'"):
        prune(model, macs_ratio=0.5, criterion="l2")


@pytest.mark.parametrize("name", ["mobilenet_v1", "iresnet18", "shufflefacenet", "squeezenet", "xception"])
def test_unsupported_backbone_is_refused_in_one_line(name: str) -> None:
    model = models.create(name, width=0.5, input_size=SIZE, embedding_dim=32)
    with pytest.raises(ValueError, match=f"supports mobilefacenet, mobilenet_v2.*not '{name}'") as err:
        prune(model, macs_ratio=0.5)
    assert "\n" not in str(err.value)


def test_pruned_checkpoint_round_trips_through_load_backbone(tmp_path: Path) -> None:
    model = trained_like("mobilenet_v2", "prelu")
    pruned = prune(model, macs_ratio=0.5).eval()
    save_pruned(pruned, tmp_path / "pruned", {"criterion": "bn"})
    with pytest.raises(FileExistsError, match=r"pruned already holds a checkpoint \(model\.pt\)"):
        save_pruned(pruned, tmp_path / "pruned", {"criterion": "l1"})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("step_00000010")  # a run's checkpoints folder
    with pytest.raises(FileExistsError, match=r"run already holds a checkpoint \(latest\)"):
        save_pruned(pruned, tmp_path / "run", {"criterion": "bn"})
    loaded = load_backbone(tmp_path / "pruned")
    assert loaded.config == pruned.config and "hidden" not in model.config
    assert count_params(loaded) == count_params(models.create(**pruned.config)) < count_params(model)
    with torch.no_grad():
        assert torch.equal(loaded(faces()), pruned(faces()))


def test_init_from_must_be_a_checkpoint(tiny_train_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^trainer.init_from: no checkpoint at .*nope"):
        tiny_config(tmp_path / "run", tiny_train_root, None, init_from=str(tmp_path / "nope"))


@pytest.mark.slow
def test_prune_command_fine_tunes_from_the_pruned_weights(tiny_train_root: Path, tmp_path: Path) -> None:
    source = trained_like("mobilefacenet", "prelu")
    (tmp_path / "trained").mkdir()
    torch.save({"model_config": source.config, "model": source.state_dict()}, tmp_path / "trained" / "model.pt")
    run = tmp_path / "run"
    overrides = [
        f"data.root={tiny_train_root}",
        "eval=none",
        "model.width=0.25",  # replaced by the pruned checkpoint's own model config
        "data.batch_size=8",
        "data.num_workers=0",
        "trainer.steps=3",
        "trainer.log_every=1",
        "optim.lr=1e-6",
        "optim.weight_decay=0",
        "mlflow.log_model=false",
        f"hydra.run.dir={run}",
    ]
    result = subprocess.run(
        [*CLI, "prune", str(tmp_path / "trained"), "--macs-ratio", "0.5", "--out", str(tmp_path / "pruned"),
         *overrides],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "FACEFORGE_HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pruned checkpoint: {tmp_path / 'pruned'}" in result.stdout

    pruned, tuned = load_backbone(tmp_path / "pruned"), load_backbone(run / "checkpoints")
    assert tuned.config == pruned.config and tuned.config["width"] == 0.5
    assert count_macs(pruned, SIZE) <= count_macs(source, SIZE) // 2
    # Three steps at lr 1e-6 barely move the convolutions: training started from the pruned weights.
    for (key, before), after in zip(pruned.state_dict().items(), tuned.state_dict().values(), strict=True):
        if key.endswith("weight") and before.dim() == 4:
            torch.testing.assert_close(after, before, atol=1e-3, rtol=0)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["init_from"] == str(tmp_path / "pruned") and config["model"]["width"] == 0.5
