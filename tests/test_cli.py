"""The `faceforge` command: data pack/inspect, and eval from a checkpoint, an MLflow model URI and a .bin."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from faceforge import models
from faceforge.cli import build_parser, main
from faceforge.data import load_pairs, write_bin
from faceforge.registry import prepare_tracking
from faceforge.train.checkpoint import save_checkpoint
from faceforge.train.launch import launch
from faceforge.train.tracking import RunTracker

from conftest import CLI_MAIN, REPO, SHARED, run_stopped_inside, tiny_config

PYTHON = sys.executable


def faceforge(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-c", "from faceforge.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "FACEFORGE_HOME": str(home)} if home else None,
    )


def test_hydra_flags_reach_hydra_before_the_overrides_too() -> None:
    helped = faceforge("train", "--help")
    assert helped.returncode == 0 and "Configuration groups" in helped.stdout, helped.stderr
    printed = faceforge("train", "--cfg", "job", "--resolve", "trainer.nproc=4", "model.width=0.5")
    assert printed.returncode == 0, printed.stderr
    assert "width: 0.5" in printed.stdout and "nproc: 4" in printed.stdout


def test_data_pack_and_inspect(tiny_train_root: Path, tmp_path: Path) -> None:
    packed = faceforge("data", "pack", str(tiny_train_root), str(tmp_path / "rec"))
    assert packed.returncode == 0, packed.stderr
    summary = faceforge("data", "inspect", str(tmp_path / "rec"))
    assert summary.returncode == 0, summary.stderr
    assert "recordio" in summary.stdout.lower() and "24" in summary.stdout
    again = faceforge("data", "pack", str(tiny_train_root), str(tmp_path / "rec"))
    assert again.returncode != 0 and "error:" in again.stderr and "Traceback" not in again.stderr


def test_eval_from_checkpoint_mlflow_uri_and_bin(
    tiny_train_root: Path, tiny_pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_train_root, tiny_pairs, steps=2)  # evaluated at crop 0.5
    cfg.mlflow.log_model = True
    launch(cfg)
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text()
    vset = load_pairs(tiny_pairs, SHARED / "lfw")
    write_bin(tmp_path / "tiny.bin", vset)

    common = ["--crop-fraction", "0.5"]
    by_checkpoint = faceforge(
        "eval", str(tmp_path / "run" / "checkpoints"), "--pairs", str(tiny_pairs), "--root", str(SHARED / "lfw"),
        "--roc", str(tmp_path / "roc.png"), *common,
    )  # fmt: skip
    assert by_checkpoint.returncode == 0, by_checkpoint.stderr
    assert "accuracy" in by_checkpoint.stdout and (tmp_path / "roc.png").stat().st_size > 0
    # Without --tracking-uri, MLflow URIs resolve in the platform's database ($FACEFORGE_HOME/mlflow.db).
    by_uri = faceforge(
        "eval", f"runs:/{run_id}/model", "--bin", str(tmp_path / "tiny.bin"), "--gallery", str(tiny_train_root),
        *common, home=tmp_path,
    )  # fmt: skip
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert by_uri.returncode == 0, by_uri.stderr
    # Same weights, same images: the checkpoint and the MLflow model score the pairs identically.
    accuracy = [line for line in by_checkpoint.stdout.splitlines() if line.startswith("accuracy ")]
    assert accuracy and accuracy[0] in by_uri.stdout
    assert "rank-1=" in by_uri.stdout
    # Without --crop-fraction, the crop the model's training evaluated with (raw LFW photos: 0.5), not 1.0.
    main(["eval", str(tmp_path / "run" / "checkpoints"), "--pairs", str(tiny_pairs), "--root", str(SHARED / "lfw")])
    printed = capsys.readouterr().out
    assert "crop fraction 0.5, as the model's training evaluated" in printed and accuracy[0] in printed

    for source, home in ((str(tmp_path / "nope"), None), ("runs:/0123456789abcdef/model", tmp_path)):
        missing = faceforge("eval", source, "--pairs", str(tiny_pairs), home=home)
        assert missing.returncode != 0 and "error:" in missing.stderr and "Traceback" not in missing.stderr
    zero = faceforge(
        "eval", str(tmp_path / "run" / "checkpoints"), "--bin", str(tmp_path / "tiny.bin"), "--input-size", "0"
    )
    assert zero.returncode != 0 and "input_size must be positive, got 0" in zero.stderr  # not the model's own size


def test_eval_checks_its_inputs_first_and_names_a_broken_image(
    tiny_train_root: Path, tiny_pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    vset = load_pairs(tiny_pairs, SHARED / "lfw")
    assert all(Path(source).is_file() for source in vset.sources)  # what a broken one is reported as
    vset.images[1] = b"cut short"
    write_bin(tmp_path / "broken.bin", vset)
    model = tmp_path / "model"
    save_checkpoint(
        model, 0, model=(backbone := models.create("mobilefacenet", embedding_dim=32, width=0.25, input_size=56)),
        optimizer=torch.optim.SGD(backbone.parameters(), lr=0.1), head=None, head_optimizer=None, train_config={},
        is_main=True,
    )  # fmt: skip
    with pytest.raises(SystemExit, match=r"broken\.bin image \d+ \(pair \d+\): not a decodable image"):
        main(["eval", str(model), "--bin", str(tmp_path / "broken.bin")])
    command = ["eval", str(model), "--pairs", str(tiny_pairs), "--root", str(SHARED / "lfw")]
    stopped = run_stopped_inside("faceforge.eval.embed:_run", signal.SIGINT, CLI_MAIN, command)  # Ctrl-C mid-embed
    assert stopped.returncode == 1 and stopped.stderr.endswith("\nfaceforge eval: interrupted\n"), stopped.stderr
    assert "Traceback" not in stopped.stderr
    with pytest.raises(SystemExit) as both:
        main(["eval", str(model), "--bin", str(tmp_path / "broken.bin"), "--pairs", str(tiny_pairs)])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--root is the image root of --pairs; give --pairs too"):
        main(["eval", str(model), "--bin", str(tmp_path / "broken.bin"), "--root", str(SHARED / "lfw")])
    # Checked before the model is even loaded: an unwritable plot or a gallery without probes.
    with pytest.raises(SystemExit, match=r"--roc .*: give a \.png file path"):
        main(["eval", "/nonexistent/model", "--bin", str(tmp_path / "broken.bin"), "--roc", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"faceforge eval: error: .*'/proc/"):
        main(["eval", "/nonexistent/model", "--bin", str(tmp_path / "broken.bin"), "--roc", "/proc/roc.png"])
    singles = tmp_path / "singles" / "person"
    singles.mkdir(parents=True)
    shutil.copy(next(tiny_train_root.rglob("*.jpg")), singles)
    with pytest.raises(SystemExit, match="no identity has 2 or more images"):
        main(["eval", "/nonexistent/model", "--gallery", str(singles.parent)])
    with pytest.raises(SystemExit, match=r"an MLflow model URI cannot hold '\.' or '\.\.' parts"):
        main(["eval", f"runs:/{'0' * 32}/../../../elsewhere", "--bin", str(tmp_path / "broken.bin")])
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # a PyTorch model of another platform: no input size recorded
    run_id = MlflowClient(uri).create_run(prepare_tracking(uri)).info.run_id
    RunTracker(uri, run_id).model(nn.Sequential(nn.Flatten(), nn.Linear(3 * 56 * 56, 8)), 56, step=1)
    with pytest.raises(SystemExit, match=r"runs:/\w+/model does not record its input size: give --input-size"):
        main(["eval", f"runs:/{run_id}/model", "--bin", str(tmp_path / "broken.bin"), "--tracking-uri", uri])


def test_ports_are_checked_before_anything_runs(tmp_path: Path) -> None:
    for command in (["demo", "--home", str(tmp_path / "demo")], ["web"], ["mlflow-ui"]):
        for port in ("70000", "0", "http"):
            result = faceforge(*command, "--port", port)
            assert result.returncode == 2 and f"{port} is not a TCP port (1-65535)" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_queue_logs_reads_the_copy_the_scheduler_keeps_of_a_ray_jobs_log(
    tiny_train_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ray forgets a submission when its head restarts; the scheduler's copy in the job folder stays whole."""
    from faceforge.jobs import SUCCEEDED, JobStore, make_jobs, store_path

    monkeypatch.setenv("FACEFORGE_RAY_ADDRESS", "http://127.0.0.1:9")  # no head there
    assert build_parser().parse_args(["scheduler"]).ray_address == "http://127.0.0.1:9"
    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path))
    store = JobStore(store_path(tmp_path))
    (job,) = store.submit(make_jobs([f"data.root={tiny_train_root}"], executor="ray"))
    store.claim("ray", "me", 1, 30)
    for attempt in ("first", "second"):  # a retried submission writes a new file
        (copy := tmp_path / f"{attempt}.log").write_text(f"{attempt} attempt: step 1\n")
        store.update(job.id, "me", handle=attempt, log_path=str(copy))
    store.finish(job.id, "me", SUCCEEDED, 0)
    main(["queue", "logs", job.id, "--follow"])
    assert capsys.readouterr().out == "second attempt: step 1\n"


