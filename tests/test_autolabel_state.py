"""The auto-labeller's state database: a damaged one is reported in one line, and outcome names fit the filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from markupsafe import escape

from faceforge.data_pipeline.autolabel import Autolabeller
from faceforge.data_pipeline.autolabel_state import StateDB, outcome_name

from test_autolabel import config, faceforge_cli, inputs, save_backbone
from test_web import BEARER, Server


@pytest.fixture
def corrupt_workdir(tmp_path: Path) -> Path:
    """$FACEFORGE_HOME/autolabel whose state.db holds random bytes."""
    workdir = tmp_path / "home" / "autolabel"
    (workdir / "versions").mkdir(parents=True)
    (workdir / "state.db").write_bytes(os.urandom(5000))
    return workdir


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_corrupt_state_database_is_one_line_and_left_in_place(corrupt_workdir: Path, tmp_path: Path) -> None:
    before = files_under(corrupt_workdir)
    with pytest.raises(ValueError, match=r"state\.db: not a readable state database .* move it aside"):  # one line
        StateDB(corrupt_workdir / "state.db")
    inbox = tmp_path / "inbox"
    (inbox / "album").mkdir(parents=True)
    home = corrupt_workdir.parent
    for argv in (("autolabel", "run", str(inbox)), ("autolabel", "status"), ("data", "list")):
        done = faceforge_cli(*argv, "--workdir", str(corrupt_workdir), home=home)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        (line,) = done.stderr.splitlines()
        assert f"{corrupt_workdir / 'state.db'}: not a readable state database" in line and "move it aside" in line
    after = files_under(corrupt_workdir)
    assert {name: after.get(name) for name in before} == before, "nothing is deleted or rewritten"


def test_the_datasets_page_shows_a_corrupt_state_database(
    corrupt_workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = corrupt_workdir.parent
    monkeypatch.setenv("FACEFORGE_HOME", str(home))
    server = Server(home, [])
    try:
        page = server.get("/datasets", headers=BEARER)
    finally:
        server.stop()
    assert page.status_code == 200, page.text
    assert f'id="autolabel-error" class="error">{escape(corrupt_workdir / "state.db")}: not a readable' in page.text


@pytest.mark.parametrize(
    "name",
    [
        "photo.jpg",
        "x." + "e" * 253,  # the suffix alone is longer than what is left after the id
        "a." + "é" * 126,  # a long suffix of two-byte characters
        "é" * 125 + ".jpg",  # a long stem of two-byte characters
        "." + "€" * 84,  # a dot-file: all stem, three-byte characters
    ],
)
def test_outcome_names_fit_255_bytes_keep_their_id_and_whole_characters(name: str, tmp_path: Path) -> None:
    assert len(name.encode()) <= 255
    for file_id in (7, 123456789):
        result = outcome_name(file_id, name)
        assert len(result.encode()) <= 255 and result.startswith(f"{file_id}_")
        stem, suffix = Path(name).stem, Path(name).suffix
        kept = result.removeprefix(f"{file_id}_")
        # Whole characters of the stem's start then of the suffix's start: nothing split, nothing added.
        assert any(kept == stem[:i] + suffix[: len(kept) - i] for i in range(len(stem) + 1)), kept
        if len(f"{file_id}_{name}".encode()) <= 255:
            assert result == f"{file_id}_{name}"
        (tmp_path / result).write_bytes(b"")  # the filesystem takes it


def test_a_file_with_a_long_suffix_leaves_the_inbox(tmp_path: Path) -> None:
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album").mkdir(parents=True)
    name = "x." + "e" * 253
    (inbox / "album" / name).write_text("not a photo")
    logs: list[str] = []
    labeller = Autolabeller(inbox, workdir, config(save_backbone(tmp_path / "model", seed=0)), log=logs.append)
    labeller.run_once()
    assert inputs(inbox) == [], logs
    (moved,) = (workdir / "error" / "album").iterdir()
    assert moved.read_text() == "not a photo" and moved.name.startswith("1_x.eee")
