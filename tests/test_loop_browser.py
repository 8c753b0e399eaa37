"""The whole loop end to end: `faceforge demo --profile tiny` runs every stage through its own scheduler and web
UI, then chromium checks what it left: the new dataset versions, the sweep's champion and the int8 export."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Page, expect
from test_browser import CHROMIUM, _free_port, logged_in

from conftest import shared_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
]
TOKEN = "loop-browser-test-token"
LOOP_SECONDS = 300  # the tiny loop: six training processes, two MTCNN rounds and an export on 2 cores
STAGES = ("data", "services", "base model", "label round 1", "sweep", "distill", "export int8", "label round 2")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, str]]:
    """(web URL, demo home, demo output) of a finished tiny demo that keeps serving its web UI."""
    shared_data()
    home = tmp_path_factory.mktemp("loop") / "demo"
    env = os.environ | {"FACEFORGE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", "from faceforge.cli import main; main()", "demo", "--profile", "tiny"]
    command += ["--home", str(home), "--port", str(_free_port()), "--keep-serving"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + LOOP_SECONDS
    try:
        while not any("serving the web UI at" in line for line in lines):
            line = process.stdout.readline()
            assert line or process.poll() is None, "the demo ended before serving:\n" + "".join(lines[-40:])
            assert time.monotonic() < deadline, "the tiny loop took too long:\n" + "".join(lines[-40:])
            lines.append(line)
        url = re.search(r"serving the web UI at (\S+)", lines[-1]).group(1)  # type: ignore[union-attr]
        yield url, home, "".join(lines)
    finally:
        children = json.loads((home / "demo.json").read_text())["children"] if (home / "demo.json").is_file() else {}
        # SIGTERM, which the demo takes as Ctrl-C: SIGINT is ignored by every process of a background shell job.
        process.send_signal(signal.SIGTERM)
        while (line := process.stdout.readline()) and "stopping jobs and servers" not in line:
            lines.append(line)
        process.send_signal(signal.SIGTERM)  # an impatient second Ctrl-C: ignored while the demo stops
        # Drain the pipe while waiting: a demo blocked writing to a full pipe could never exit.
        rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0, rest
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    for pid, _ in children.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped by the demo, which waited for it


@pytest.fixture(scope="module")
def page(demo: tuple[str, Path, str]) -> Iterator[Page]:
    with logged_in(demo[0], TOKEN, "/queue") as page:
        yield page


def test_the_demo_prints_every_stage_and_where_to_look(demo: tuple[str, Path, str]) -> None:
    _, home, output = demo
    table = output[output.index("stage  ") :]
    for stage in STAGES:
        assert re.search(rf"^{stage} +\d", table, re.MULTILINE), f"no summary row for {stage}"
    assert re.search(r"F before -> after pairwise \d\.\d{3} -> \d\.\d{3}", table)
    assert re.search(r"int8 \d+ KiB, \d+\.\d\d ms", table)
    assert f"faceforge mlflow-ui --tracking-uri sqlite:///{home.resolve()}/mlflow.db" in output
    assert json.loads((home / "demo.json").read_text())["complete"]


def test_datasets_page_shows_both_rounds(page: Page, demo: tuple[str, Path, str]) -> None:
    page.click("nav >> text=Datasets")
    versions = page.locator("#dataset-versions tbody tr")
    expect(versions).to_have_count(2)
    expect(versions.first).to_contain_text("v0002")
    expect(page.locator("#datasets")).to_contain_text("union")  # the sweep's training set: base + v0001


def test_sweep_page_shows_the_champion(page: Page, demo: tuple[str, Path, str]) -> None:
    _, home, _ = demo
    sweep = json.loads((home / "demo.json").read_text())["stages"]["sweep"]["values"]["sweep"]
    page.click("nav >> text=Models")
    page.click(f"#versions tr.champion a[href='/sweeps/{sweep}']")
    page.wait_for_url(re.compile(rf"/sweeps/{sweep}$"))
    expect(page.locator("#sweep-points tbody tr")).to_have_count(2)
    expect(page.locator("#champion")).to_contain_text("current champion")
    expect(page.locator("#sweep-points tr.champion")).to_have_count(1)


def test_models_page_shows_the_int8_export_and_its_card(page: Page, demo: tuple[str, Path, str]) -> None:
    page.click("nav >> text=Models")
    export = page.locator("#other-exports tbody tr").first
    expect(export).to_contain_text("onnx-int8")
    expect(export).to_contain_text("model_int8.onnx")
    expect(export).to_contain_text("card.json")
    expect(export).to_contain_text(re.compile(r"\d+\.\d\d ms\s+\(\d+\.\d\dx\)"))  # int8 latency, speed-up
