"""Ctrl-C (SIGINT to the terminal's whole process group) and SIGTERM during `faceforge data align`: its workers
print nothing and stop with their parent at once, and a rerun aligns the rest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from faceforge.data_pipeline.align import stops_deferred

from conftest import shared_data

# A shell's background job (CI, `cmd &`) starts with SIGINT ignored, which the CLI and its workers would inherit;
# a terminal's foreground job does not.
CLI = [sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "from faceforge.cli import main; main()"]  # fmt: skip
PHOTOS = 64
CHUNK = 8  # `faceforge data align` photos per chunk: a worker writes a chunk's crops once it has detected them all


def align_workers(pid: int) -> list[int]:
    """The live align worker processes of `pid` (spawned; not its multiprocessing resource tracker)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            state, parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if int(parent) == pid and state != "Z" and b"spawn_main" in command:
            found.append(int(proc.name))
    return found


def worker_starting(pid: int) -> bool:
    """Whether an align worker of `pid` has its Python up (it catches SIGINT, Python's own handler) and is still
    importing what it runs: before that, a SIGINT ends it silently; after, the align pool set its workers up."""
    for worker in align_workers(pid):
        try:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{worker}/status").read_text().splitlines())
        except OSError:
            continue
        if int(status["SigCgt"], 16) >> (signal.SIGINT - 1) & 1:
            return True
    return False


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie has stopped, its parent just has not reaped it)."""
    running = []
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.append(pid)
        except OSError:
            continue
    return running


def signal_group_when(
    command: list[str], sig: signal.Signals, ready: Callable[[int], bool], stderr: Path, timeout: float = 120
) -> tuple[int, str]:
    """Run `command` in a session of its own and, once `ready(pid)`, send `sig` to its whole process group as a
    terminal's Ctrl-C does; (exit code, stderr). Every align worker it had must have ended with it."""
    with stderr.open("w") as err:
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready(run.pid):
            assert run.poll() is None, f"ended before the signal:\n{stderr.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready within {timeout} s:\n{stderr.read_text()[-3000:]}"
            time.sleep(0.05)
        workers = align_workers(run.pid)
        os.killpg(run.pid, sig)
        sent = time.monotonic()
        code = run.wait(timeout=90)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    while alive(workers) and time.monotonic() < sent + 30:
        time.sleep(0.1)
    assert not alive(workers), "align workers outlived their parent"
    return code, stderr.read_text()


def recorded(dst: Path) -> list[dict]:
    """The manifest's whole records (a line torn by the stop is left out, as a rerun leaves it out)."""
    records = []
    for line in (dst / "manifest.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "when"),
    [(signal.SIGINT, "starting"), (signal.SIGINT, "running"), (signal.SIGTERM, "running")],
    ids=["ctrl-c-as-workers-start", "ctrl-c-mid-run", "sigterm-mid-run"],
)
def test_an_interrupted_align_stops_its_workers_quietly_and_at_once_and_a_rerun_resumes(
    tmp_path: Path, sig: signal.Signals, when: str
) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    people = sorted(p for p in (shared_data() / "celeba_ids").iterdir() if p.is_dir())
    photos = [photo for person in people[:6] for photo in sorted(person.glob("*.jpg"))][:PHOTOS]
    for photo in photos:
        (src / photo.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, src / photo.parent.name / photo.name)
    manifest = dst / "manifest.jsonl"
    ready = {
        "starting": worker_starting,
        "running": lambda pid: manifest.is_file() and manifest.stat().st_size > 0,
    }[when]
    align = [*CLI, "data", "align", str(src), str(dst), "--workers", "2"]

    code, stderr = signal_group_when(align, sig, ready, tmp_path / "stderr")

    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, stderr
    if sig == signal.SIGINT:
        assert code == 1 and stderr.strip().splitlines()[-1].startswith("faceforge data align: interrupted; rerun")
    else:
        assert code == -sig
    done = {record["source"] for record in recorded(dst)}
    crops = list(dst.rglob("*.jpg"))
    assert len(crops) <= len(done) + 2 * CHUNK, "the workers went on with the queue after their parent stopped"

    rerun = subprocess.run(align, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"images={PHOTOS}  skipped={len(done)}  " in rerun.stdout
    sources = sorted(record["source"] for record in recorded(dst))
    assert sources == sorted(f"{photo.parent.name}/{photo.name}" for photo in photos)


def test_a_stop_the_process_handles_is_held_back_while_workers_spawn() -> None:
    """The demo turns SIGTERM into KeyboardInterrupt too: raised inside a worker's start (a group's SIGTERM that
    lands before the fork of the second), the pid is lost before the worker got its instructions, and the orphan
    printed an EOFError traceback once its parent had gone. Like a Ctrl-C, it is noted and raised after the spawn."""
    spawned: list[bool] = []

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), stops_deferred():
            signal.raise_signal(signal.SIGTERM)  # its handler runs at the next bytecode: here, mid-spawn
            spawned.append(True)
        assert spawned, "the stop was raised while workers were being spawned"
        # A spawn that fails meanwhile (the same SIGTERM killed a new worker: BrokenProcessPool) keeps the stop.
        with pytest.raises(KeyboardInterrupt), stops_deferred():
            signal.raise_signal(signal.SIGTERM)
            raise RuntimeError("a worker died while the pool spawned it")
    finally:
        signal.signal(signal.SIGTERM, previous)
