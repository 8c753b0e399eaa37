"""Shared fixtures: small real-face datasets cut from ../shared/data (CI always has it), and a running scheduler."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from faceforge.train import TrainConfig, from_dict

REPO = Path(__file__).resolve().parents[1]
CLI_MAIN = "from faceforge.cli import main; main()"
CLI = [sys.executable, "-c", CLI_MAIN]
SHARED = REPO.parent / "shared" / "data"
_CHECKOUT_BEFORE = pytest.StashKey[set[str]]()


def _untracked_in_checkout() -> set[str]:
    """What git lists as untracked or ignored in the checkout (Python's and pytest's caches aside): a test run must
    add nothing."""
    listed = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True)
    return {line for line in listed.stdout.splitlines() if not any(c in line for c in ("__pycache__", ".pytest_cache"))}


def _is_xdist_worker(session: pytest.Session) -> bool:
    """The controller checks the checkout, before the workers start and once all have finished."""
    return hasattr(session.config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _is_xdist_worker(session):
        session.config.stash[_CHECKOUT_BEFORE] = _untracked_in_checkout()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _is_xdist_worker(session):
        return
    if added := _untracked_in_checkout() - session.config.stash[_CHECKOUT_BEFORE]:
        print(f"\nthe tests wrote into the checkout: {', '.join(sorted(added))}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def faceforge_home_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The platform's home defaults to ./runs, in the checkout when tests run from it: tests get one of their own."""
    os.environ["FACEFORGE_HOME"] = str(tmp_path_factory.mktemp("faceforge-home"))


def shared_data() -> Path:
    if not (SHARED / "celeba_ids").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED


@pytest.fixture(scope="session")
def tiny_train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 real identities x 4 images in the image-folder layout."""
    src = shared_data() / "celeba_ids"
    dst = tmp_path_factory.mktemp("train")
    for identity in sorted(p for p in src.iterdir() if p.is_dir())[:6]:
        (dst / identity.name).mkdir()
        for image in sorted(identity.glob("*.jpg"))[:4]:
            shutil.copy(image, dst / identity.name / image.name)
    return dst


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An LFW-format pairs.txt with 10 folds of 2 matched + 2 mismatched pairs over ../shared/data/lfw."""
    lines = (shared_data() / "lfw" / "pairs.txt").read_text().splitlines()
    folds, per_fold = (int(x) for x in lines[0].split())
    kept = []
    for fold in range(folds):
        block = lines[1 + fold * 2 * per_fold : 1 + (fold + 1) * 2 * per_fold]
        kept += block[:2] + block[per_fold : per_fold + 2]
    path = tmp_path_factory.mktemp("pairs") / "pairs.txt"
    path.write_text(f"{folds}\t2\n" + "\n".join(kept) + "\n")
    return path


def tiny_config(out: Path, train_root: Path, pairs: Path | None, **trainer: object) -> TrainConfig:
    values = {
        "model": {"name": "mobilefacenet", "embedding_dim": 32, "width": 0.25, "input_size": 56, "act": "prelu"},
        "head": {"type": "margin", "preset": "arcface", "s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0},
        "data": {"root": str(train_root), "batch_size": 8, "crop_fraction": 0.8, "num_workers": 0},
        "optim": {"name": "sgd", "lr": 0.05},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "trainer": {"nproc": 1, "steps": 4, "checkpoint_every": 2, "log_every": 1, **trainer},
        "eval": {"pairs": str(pairs), "root": str(SHARED / "lfw"), "crop_fraction": 0.5}
        if pairs
        else {"disabled": True},
        "mlflow": {"tracking_uri": f"sqlite:///{out.parent}/mlflow.db", "experiment": "tests", "log_model": False},
        "output_dir": str(out),
    }
    return from_dict(values)


def run_stopped_inside(
    target: str, stop: int, main: str, args: list[str], *, after: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `main` (code that reads sys.argv[1:]) in a fresh Python whose `target` ("module:Name" or
    "module:Class.method") sends its own process `stop` on each call: before the original runs, or once it has
    returned. It lets a test land a real signal inside one exact step."""
    module, _, path = target.partition(":")
    signal_self = f"    os.kill(os.getpid(), {int(stop)})\n"
    stopper = (
        "import importlib, os\n"
        f"owner = importlib.import_module({module!r})\n"
        f"*parents, name = {path!r}.split('.')\n"
        "for parent in parents:\n"
        "    owner = getattr(owner, parent)\n"
        "original = getattr(owner, name)\n"
        "def stopped_inside(*args, **kwargs):\n"
        + ("" if after else signal_self)
        + "    result = original(*args, **kwargs)\n"
        + (signal_self if after else "")
        + "    return result\n"
        "setattr(owner, name, stopped_inside)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", stopper + main, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@contextmanager
def running_scheduler(home: Path, *options: str) -> Iterator[subprocess.Popen]:
    """`faceforge scheduler` over `home` in its own session, logging to home/scheduler.log; stopped by SIGTERM."""
    with (home / "scheduler.log").open("w") as log:
        scheduler = subprocess.Popen(
            [*CLI, "scheduler", *options],
            env={**os.environ, "FACEFORGE_HOME": str(home)},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield scheduler
        finally:
            os.killpg(scheduler.pid, signal.SIGTERM)
            scheduler.wait(timeout=60)


@pytest.fixture(scope="module")
def queue_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A FACEFORGE_HOME with `faceforge scheduler` running two single-slot jobs at a time."""
    home = tmp_path_factory.mktemp("queue")
    with running_scheduler(home, "--slots", "2"):
        yield home


class Waiter(threading.Thread):
    """A call run in a thread, keeping what it raised."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.call, self.error = call, None

    def run(self) -> None:
        try:
            self.call()
        except BaseException as err:
            self.error = err


@contextmanager
def waiting_behind(lock_file: Path, call: Callable[[], object], settle: float = 0.5) -> Iterator[Waiter]:
    """`call` started while another process's hold on `lock_file` is mimicked; it goes on when the block ends."""
    with lock_file.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = Waiter(call)
        waiter.start()
        time.sleep(settle)  # long enough to reach the lock
        yield waiter
    waiter.join(120)
    assert not waiter.is_alive(), "it never finished once the lock was free"