def test_queue_logs_of_a_queued_ray_job_says_so_without_asking_the_cluster(
    tiny_train_root: Path, tmp_path: Path
) -> None:
    from faceforge.jobs import JobStore, make_jobs, store_path

    (job,) = make_jobs([f"data.root={tiny_train_root}"], executor="ray")
    JobStore(store_path(tmp_path)).submit([job])
    env = {**os.environ, "FACEFORGE_HOME": str(tmp_path), "FACEFORGE_RAY_ADDRESS": "http://127.0.0.1:9"}  # no head
    result = subprocess.run(
        [PYTHON, "-c", "from faceforge.cli import main; main()", "queue", "logs", job.id],
        capture_output=True, text=True, cwd=REPO, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert f"{job.id} is queued; it has no log yet" in result.stderr


def test_a_clone_keeps_the_originals_slots_unless_it_changes_the_ranks(
    tiny_train_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from faceforge.jobs import JobStore, store_path

    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path))
    main(["queue", "submit", f"data.root={tiny_train_root}", "--slots", "2"])  # one rank with two threads
    (original,) = JobStore(store_path(tmp_path)).list()
    main(["queue", "clone", original.id, "optim.lr=0.2"])
    main(["queue", "clone", original.id, "trainer.nproc=2", "data.batch_size=16"])
    clones = [job for job in JobStore(store_path(tmp_path)).list() if job.id != original.id]
    assert sorted((job.slots, "trainer.nproc=2" in job.overrides) for job in clones) == [(2, False), (2, True)]
    main(["queue", "clone", original.id, "trainer.nproc=1"])  # its own default now: one slot for one rank
    (single,) = [job for job in JobStore(store_path(tmp_path)).list() if job.slots == 1]
    main(["queue", "clone", single.id, "trainer.nproc=2", "data.batch_size=16"])  # two ranks need two slots
    assert max(JobStore(store_path(tmp_path)).list(), key=lambda job: job.created_at).slots == 2


