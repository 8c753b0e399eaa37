"""docs/configuration.md is generated from configs/; this keeps it current and its parser honest."""

from __future__ import annotations

from faceforge.train.app import CONFIG_DIR
from faceforge.train.reference import configuration_reference, key_comments, split_description

from conftest import REPO


def test_configuration_reference_is_current() -> None:
    expected = configuration_reference(CONFIG_DIR)
    assert (REPO / "docs" / "configuration.md").read_text() == expected, "run `faceforge config-reference`"


def test_reference_lists_every_group_option_and_key() -> None:
    text = configuration_reference(CONFIG_DIR)
    for group in ("model", "head", "data", "optim", "schedule", "trainer", "eval"):
        assert f"## `{group}`" in text
    assert "`head=cosface`" in text and "`trainer.grad_clip`" in text and "`mlflow.tracking_uri`" in text


def test_comments_attach_to_the_key_below_them_including_nested_keys() -> None:
    text = "# What the option is.\n# Second line.\n\n# about a\na: 1\nb:\n  # about c\n  c: 2\nd: 3\n"
    description, body = split_description(text)
    assert description == "What the option is. Second line."
    assert key_comments(body) == {"a": "about a", "b.c": "about c"}
