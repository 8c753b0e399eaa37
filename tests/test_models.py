"""Backbone registry: shapes at every supported input size, gradients, paper size, errors, rebuild, cards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faceforge import models
from faceforge.models.card import cards_markdown, count_macs, count_params, model_card, write_model_cards
from faceforge.models.layers import PReLU
from faceforge.models.shufflefacenet import concat_shuffle

from conftest import REPO

ALL_MODELS = models.list()
# shufflefacenet is only defined for widths 0.5-2.
SMALL_WIDTH = {name: 0.5 if name == "shufflefacenet" else 0.25 for name in ALL_MODELS}


def small(name: str, **kwargs: object) -> torch.nn.Module:
    return models.create(name, width=SMALL_WIDTH[name], embedding_dim=32, **kwargs)


def test_registry_lists_every_backbone() -> None:
    expected = ["iresnet18", "iresnet50", "mobilefacenet", "mobilenet_v1", "mobilenet_v2", "shufflefacenet"]
    assert models.list() == [*expected, "squeezenet", "xception"]
    assert models.list("mobile*") == ["mobilefacenet", "mobilenet_v1", "mobilenet_v2"]


@pytest.mark.parametrize("act", ["prelu", "relu"])
@pytest.mark.parametrize("input_size", [112, 56, 64])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape(name: str, input_size: int, act: str) -> None:
    model = small(name, input_size=input_size, act=act)
    assert (model.embedding_dim, model.input_size) == (32, input_size)
    act_type = torch.nn.PReLU if act == "prelu" else torch.nn.ReLU
    assert any(isinstance(m, act_type) for m in model.modules())
    x = torch.rand(2, 3, input_size, input_size) * 2 - 1
    out = model(x)
    assert out.shape == (2, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = small(name, input_size=56)
    model(torch.rand(2, 3, 56, 56) * 2 - 1).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_mobilefacenet_matches_paper_size() -> None:
    # Chen et al. 2018: 0.99M parameters and 221M MAdds at 112x112 with a 128-d embedding.
    model = models.create("mobilefacenet", embedding_dim=128)
    assert 0.99e6 <= count_params(model) <= 1.01e6
    assert count_macs(model, 112) == pytest.approx(221e6, rel=0.02)


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet9000'.*mobilefacenet"):
        models.create("resnet9000")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"act": "gelu"}, "activation"),
        ({"width": 0}, "width"),
        ({"width": -0.5}, "width"),
        ({"width": float("nan")}, "width must be a positive finite number"),
        ({"width": float("inf")}, "width must be a positive finite number"),
        ({"input_size": 16}, "input_size"),
        ({"input_size": 112.0}, "input_size"),
        ({"embedding_dim": 0}, "embedding_dim"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.create("mobilefacenet", **kwargs)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_concat_shuffle_interleaves_halves_in_their_memory_format(memory_format: torch.memory_format) -> None:
    x = torch.randn(2, 6, 5, 4).to(memory_format=memory_format)
    passthrough = x[:, :3]  # a channel slice, as in a stride-1 unit
    second = torch.randn(2, 3, 5, 4).to(memory_format=memory_format)
    shuffled = concat_shuffle(passthrough, second)
    reference = torch.cat((passthrough, second), dim=1).view(2, 2, 3, 5, 4).transpose(1, 2).reshape(2, 6, 5, 4)
    assert torch.equal(shuffled, reference)
    assert shuffled.is_contiguous(memory_format=memory_format)


def test_shufflefacenet_rejects_undefined_width() -> None:
    with pytest.raises(ValueError, match="width must be one of"):
        models.create("shufflefacenet", width=0.75)


def test_wrong_input_size_raises() -> None:
    model = small("mobilefacenet", input_size=64)
    with pytest.raises(ValueError, match="expects 64x64"):
        model(torch.zeros(2, 3, 56, 56))


def test_duplicate_registration_is_refused() -> None:
    def mobilefacenet(**kwargs: object) -> torch.nn.Module:
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        models.register(mobilefacenet)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_config_rebuilds_same_architecture(name: str) -> None:
    model = small(name, input_size=64, act="relu")
    assert model.config == {
        "name": name,
        "embedding_dim": 32,
        "width": SMALL_WIDTH[name],
        "input_size": 64,
        "act": "relu",
    }
    rebuilt = models.create(**model.config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


def test_config_keeps_its_own_copy_of_list_arguments() -> None:
    hidden = [16] * 15  # a pruned MobileFaceNet's expand widths
    model = models.create("mobilefacenet", embedding_dim=32, width=0.25, input_size=56, hidden=hidden)
    hidden[0] = 8
    assert model.config["hidden"][0] == 16
    assert models.create(**model.config).state_dict().keys() == model.state_dict().keys()


def test_model_card_on_tiny_model() -> None:
    threads = torch.get_num_threads()
    card = model_card("mobilefacenet", input_size=56, embedding_dim=64, width=0.25, latency_runs=3)
    assert torch.get_num_threads() == threads
    model = models.create("mobilefacenet", input_size=56, embedding_dim=64, width=0.25)
    assert (card.params, card.macs) == (count_params(model), count_macs(model, 56))
    assert model.training  # counting MACs must not leave the caller's model in eval mode
    assert card.latency_ms > 0
    table = cards_markdown([card])
    assert f"torch {torch.__version__}" in table
    assert "| mobilefacenet | 56 | 64 | 0.25 |" in table


def test_write_model_cards_has_a_row_per_model(tmp_path) -> None:
    path = tmp_path / "docs" / "models.md"
    cards = write_model_cards(path, input_size=56, embedding_dim=64, latency_runs=1)
    assert [c.name for c in cards] == ALL_MODELS
    text = path.read_text()
    assert all(f"| {name} | 56 | 64 | 1 |" in text for name in ALL_MODELS)
    with pytest.raises(IsADirectoryError, match="give the markdown file to write"):
        write_model_cards(tmp_path, latency_runs=1)


def test_models_command_prints_without_touching_the_docs(tmp_path: Path) -> None:
    """`faceforge models` is how a user looks at the backbones: it must not rewrite the repository's docs/models.md."""
    page = REPO / "docs" / "models.md"
    before = page.stat().st_mtime_ns
    listed = subprocess.run(
        [sys.executable, "-c", "from faceforge.cli import main; main()", "models", "--input-size", "56",
         "--embedding-dim", "32"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert all(f"| {name} | 56 | 32 | 1 |" in listed.stdout for name in ALL_MODELS)
    assert "written to" not in listed.stdout and page.stat().st_mtime_ns == before


@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (3, 5)])
def test_prelu_matches_torch_prelu_in_value_and_gradients(shape: tuple[int, ...]) -> None:
    ours, reference = PReLU(5), torch.nn.PReLU(5)
    ours.weight.data.uniform_(-1.0, 1.0)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(*shape, dtype=torch.float64)
    ours.double()(x_ours).mul(upstream).sum().backward()
    out_ref = reference.double()(x_ref)
    out_ref.mul(upstream).sum().backward()
    torch.testing.assert_close(ours(x), out_ref)
    with torch.no_grad():  # the inference forms, which evaluation and export use
        torch.testing.assert_close(ours(x), out_ref)
    torch.testing.assert_close(ours.eval()(x), out_ref)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)