def test_queue_logs_follows_a_restarted_local_job_without_repeating_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Every attempt of a local job appends to the same job.log, so a restart must not start the log again."""
    from faceforge.jobs import SUCCEEDED, Job, JobStore, store_path
    from faceforge.jobs.store import new_id

    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path))
    store = JobStore(store_path(tmp_path))
    (job,) = store.submit([Job(id=new_id(), name="restarted", overrides=[], config_yaml="x: 1\n")])
    store.claim("local", "me", 1, 30)
    (log := tmp_path / "job.log").write_text("first attempt: step 1\n")
    store.update(job.id, "me", log_path=str(log))

    def restart(seconds: float) -> None:
        """While the follower waits, the first run is lost and the second attempt appends to job.log and ends."""
        store.requeue(job.id, "me", "runner lost")
        assert store.claim("local", "me", 1, 30).attempts == 2
        with open(log, "a") as file:
            file.write("second attempt: step 1\n")
        store.finish(job.id, "me", SUCCEEDED, 0)

    monkeypatch.setattr("time.sleep", restart)
    main(["queue", "logs", job.id, "--follow"])
    assert capsys.readouterr().out == "first attempt: step 1\nsecond attempt: step 1\n"


def test_queue_list_says_when_its_limit_leaves_jobs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A 1000-point sweep must not silently hide the jobs queued before it (the oldest, listed last)."""
    from faceforge.jobs import Job, JobStore, store_path
    from faceforge.jobs.store import new_id

    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path))
    jobs = [Job(id=new_id(), name=f"j{i}", overrides=[], config_yaml="x: 1\n") for i in range(1001)]
    JobStore(store_path(tmp_path)).submit(jobs)

    def listed(*options: str) -> tuple[list[str], str]:
        main(["queue", "list", *options])
        printed = capsys.readouterr()
        return [line.split()[0] for line in printed.out.splitlines()[1:]], printed.err

    ids, note = listed()
    assert ids == [job.id for job in reversed(jobs[1:])]
    assert note == "showing the 1000 newest jobs; more exist: pass --limit 0 to list them all\n"
    ids, note = listed("--limit", "0")
    assert len(ids) == 1001 and ids[-1] == jobs[0].id and note == ""
    ids, note = listed("--state", "queued", "--limit", "2")
    assert ids == [jobs[-1].id, jobs[-2].id] and "the 2 newest queued jobs" in note
    ids, note = listed("--limit", "1001")
    assert len(ids) == 1001 and note == ""
    with pytest.raises(SystemExit) as negative:
        main(["queue", "list", "--limit", "-1"])
    assert negative.value.code == 2 and "--limit must be 0 (all jobs) or more" in capsys.readouterr().err


def test_queue_cancel_of_a_job_that_ends_as_it_is_cancelled_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job succeeds between the command's read and its cancel: it stays succeeded, and is not said cancelled."""
    import faceforge.cli as cli
    from faceforge.jobs import SUCCEEDED, Job, JobStore, store_path
    from faceforge.jobs.store import new_id

    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path))
    store = JobStore(store_path(tmp_path))
    [job] = store.submit([Job(id=new_id(), name="j", overrides=[], config_yaml="x: 1\n")])
    running = store.claim("local", "me", 1, 30)
    assert running is not None and store.finish(job.id, "me", SUCCEEDED, exit_code=0)
    monkeypatch.setattr(cli, "_stored_job", lambda store, job_id: running)  # read while it still ran
    with pytest.raises(SystemExit) as refused:
        main(["queue", "cancel", job.id])
    assert refused.value.code == f"faceforge queue: error: {job.id} already succeeded"
    ended = store.get(job.id)
    assert (ended.state, ended.cancel_requested) == (SUCCEEDED, False)


def test_the_local_executors_default_slots_are_the_cpus_this_process_may_use() -> None:
    """A scheduler pinned to fewer cores (taskset, a container's cpuset) must not run a job per core of the machine."""
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed")
    capacity = (
        "from faceforge.cores import usable_cores; from faceforge.jobs.executors.local import LocalExecutor; "
        "print(LocalExecutor().capacity(), usable_cores())"  # usable_cores: also `data align`'s default workers
    )
    pinned = subprocess.run(
        ["taskset", "-c", "0", PYTHON, "-c", capacity], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert pinned.returncode == 0 and pinned.stdout == "1 1\n", pinned.stderr