def test_prelu_on_bfloat16_input_keeps_a_float32_slope_and_its_gradient() -> None:
    """`trainer.amp=true` feeds PReLU bfloat16 activations while its slope stays a float32 parameter."""
    ours, reference = PReLU(5), torch.nn.PReLU(5)
    ours.weight.data.uniform_(-1.0, 1.0)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(8, 5, 6, 6).bfloat16()
    upstream = torch.randn(8, 5, 6, 6).bfloat16()
    x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    out = ours(x_ours)
    out.backward(upstream)
    reference.double()(x_ref).backward(upstream.double())
    assert out.dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(x_ours.grad.double(), x_ref.grad, rtol=1e-2, atol=1e-2)
    # Each product grad*x is rounded to bfloat16 (relative error at most 2^-8) before the float32 sum: the bound is
    # on the sum of their sizes, since random signs can cancel the sum far below it (rtol 1e-2 failed 1 run in ~10).
    products = (upstream.double() * x.double() * (x < 0)).abs().sum(dim=(0, 2, 3))
    assert ((ours.weight.grad.double() - reference.weight.grad).abs() <= 2**-8 * products + 1e-6).all()


@pytest.mark.parametrize("name", ["mobilefacenet", "iresnet18"])
def test_backbones_train_under_bfloat16_autocast(name: str) -> None:
    model = models.create(name, embedding_dim=32, width=0.25, input_size=56).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 3, 56, 56))
    out.float().square().mean().backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
