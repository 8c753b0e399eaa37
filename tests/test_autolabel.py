"""The auto-label daemon on real photos: every file ends in one place, versions, kill -9, new models, retraining."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from faceforge import models
from faceforge.cli import main
from faceforge.data_pipeline.autolabel import (
    OUTCOMES,
    AutolabelConfig,
    AutolabelError,
    Autolabeller,
    checkpoint_key,
    daemon_running,
    exclusive,
    label_identities,
    load_config,
    move_file,
    resolve_model,
    status,
    truncation_problem,
)
from faceforge.data_pipeline.autolabel_state import InboxFile
from faceforge.data_pipeline.dedup import calibrate_threshold, cluster_centroids, open_set_threshold, pair_scores
from faceforge.data_pipeline.quality import QualityScore
from faceforge.data_pipeline.versions import (
    FaceRecord,
    adjusted_rand_index,
    list_versions,
    read_manifest,
    read_stats,
    write_version,
)
from faceforge.jobs import JobStore, compose_config

from conftest import run_stopped_inside, shared_data

PEOPLE, PER_PERSON = 8, 5
BAD_FILES = {
    "album0/empty.jpg": "error:empty",
    "album0/cut.jpg": "error:truncated",
    "album0/notes.txt": "error:unsupported",
    "album0/garbage.png": "error:corrupt",
    "album1/giant.png": "error:huge",
    "album1/copy.jpg": "rejected:duplicate",
    "album2/noise.png": "rejected:no_face",
}


def save_backbone(directory: Path, seed: int) -> Path:
    """A small untrained backbone in the checkpoint layout `load_backbone` reads; the seed makes another model."""
    torch.manual_seed(seed)
    model = models.create("mobilefacenet", embedding_dim=32, width=0.25, input_size=56, act="relu")
    directory.mkdir(parents=True)
    torch.save({"model_config": model.config, "model": model.state_dict()}, directory / "model.pt")
    return directory


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 LFW people x 5 photos dealt over 3 albums, plus one file of each kind that must not become a face."""
    lfw = shared_data() / "lfw"
    people = sorted(d for d in lfw.iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) >= PER_PERSON)[:PEOPLE]
    inbox = tmp_path_factory.mktemp("photos")
    for i, person in enumerate(people):
        for j, photo in enumerate(sorted(person.glob("*.jpg"))[:PER_PERSON]):
            (inbox / f"album{(i + j) % 3}").mkdir(exist_ok=True)
            shutil.copy(photo, inbox / f"album{(i + j) % 3}" / photo.name)
    face = sorted((inbox / "album0").glob("*.jpg"))[0].read_bytes()
    (inbox / "album0/empty.jpg").write_bytes(b"")
    (inbox / "album0/cut.jpg").write_bytes(face[: len(face) // 2])
    (inbox / "album0/notes.txt").write_text("not a photo")
    (inbox / "album0/garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300) + b"IEND\xaeB`\x82")
    cv2.imwrite(str(inbox / "album1/giant.png"), np.zeros((6400, 6400), dtype=np.uint8))  # 41M pixels
    (inbox / "album1/copy.jpg").write_bytes(face)
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    cv2.imwrite(str(inbox / "album2/noise.png"), noise)
    return inbox


def fresh_inbox(photos: Path, tmp_path: Path) -> Path:
    inbox = tmp_path / "inbox"
    shutil.copytree(photos, inbox)
    return inbox


def inputs(inbox: Path) -> list[str]:
    return sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*") if p.is_file())


def config(model: Path, *extra: str) -> AutolabelConfig:
    return load_config(None, [f"model={model}", "settle_seconds=0", "batch_files=6", *extra])


@pytest.fixture(scope="module")
def model_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_backbone(tmp_path_factory.mktemp("models") / "a", seed=0)


@pytest.mark.slow
def test_every_file_ends_in_exactly_one_place(photos: Path, model_a: Path, tmp_path: Path) -> None:
    inbox, workdir = fresh_inbox(photos, tmp_path), tmp_path / "work"
    expected = inputs(inbox)
    report = Autolabeller(inbox, workdir, config(model_a), log=lambda _: None).run_once()
    assert report is not None and report.version == "v0001"
    assert inputs(inbox) == [], "every decided file leaves the inbox"
    landed = {
        outcome: sorted(
            p.relative_to(workdir / outcome).as_posix() for p in (workdir / outcome).rglob("*") if p.is_file()
        )
        for outcome in ("labelled", "rejected", "error")
    }
    # Each input is in one outcome folder, under its album, named <id>_<name>.
    placed = sorted(f"{Path(p).parent.name}/{Path(p).name.split('_', 1)[1]}" for v in landed.values() for p in v)
    assert sorted(placed) == sorted(f"{Path(p).parent}/{Path(p).name}" for p in expected)
    with sqlite3.connect(workdir / "state.db") as db:
        rows = dict(db.execute("SELECT album || '/' || name, outcome || ':' || COALESCE(reason, '') FROM files"))
    assert len(rows) == len(expected)
    for source, kind in BAD_FILES.items():
        outcome, code = kind.split(":")
        assert rows[source].startswith(f"{outcome}:{code}:"), (source, rows[source])
    assert sum(r.startswith("labelled") for r in rows.values()) >= PEOPLE * PER_PERSON - 4  # MTCNN finds LFW faces

    version = workdir / "versions" / "v0001"
    manifest, stats = read_manifest(version), read_stats(version)
    assert stats["images"] == len(manifest) > 0 and stats["identities"] == len({r["identity"] for r in manifest})
    assert stats["files"]["error:huge"] == 1 and stats["files"]["rejected:duplicate"] == 1
    for record in manifest:
        crop = version / "images" / record["identity"] / f"{record['face']}.jpg"
        assert cv2.imread(str(crop)).shape == (112, 112, 3)
        assert {"blur", "yaw", "roll", "score"} <= set(record["quality"]) and len(record["landmarks"]) == 5
    assert status(workdir)["files"]["labelled"] == stats["files"]["labelled"]

    # A second pass over an empty inbox with the same model has nothing to do.
    assert Autolabeller(inbox, workdir, config(model_a), log=lambda _: None).run_once() is None


def lfw_photos(count: int) -> list[bytes]:
    person = next(d for d in sorted((shared_data() / "lfw").iterdir()) if len(list(d.glob("*.jpg"))) >= count)
    return [photo.read_bytes() for photo in sorted(person.glob("*.jpg"))[:count]]


def test_file_checks_read_the_format_from_the_bytes() -> None:
    """Truncation is judged by the format the bytes hold, after the end marker of an EXIF thumbnail; data after
    the image's own end (the video of a phone's motion photo) is not truncation."""
    photo = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8))[1]
    photo, small = photo.tobytes(), cv2.imencode(".jpg", np.full((64, 64, 3), 128, dtype=np.uint8))[1].tobytes()
    exif = b"Exif\0\0" + small  # a thumbnail, with its own end-of-image marker, in an APP1 segment
    with_thumbnail = small[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + small[2:]
    png = cv2.imencode(".png", np.full((64, 64), 7, dtype=np.uint8))[1].tobytes()
    motion_photo = photo + b"\x00\x00\x00\x18ftypmp42" + bytes(8000)
    assert [truncation_problem(data) for data in (photo, with_thumbnail, png, motion_photo)] == [None] * 4
    for cut in (photo[: len(photo) // 2], with_thumbnail[: len(with_thumbnail) - 40], png[: len(png) - 20]):
        assert (truncation_problem(cut) or "").startswith("truncated: "), len(cut)


def test_a_paused_copy_of_a_webp_or_pgm_waits_like_a_jpeg(model_a: Path, tmp_path: Path) -> None:
    """Their headers declare their size (RIFF size, width x height x maxval): a copy cut short waits for the rest
    instead of being decided as corrupt mid-copy; bytes past the declared end are allowed, as for a JPEG. A BMP's
    bfSize is not trusted: many writers fill it wrongly, and such a whole photo would be decided truncated."""
    inbox = tmp_path / "inbox"
    (inbox / "album").mkdir(parents=True)
    face = cv2.imdecode(np.frombuffer(lfw_photos(1)[0], np.uint8), cv2.IMREAD_COLOR)
    grey = cv2.cvtColor(face, cv2.COLOR_BGR2GRAY)
    encoded = {ext: cv2.imencode(ext, image)[1].tobytes() for ext, image in ((".webp", face), (".pgm", grey))}
    assert encoded[".pgm"].startswith(b"P5")
    for ext, data in encoded.items():
        assert truncation_problem(data) is None and truncation_problem(data + bytes(100)) is None, ext
        assert (truncation_problem(data[: len(data) - 1]) or "").startswith("truncated: "), ext
        (inbox / "album" / f"whole{ext}").write_bytes(data)
        (inbox / "album" / f"half{ext}").write_bytes(data[: len(data) // 2])
    paused = time.time() - 5  # past settle_seconds, short of 30 times it
    for path in (inbox / "album").iterdir():
        os.utime(path, (paused, paused))
    labeller = Autolabeller(inbox, tmp_path / "work", config(model_a, "settle_seconds=1"), log=lambda _: None)
    labeller.scan()
    assert sorted(name for _, name in labeller.state.unmoved_sources()) == ["whole.pgm", "whole.webp"]
    bmp = bytearray(cv2.imencode(".bmp", face)[1].tobytes())
    bmp[2:6] = (len(bmp) + 2).to_bytes(4, "little")  # an overstated bfSize
    assert truncation_problem(bytes(bmp)) is None


def test_awkward_names_and_layouts_each_end_in_one_place(model_a: Path, tmp_path: Path) -> None:
    """A photo at the inbox root beside an album folder named `_unsorted` (once the root's name) holding a photo
    of the same name, an album that links to a folder elsewhere, a name that is not UTF-8, and a motion photo."""
    a, b, c, d, e = lfw_photos(5)
    inbox, elsewhere, workdir = tmp_path / "inbox", tmp_path / "elsewhere" / "trip", tmp_path / "work"
    for folder in (inbox / "_unsorted", inbox / "album", elsewhere):
        folder.mkdir(parents=True)
    (inbox / "root.jpg").write_bytes(a)
    (inbox / "_unsorted" / "root.jpg").write_bytes(b)
    (elsewhere / "c.jpg").write_bytes(c)
    (inbox / "trip").symlink_to(elsewhere, target_is_directory=True)
    (inbox / "album" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(d)
    motion = e + b"\x00\x00\x00\x18ftypmp42" + bytes(8000)
    (inbox / "album" / "motion.jpg").write_bytes(motion)
    labeller = Autolabeller(inbox, workdir, config(model_a), log=lambda _: None)
    assert labeller.run_once() is not None
    assert labeller.run_once() is None, "nothing is left to decide: no second round"
    assert inputs(inbox) == [] and list(elsewhere.iterdir()) == []
    with sqlite3.connect(workdir / "state.db") as db:
        rows = dict(db.execute("SELECT album || '/' || name, outcome FROM files"))
    assert sorted(rows) == ["./root.jpg", "_unsorted/root.jpg", "album/caf\\xe9.jpg", "album/motion.jpg", "trip/c.jpg"]
    assert "error" not in rows.values(), rows
    landed = sorted(p.read_bytes() for outcome in OUTCOMES for p in (workdir / outcome).rglob("*") if p.is_file())
    assert landed == sorted([a, b, c, d, motion])


def test_a_huge_file_is_judged_by_its_size_without_being_read(model_a: Path, tmp_path: Path) -> None:
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album").mkdir(parents=True)
    with (inbox / "album" / "huge.jpg").open("wb") as sparse:
        sparse.truncate(2 * 10**9)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Autolabeller(inbox, workdir, config(model_a), log=lambda _: None).run_once()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kb < 500_000, "the file was read whole"
    with sqlite3.connect(workdir / "state.db") as db:
        (reason,) = db.execute("SELECT reason FROM files").fetchone()
    assert reason == "huge: 2000.0 MB exceeds max_file_mb=50"
    assert (workdir / "error" / "album" / "1_huge.jpg").stat().st_size == 2 * 10**9


def test_a_link_to_a_photo_of_another_album_leaves_nothing_behind(model_a: Path, tmp_path: Path) -> None:
    """Its target is decided and moved first; the link, dangling by then, is moved too, not recorded as moved."""
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    for album in ("a1", "a2"):
        (inbox / album).mkdir(parents=True)
    (inbox / "a1" / "x.jpg").write_bytes(lfw_photos(1)[0])
    (inbox / "a2" / "same.jpg").symlink_to("../a1/x.jpg")
    Autolabeller(inbox, workdir, config(model_a, "batch_files=1"), log=lambda _: None).run_once()
    assert [p for p in inbox.rglob("*") if p.is_symlink() or p.is_file()] == []
    with sqlite3.connect(workdir / "state.db") as db:
        destinations = [row[0] for row in db.execute("SELECT destination FROM files WHERE moved = 1")]
    assert len(destinations) == 2 and all(os.path.lexists(workdir / d) for d in destinations), destinations


def test_a_file_that_cannot_be_moved_waits_in_the_inbox(model_a: Path, tmp_path: Path) -> None:
    """A move that fails (here a file stands where the outcome folder must go) stops nothing: the daemon reports
    it once, and moves the file on a later pass."""
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album").mkdir(parents=True)
    (inbox / "album" / "a.jpg").write_bytes(lfw_photos(1)[0])
    blockers = [workdir / outcome / "album" for outcome in OUTCOMES]
    for blocker in blockers:
        blocker.parent.mkdir(parents=True)
        blocker.write_text("not a folder")
    logs: list[str] = []
    labeller = Autolabeller(inbox, workdir, config(model_a), log=logs.append)
    assert labeller.run_once() is not None and labeller.run_once() is None
    assert (inbox / "album" / "a.jpg").is_file()
    assert sum("album/a.jpg: cannot move it out of the inbox" in line for line in logs) == 1, logs
    for blocker in blockers:
        blocker.unlink()
    assert labeller.run_once() is None
    assert not (inbox / "album" / "a.jpg").exists()
    assert [p.name for outcome in OUTCOMES for p in (workdir / outcome).rglob("*.jpg")] == ["1_a.jpg"]


def test_a_file_that_looks_cut_short_waits_longer_for_its_copy_to_finish(model_a: Path, tmp_path: Path) -> None:
    """A copy that pauses past settle_seconds must not be decided as truncated and moved to error/ mid-copy."""
    photo = lfw_photos(1)[0]
    inbox = tmp_path / "inbox"
    (inbox / "album").mkdir(parents=True)
    files = {"whole.jpg": photo, "half.jpg": photo[: len(photo) // 2], "empty.jpg": b""}
    for name, data in files.items():
        (inbox / "album" / name).write_bytes(data)
    labeller = Autolabeller(inbox, tmp_path / "work", config(model_a, "settle_seconds=1"), log=lambda _: None)

    def registered_after(seconds_untouched: float) -> list[str]:
        for name in files:
            stamp = time.time() - seconds_untouched
            os.utime(inbox / "album" / name, (stamp, stamp))
        labeller.scan()
        return sorted(name for _, name in labeller.state.unmoved_sources())

    assert registered_after(0) == []  # nothing has settled
    assert registered_after(5) == ["whole.jpg"]  # settled; the other two may still be arriving
    assert registered_after(31) == ["empty.jpg", "half.jpg", "whole.jpg"]  # 30 x settle_seconds: decided as they are


def test_a_file_replaced_after_its_decision_is_decided_again(model_a: Path, tmp_path: Path) -> None:
    """New bytes under a decided file's name (before its move, or after a move a kill cut short) are a new file:
    never moved under the old file's decision."""
    old, new = lfw_photos(2)
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album").mkdir(parents=True)
    (inbox / "album" / "a.jpg").write_bytes(old)
    labeller = Autolabeller(inbox, workdir, config(model_a), log=lambda _: None)
    labeller.scan()
    current = labeller.next_round()
    assert current is not None
    model = labeller.model_for(current.model, current.model_source)
    labeller.state.record_batch(labeller.decide(labeller.state.pending_files(current.number), model))
    (inbox / "album" / "a.jpg").write_bytes(new)
    assert labeller.run_once() is not None and labeller.run_once() is not None
    assert not (inbox / "album" / "a.jpg").exists()
    with sqlite3.connect(workdir / "state.db") as db:
        rows = list(db.execute("SELECT id, sha256, round, moved FROM files ORDER BY id"))
    assert [(i, sha, r, moved) for i, sha, r, moved in rows] == [
        (1, hashlib.sha256(old).hexdigest(), 1, 1),
        (2, hashlib.sha256(new).hexdigest(), 2, 1),
    ]
    landed = {p.name: p.read_bytes() for outcome in OUTCOMES for p in (workdir / outcome).rglob("*.jpg")}
    assert landed == {"2_a.jpg": new}


def test_watch_outlives_a_failing_pass(model_a: Path, tmp_path: Path) -> None:
    """A pass that fails (here a file stands where the crops folder must go, as a full disk would fail it) is logged
    and tried again; once the cause is gone the daemon carries on, with no file lost."""
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album").mkdir(parents=True)
    (inbox / "album" / "a.jpg").write_bytes(lfw_photos(1)[0])
    workdir.mkdir()
    (workdir / "crops").write_text("not a folder")
    logs: list[str] = []
    labeller = Autolabeller(inbox, workdir, config(model_a, "poll_seconds=0.1"), log=logs.append)

    def unblock_then_stop() -> None:
        deadline = time.monotonic() + 60
        while not any(line.startswith("error: ") for line in logs) and time.monotonic() < deadline:
            time.sleep(0.05)
        (workdir / "crops").unlink()
        while not list_versions(workdir / "versions") and time.monotonic() < deadline:
            time.sleep(0.05)
        labeller.stop.set()

    helper = threading.Thread(target=unblock_then_stop)
    helper.start()
    labeller.watch()  # in the main thread: it installs signal handlers
    helper.join()
    assert [v.name for v in list_versions(workdir / "versions")] == ["v0001"], logs
    assert sum(line.startswith("error: FileExistsError") for line in logs) == 1, logs
    assert not (inbox / "album" / "a.jpg").exists()


def test_retraining_is_enqueued_once_per_round(model_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon killed after enqueueing and before recording its round does the round's end again on restart: it
    must find its job, not enqueue a second."""
    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path / "home"))
    (tmp_path / "inbox").mkdir()
    version = tmp_path / "work" / "versions" / "v0001"
    (version / "images").mkdir(parents=True)
    retrain = ["retrain.min_new_identities=1", "retrain.overrides=[trainer.steps=5]"]
    labeller = Autolabeller(tmp_path / "inbox", tmp_path / "work", config(model_a, *retrain), log=lambda _: None)
    first = labeller.maybe_retrain(version, 3, round_started=1000.25)
    assert labeller.maybe_retrain(version, 3, round_started=1000.25) == first
    assert [job.id for job in JobStore(tmp_path / "home" / "jobs.db").list()] == [first]
    # The same version path in a later work folder (its round started later) is another round: another job.
    again = labeller.maybe_retrain(version, 3, round_started=2000.5)
    assert again != first and len(JobStore(tmp_path / "home" / "jobs.db").list()) == 2


def run_cli(inbox: Path, workdir: Path, model: Path, home: Path) -> subprocess.Popen:
    argv = [sys.executable, "-c", "from faceforge.cli import main; main()", "autolabel", "run", str(inbox)]
    argv += [f"model={model}", "settle_seconds=0", "batch_files=4", "--workdir", str(workdir)]
    env = {**os.environ, "FACEFORGE_HOME": str(home)}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def decided_files(workdir: Path) -> int:
    try:
        with sqlite3.connect(workdir / "state.db", timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM files WHERE outcome IS NOT NULL").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or locked for a moment
        return 0


@pytest.mark.slow
def test_kill_9_then_restart_gives_the_manifest_of_an_uninterrupted_run(
    photos: Path, model_a: Path, tmp_path: Path
) -> None:
    calm_inbox, calm_work = fresh_inbox(photos, tmp_path / "calm"), tmp_path / "calm" / "work"
    total = len(inputs(calm_inbox))
    calm = run_cli(calm_inbox, calm_work, model_a, tmp_path)

    killed_inbox, killed_work = fresh_inbox(photos, tmp_path / "killed"), tmp_path / "killed" / "work"
    victim = run_cli(killed_inbox, killed_work, model_a, tmp_path)
    deadline = time.time() + 300
    while decided_files(killed_work) < 8 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the run ended before it could be killed mid-round: " + victim.stdout.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert 8 <= decided_files(killed_work) < total
    assert not list_versions(killed_work / "versions")

    restarted = run_cli(killed_inbox, killed_work, model_a, tmp_path)
    assert restarted.wait(timeout=600) == 0, restarted.stdout.read()
    assert calm.wait(timeout=600) == 0, calm.stdout.read()
    assert inputs(killed_inbox) == []
    with sqlite3.connect(killed_work / "state.db") as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT album || '/' || name) FROM files").fetchone() == (total,) * 2
        assert db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 1
    calm_manifest = (calm_work / "versions" / "v0001" / "manifest.jsonl").read_bytes()
    assert (killed_work / "versions" / "v0001" / "manifest.jsonl").read_bytes() == calm_manifest


@pytest.mark.slow
def test_a_new_model_relabels_and_enough_new_people_enqueue_retraining(
    photos: Path, model_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACEFORGE_HOME", str(tmp_path / "home"))
    inbox, workdir = fresh_inbox(photos, tmp_path), tmp_path / "work"
    retrain = ["retrain.min_new_identities=1", "retrain.overrides=[trainer.steps=5]"]
    first = Autolabeller(inbox, workdir, config(model_a, *retrain), log=lambda _: None).run_once()
    assert first is not None and first.stats["new_identities"] >= 1 and first.job_id is not None
    (job,) = JobStore(tmp_path / "home" / "jobs.db").list()
    assert job.id == first.job_id and "trainer.steps=5" in job.overrides
    assert compose_config(job.overrides).data.root == str((workdir / "versions" / "v0001" / "images").resolve())

    model_b = save_backbone(tmp_path / "b", seed=1)
    second = Autolabeller(inbox, workdir, config(model_b, *retrain), log=lambda _: None).run_once()
    assert second is not None and second.version == "v0002" and second.files == 0
    assert second.stats["model"] != first.stats["model"]
    before, after = ({r["face"] for r in read_manifest(workdir / "versions" / v)} for v in ("v0001", "v0002"))
    assert second.stats["faces_compared"] == len(before & after) > 0
    assert second.stats["ari_with_previous"] is not None
    # No one is new in a round that brought no files: no second job.
    assert second.stats["new_identities"] == 0 and second.job_id is None


def test_reference_folders_are_embedded_once_per_model(photos: Path, model_a: Path, tmp_path: Path) -> None:
    """Known identities are embedded by file content and reused in later rounds; only new images are embedded."""
    lfw = shared_data() / "lfw"
    known = tmp_path / "known"
    others = sorted(d for d in lfw.iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) >= 3)[-3:]
    for person in others:
        (known / person.name).mkdir(parents=True)
        for photo in sorted(person.glob("*.jpg"))[:2]:
            shutil.copy(photo, known / person.name / photo.name)
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album0").mkdir(parents=True)
    first_photos = sorted((photos / "album0").glob("*.jpg"))
    shutil.copy(first_photos[0], inbox / "album0")
    labeller = Autolabeller(
        inbox, workdir, config(model_a, f"dedup.known_root={known}", "dedup.calibrate=false"), log=lambda _: None
    )
    assert labeller.run_once() is not None

    def reference_rows() -> dict[str, bytes]:
        with sqlite3.connect(workdir / "state.db") as db:
            return dict(db.execute("SELECT face, vector FROM embeddings WHERE face LIKE 'ref:%'"))

    cached = reference_rows()
    assert len(cached) == 6
    marked = min(cached)
    with sqlite3.connect(workdir / "state.db") as db:  # a marker a re-embedding would overwrite
        db.execute("UPDATE embeddings SET vector = ? WHERE face = ?", (bytes(len(cached[marked])), marked))
    shutil.copy(sorted(others[0].glob("*.jpg"))[-1], known / others[0].name / "added.jpg")
    shutil.copy(first_photos[1], inbox / "album0")
    assert labeller.run_once() is not None
    after = reference_rows()
    assert after[marked] == bytes(len(cached[marked])), "a cached reference embedding was computed again"
    assert len(after) == 7, "the image added to the known folder was not embedded"


def test_thresholds_are_calibrated_on_the_calibration_folder(photos: Path, model_a: Path, tmp_path: Path) -> None:
    """A calibration folder, not the known (training) people, sets the thresholds: the model separates the people
    it trained on too well for their false match rate to hold on new faces. Matching against the known people is
    then calibrated as a search of all of them (FPIR)."""
    lfw = shared_data() / "lfw"
    people = sorted(d for d in lfw.iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) >= 2)[-10:]
    roots = {"known": tmp_path / "known", "calibration": tmp_path / "calibration"}
    for index, person in enumerate(people):
        folder = roots["known" if index % 2 else "calibration"] / person.name
        folder.mkdir(parents=True)
        for photo in sorted(person.glob("*.jpg"))[:2]:
            shutil.copy(photo, folder / photo.name)
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album0").mkdir(parents=True)
    shutil.copy(sorted((photos / "album0").glob("*.jpg"))[0], inbox / "album0")
    folders = [f"dedup.{kind}_root={root}" for kind, root in roots.items()]
    labeller = Autolabeller(
        inbox, workdir, config(model_a, *folders, "dedup.fmr=0.1", "dedup.fpir=0.2"), log=lambda _: None
    )
    report = labeller.run_once()
    assert report is not None
    references = labeller.reference_sets(labeller.model_for(*resolve_model(str(model_a), None)))
    at_fmr = {kind: round(calibrate_threshold(*pair_scores(*references[kind]), fmr=0.1).threshold, 6) for kind in roots}
    assert at_fmr["calibration"] != at_fmr["known"]
    outsiders, known = (cluster_centroids(*references[kind])[1] for kind in ("calibration", "known"))
    at_fpir = round(open_set_threshold(outsiders, known, fpir=0.2), 6)
    assert report.stats["thresholds"] == {
        "album": at_fmr["calibration"],
        "eval": at_fmr["calibration"],
        "known": at_fpir,
    }
    assert at_fpir != at_fmr["calibration"]


def test_a_calibration_folder_too_small_for_the_rates_is_an_error() -> None:
    """Not a silent fall-back to the configured thresholds, which may sit far from the requested rate."""
    from faceforge.data_pipeline.autolabel import DedupSettings, calibrated_thresholds

    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 16)).astype(np.float32)
    people = np.repeat([f"p{i}" for i in range(10)], 5)  # 100 genuine, 1,125 impostor pairs
    references = {"calibration": (features, people), "known": (features[:5], people[:5])}
    assert set(calibrated_thresholds(DedupSettings(fmr=1e-2, fpir=0.2), references)) == {"album", "known", "eval"}
    with pytest.raises(AutolabelError, match=r"calibration_root: an FMR of 0.0001 needs at least 10000 impostor"):
        calibrated_thresholds(DedupSettings(fmr=1e-4), references)
    with pytest.raises(AutolabelError, match=r"9 people of dedup.calibration_root outside the known folder are too"):
        calibrated_thresholds(DedupSettings(fmr=1e-2, fpir=0.01), references)


def test_config_mistakes_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(AutolabelError, match=r"unknown config key\(s\) cluster.treshold"):
        load_config(None, ["cluster.treshold=0.5"])
    with pytest.raises(AutolabelError, match=r"quality\.max_yaw must be float"):
        load_config(None, ["quality.max_yaw=sideways"])
    with pytest.raises(AutolabelError, match=r"cluster\.method must be one of"):
        load_config(None, ["cluster.method=kmeans"])
    with pytest.raises(AutolabelError, match="quality: need max_yaw"):
        load_config(None, ["quality.max_yaw=120"])
    with pytest.raises(AutolabelError, match=r"calibration_root needs dedup\.calibrate"):
        load_config(None, ["dedup.calibration_root=/people", "dedup.calibrate=false"])
    for overrides, message in [
        (["poll_seconds=-1"], "poll_seconds must be positive"),  # watch would spin a core
        (["settle_seconds=-1"], "settle_seconds must be >= 0"),
        (["detector=nope"], "detector must be one of center, haar, mtcnn"),
        (["model=[x"], r"override 'model=\[x': not valid YAML"),
        (["retrain.overrides=notalist"], "retrain.overrides must be a list of key=value"),
        # found at start-up, not after a round has moved every file and written its version
        (["retrain.min_new_identities=1", "retrain.overrides=[nosuchkey=1]"], "retrain.overrides: Could not override"),
    ]:
        with pytest.raises(AutolabelError, match=message):
            load_config(None, overrides)
    (tmp_path / "list.yaml").write_text("- model: x\n")
    with pytest.raises(AutolabelError, match=r"list\.yaml: expected a mapping of settings, got list"):
        load_config(tmp_path / "list.yaml", ["poll_seconds=1"])
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(AutolabelError, match=r"broken\.yaml: not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "inbox").mkdir()
    with pytest.raises(AutolabelError, match="must not be inside the inbox"):
        Autolabeller(tmp_path / "inbox", tmp_path / "inbox" / "work", load_config(None))
    result = subprocess.run(
        [sys.executable, "-c", "from faceforge.cli import main; main()", "autolabel", "run", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        env={**os.environ, "FACEFORGE_HOME": str(tmp_path)},
    )
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "inbox folder not found" in result.stderr


def test_one_daemon_per_work_folder_and_per_inbox(tmp_path: Path) -> None:
    inbox, other_inbox, work, other_work = (tmp_path / name for name in ("in", "in2", "work", "work2"))
    inbox.mkdir()
    other_inbox.mkdir()
    same_work = pytest.raises(AutolabelError, match="another autolabel daemon is running on this work folder")
    same_inbox = pytest.raises(AutolabelError, match="another autolabel daemon is taking files from this inbox")
    with exclusive(work, inbox):
        with same_work, exclusive(work, other_inbox):
            pass
        with same_inbox, exclusive(other_work, inbox):  # both would label, and move, the same photos
            pass
    with exclusive(work, inbox):  # released
        pass
    assert list(inbox.iterdir()) == []  # the inbox is locked as a directory: nothing is written into it


def test_one_daemon_per_inbox_also_across_nested_inboxes(tmp_path: Path) -> None:
    """A daemon on a folder inside a watched inbox, or on one holding it, would label the same photos; a daemon on a
    sibling inbox takes other photos and may run, and so does one whose parent folder another program has locked
    (the demo locks its home, which holds its inbox)."""
    inbox, inner, sibling = tmp_path / "in", tmp_path / "in" / "a", tmp_path / "in2"
    inner.mkdir(parents=True)
    sibling.mkdir()
    for watched, other, taken in ((inbox, inner, "which holds this inbox"), (inner, inbox, "from a folder inside it")):
        with exclusive(tmp_path / "work1", watched):
            with pytest.raises(AutolabelError, match=taken) as refused, exclusive(tmp_path / "work2", other):
                pass
            assert "\n" not in str(refused.value)
            with exclusive(tmp_path / "work3", sibling):
                pass
    held = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with exclusive(tmp_path / "work1", inbox), exclusive(tmp_path / "work2", sibling):
            pass
    finally:
        os.close(held)


def test_status_probes_never_stop_a_daemon_from_starting(tmp_path: Path) -> None:
    """`daemon_running` (autolabel status, the datasets page) takes the lock for an instant to test it."""
    done, inbox, work = threading.Event(), tmp_path / "inbox", tmp_path / "work"
    inbox.mkdir()

    def probe() -> None:
        while not done.is_set():
            daemon_running(work)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(300):
            with exclusive(work, inbox):
                pass
    finally:
        done.set()
        prober.join()


def test_versions_are_ordered_by_number_past_v9999(tmp_path: Path) -> None:
    (tmp_path / "crops").mkdir()
    (tmp_path / "crops" / "f_0.jpg").write_bytes(b"a crop")
    face = FaceRecord("f_0", "f", "album/a.jpg", "album", [0, 0, 1, 1], [[0, 0]], {}, 0, "id_1", 1)
    for number in (9999, 10000, 10001):
        write_version(tmp_path / "versions", number, [face], tmp_path / "crops", [], {})
    assert [v.name for v in list_versions(tmp_path / "versions")] == ["v9999", "v10000", "v10001"]
    assert read_stats(tmp_path / "versions" / "v10000")["previous"] == "v9999"


def test_adjusted_rand_index() -> None:
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    for clusters, items in [(3, 20), (10, 200), (50, 60)]:
        a, b = rng.integers(clusters, size=items), rng.integers(clusters, size=items)
        b[: items // 2] = a[: items // 2]
        assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)
    assert adjusted_rand_index(["x", "x", "y"], [7, 7, 3]) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        adjusted_rand_index([1, 2], [1])


@pytest.mark.slow
def test_the_champion_alias_is_resolved_to_its_version_each_round(tmp_path: Path) -> None:
    import mlflow

    from faceforge.data_pipeline.autolabel import embed_crops, load_embedding_model, resolve_model
    from faceforge.registry import prepare_tracking
    from faceforge.train.checkpoint import load_backbone
    from faceforge.train.tracking import RunTracker, create_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepare_tracking(uri)
    mlflow.set_tracking_uri(uri)
    with pytest.raises(AutolabelError, match="no registered model to embed with yet"):
        resolve_model("models:/faceforge@champion", uri)
    client = mlflow.MlflowClient(uri)
    keys = []
    for seed in (0, 1):
        run_id = create_run(uri, "faceforge", None, {}, {})
        RunTracker(uri, run_id).model(load_backbone(save_backbone(tmp_path / f"m{seed}", seed)), 56, step=1)
        version = mlflow.register_model(f"runs:/{run_id}/model", "faceforge").version
        client.set_registered_model_alias("faceforge", "champion", str(version))
        key, source = resolve_model("models:/faceforge@champion", uri)
        assert key == source == f"models:/faceforge/{version}"
        keys.append(key)
        model = load_embedding_model(key, source, uri)
        crops = [np.full((112, 112, 3), 90 + 40 * i, dtype=np.uint8) for i in range(2)]
        features, norms = embed_crops(model, crops, 2)
        assert model.input_size == 56 and features.shape == (2, 32) and (norms > 0).all()
    assert keys[0] != keys[1], "a new champion is a new embedding model: the next round re-labels"


def faceforge_cli(*argv: str, home: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from faceforge.cli import main; main()", *argv]
    env = {**os.environ, "FACEFORGE_HOME": str(home)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_watch_waits_for_a_champion_reports_health_and_stops_on_sigterm(photos: Path, tmp_path: Path) -> None:
    inbox, home = fresh_inbox(photos, tmp_path), tmp_path / "home"
    argv = [sys.executable, "-c", "from faceforge.cli import main; main()", "autolabel", "watch", str(inbox)]
    env = {**os.environ, "FACEFORGE_HOME": str(home)}
    daemon = subprocess.Popen([*argv, "poll_seconds=0.5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while (healthy := faceforge_cli("autolabel", "status", "--stale-after", "30", home=home)).returncode:
            assert daemon.poll() is None and time.time() < deadline, daemon.stdout.read().decode()
            time.sleep(0.5)
        assert healthy.returncode == 0 and "daemon running" in healthy.stdout, healthy.stderr
        assert "pending=" in healthy.stdout  # registered, waiting for a model: nothing decided, nothing moved
        assert inputs(inbox) == inputs(photos)
    finally:
        daemon.send_signal(signal.SIGTERM)
        output = daemon.communicate(timeout=60)[0].decode()
    assert daemon.returncode == 0, output
    assert "waiting: models:/faceforge@champion: no registered model to embed with yet (no MLflow database" in output
    down = faceforge_cli("autolabel", "status", "--stale-after", "30", home=home)
    assert down.returncode == 1 and "unhealthy: daemon down" in down.stderr


def lfw_people(count: int) -> list[bytes]:
    """One photo each of `count` LFW people."""
    people = sorted(d for d in (shared_data() / "lfw").iterdir() if d.is_dir())[:count]
    return [sorted(person.glob("*.jpg"))[0].read_bytes() for person in people]


def test_a_job_store_that_cannot_take_the_retraining_holds_no_round_open(
    model_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    home.write_text("a file where the job store's folder should be")
    monkeypatch.setenv("FACEFORGE_HOME", str(home))
    (inbox / "album").mkdir(parents=True)
    photos = lfw_people(3)
    for i, photo in enumerate(photos[:2]):
        (inbox / "album" / f"{i}.jpg").write_bytes(photo)
    retrain = ["retrain.min_new_identities=1", "retrain.overrides=[trainer.steps=5]"]
    logs: list[str] = []
    labeller = Autolabeller(inbox, tmp_path / "work", config(model_a, *retrain), log=logs.append)
    assert labeller.run_once().version == "v0001"
    (inbox / "album" / "2.jpg").write_bytes(photos[2])  # arrives while the store is still out of reach
    assert labeller.run_once().version == "v0002"
    assert labeller.state.rounds()[-1]["job_id"] == "pending:1"  # the first round's new person, passed on
    main(["autolabel", "status", "--workdir", str(tmp_path / "work")])
    assert "retraining pending: 1 new identities" in capsys.readouterr().out
    home.unlink()
    assert labeller.run_once() is None  # nothing new: only the pending retraining, for the latest version
    jobs = JobStore(home / "jobs.db").list()
    assert [round["job_id"] for round in labeller.state.rounds()] == [None, jobs[0].id] and len(jobs) == 1
    assert "v0002" in jobs[0].name
    main(["autolabel", "status", "--workdir", str(tmp_path / "work")])
    assert f"retraining enqueued: {jobs[0].id}" in capsys.readouterr().out


def test_a_resumed_round_embeds_with_the_weights_it_started_with(model_a: Path, tmp_path: Path) -> None:
    """Training may write a new model.pt where the round's came from while the round is open."""
    checkpoint, inbox = tmp_path / "checkpoint", tmp_path / "inbox"
    shutil.copytree(model_a, checkpoint)
    (inbox / "album").mkdir(parents=True)
    for i, photo in enumerate(lfw_people(2)):
        (inbox / "album" / f"{i}.jpg").write_bytes(photo)
    labeller = Autolabeller(inbox, tmp_path / "work", config(checkpoint), log=lambda _: None)
    labeller.scan()
    current = labeller.next_round()  # a crash here leaves the round open
    save_backbone(tmp_path / "b", seed=1)
    shutil.copy(tmp_path / "b" / "model.pt", checkpoint / "model.pt")
    assert Path(current.model_source).is_relative_to(tmp_path / "work")
    assert (Path(current.model_source) / "model.pt").read_bytes() == (model_a / "model.pt").read_bytes()
    assert labeller.run_once().round == current.number


def test_a_fresh_state_database_writes_a_new_version_not_over_an_old_one(model_a: Path, tmp_path: Path) -> None:
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album").mkdir(parents=True)
    first, second = lfw_people(2)
    (inbox / "album" / "a.jpg").write_bytes(first)
    assert Autolabeller(inbox, workdir, config(model_a), log=lambda _: None).run_once().version == "v0001"
    before = (workdir / "versions" / "v0001" / "manifest.jsonl").read_bytes()
    for path in workdir.glob("state.db*"):  # lost, or removed after corruption
        path.unlink()
    (inbox / "album" / "b.jpg").write_bytes(second)
    assert Autolabeller(inbox, workdir, config(model_a), log=lambda _: None).run_once().version == "v0002"
    assert (workdir / "versions" / "v0001" / "manifest.jsonl").read_bytes() == before


def test_a_fresh_state_database_never_moves_a_photo_over_an_earlier_one(model_a: Path, tmp_path: Path) -> None:
    """File ids start at 1 again, so a camera's next IMG_0001.jpg is headed for the earlier one's outcome name."""
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "phone").mkdir(parents=True)
    first, second = lfw_people(2)
    (inbox / "phone" / "IMG_0001.jpg").write_bytes(first)
    assert Autolabeller(inbox, workdir, config(model_a), log=lambda _: None).run_once() is not None
    for path in workdir.glob("state.db*"):
        path.unlink()
    (inbox / "phone" / "IMG_0001.jpg").write_bytes(second)
    logs: list[str] = []
    assert Autolabeller(inbox, workdir, config(model_a), log=logs.append).run_once() is not None
    assert inputs(inbox) == []
    landed = {p.name: p.read_bytes() for outcome in OUTCOMES for p in (workdir / outcome).rglob("*") if p.is_file()}
    assert sorted(landed.values()) == sorted([first, second]), sorted(landed)
    assert any("phone/IMG_0001.jpg: " in line and "holds another file" in line for line in logs), logs
    with contextlib.closing(sqlite3.connect(workdir / "state.db")) as state:
        [(recorded,)] = state.execute("SELECT destination FROM files").fetchall()
    assert (workdir / recorded).read_bytes() == second  # the record names where the photo went


@pytest.mark.parametrize("crash", ["set_destination", "mark_moved"])
def test_a_move_beside_another_photo_is_recorded_before_a_crash_can_lose_it(tmp_path: Path, crash: str) -> None:
    """Killed with 9 once the photo is placed beside the planned name's holder, or once it has left the inbox: on
    restart the state names the file that holds it, never the earlier photo."""
    inbox, work = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album").mkdir(parents=True)
    (inbox / "album" / "p.jpg").write_bytes(b"new photo")
    labeller = Autolabeller(inbox, work, load_config(None, []), log=lambda _: None)
    labeller.state.register([("album", "p.jpg")])
    [(file_id,)] = labeller.state.db.execute("SELECT id FROM files").fetchall()
    file = InboxFile(file_id, "album", "p.jpg", None)
    labeller.state.record_batch([(file, hashlib.sha256(b"new photo").hexdigest(), "labelled", None, [])])
    [(_, _, _, _, planned)] = labeller.state.unmoved_outcomes()
    (work / planned).parent.mkdir(parents=True)
    (work / planned).write_bytes(b"earlier photo")  # labelled under a state database since removed
    labeller.state.close()
    mover = (
        "import sys\n"
        "from pathlib import Path\n"
        "from faceforge.data_pipeline import autolabel\n"
        "inbox, work = map(Path, sys.argv[1:3])\n"
        "autolabel.Autolabeller(inbox, work, autolabel.load_config(None, []), log=print).move_decided()\n"
    )
    # The place is recorded (set_destination) before the source goes, and the move after it (mark_moved).
    target = "faceforge.data_pipeline.autolabel_state:StateDB." + crash
    after = crash == "set_destination"
    result = run_stopped_inside(target, signal.SIGKILL, mover, [str(inbox), str(work)], after=after)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    restarted = Autolabeller(inbox, work, load_config(None, []), log=lambda _: None)
    restarted.move_decided()
    assert inputs(inbox) == [] and restarted.state.unmoved_outcomes() == []
    with contextlib.closing(sqlite3.connect(work / "state.db")) as state:
        [(recorded,)] = state.execute("SELECT destination FROM files").fetchall()
    assert (work / recorded).read_bytes() == b"new photo" and (work / planned).read_bytes() == b"earlier photo"
    assert len(list((work / planned).parent.iterdir())) == 2


@pytest.mark.parametrize("across_devices", [False, True], ids=["one file system", "two file systems"])
def test_a_move_never_overwrites_and_a_move_cut_short_is_finished(across_devices: bool, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    if across_devices:
        if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
            pytest.skip("no second file system (/dev/shm) here")
        inbox = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        target = tmp_path / "labelled" / "1_a.jpg"
        for i in range(3):
            (inbox / "a.jpg").write_bytes(b"photo %d" % i)
            assert move_file(inbox / "a.jpg", target) == target.with_name(f"1_a~{i}.jpg" if i else "1_a.jpg")
        assert sorted(p.read_bytes() for p in target.parent.iterdir()) == [b"photo 0", b"photo 1", b"photo 2"]
        # A crash after the link (or copy) was placed, before the source was removed: only the removal is left.
        (shutil.copyfile if across_devices else os.link)(target, inbox / "a.jpg")
        assert move_file(inbox / "a.jpg", target) == target
        assert not (inbox / "a.jpg").exists() and len(list(target.parent.iterdir())) == 3
        # The same for a link in the inbox: across file systems what it points to was copied.
        (inbox / "photo").write_bytes(b"linked photo")
        (inbox / "b.jpg").symlink_to(inbox / "photo")
        linked = target.with_name("2_b.jpg")
        if across_devices:
            shutil.copyfile(inbox / "b.jpg", linked)
        else:
            os.link(inbox / "b.jpg", linked, follow_symlinks=False)
        assert move_file(inbox / "b.jpg", linked) == linked and not os.path.lexists(inbox / "b.jpg")
        assert len(list(target.parent.iterdir())) == 4
    finally:
        shutil.rmtree(inbox)


def test_inbox_oddities_end_in_one_place(model_a: Path, tmp_path: Path) -> None:
    """A photo dated in the future, a name at the length limit, and an album renamed before its files' decision."""
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    for album in ("album", "before"):
        (inbox / album).mkdir(parents=True)
    photos = lfw_people(3)
    (inbox / "album" / "future.jpg").write_bytes(photos[0])
    tomorrow = time.time() + 86_400  # a camera's clock ahead of ours
    os.utime(inbox / "album" / "future.jpg", (tomorrow, tomorrow))
    long_name = "p" * 251 + ".jpg"  # 255 bytes: with an id prefix it would be too long to move to
    (inbox / "album" / long_name).write_bytes(photos[1])
    (inbox / "before" / "c.jpg").write_bytes(photos[2])
    labeller = Autolabeller(inbox, workdir, config(model_a), log=lambda _: None)
    assert labeller.scan() == 3
    (inbox / "before").rename(inbox / "after")
    assert labeller.run_once() is not None
    assert inputs(inbox) == []
    with sqlite3.connect(workdir / "state.db") as db:
        rows = sorted(db.execute("SELECT album, name, outcome, moved FROM files"))
    assert [(album, name[:6], moved) for album, name, _, moved in rows] == [
        ("after", "c.jpg", 1),
        ("album", "future", 1),
        ("album", "pppppp", 1),
    ], "the renamed album's files are decided under their new name only"
    assert all(outcome != "error" for *_, outcome, _ in rows)
    assert all(len(p.name.encode()) <= 255 for p in workdir.rglob("*"))


def test_a_work_folder_inside_the_inbox_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "album").mkdir(parents=True)
    with pytest.raises(AutolabelError, match="must not be inside the inbox"), exclusive(inbox / "album" / "w", inbox):
        pass
    assert [p.relative_to(inbox).as_posix() for p in inbox.rglob("*")] == ["album"]  # no lock file to label


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below `root`, links not followed: what must still be where it was."""
    return {
        os.path.relpath(os.path.join(folder, name), root): Path(folder, name).read_bytes()
        for folder, _, names in os.walk(root)
        for name in names
        if os.path.isfile(os.path.join(folder, name)) and not os.path.islink(os.path.join(folder, name))
    }


def other_daemon(tmp_path: Path, model: Path) -> Path:
    """The work folder of a daemon that has run (its state database beside its lock)."""
    inbox, workdir = tmp_path / "other_inbox", tmp_path / "other_work"
    inbox.mkdir()
    with exclusive(workdir, inbox):
        Autolabeller(inbox, workdir, config(model), log=lambda _: None).state.close()
    return workdir


NESTED = {
    "inbox in its own error folder": "the inbox must not be inside the work folder",
    "inbox in another daemon's labelled folder": "inside the autolabel work folder",
    "another daemon's work folder in the inbox": "reaches into the autolabel work folder",
    "album linking to the work folder": "leads into the work folder",
    "album linking to a folder holding the work folder": "holds the work folder",
    "versions folder linking into the inbox": "leads into the inbox",
    "known identities in the inbox": "dedup.known_root",
    "album linking to the known identities": "links to dedup.known_root=",
    "album linking to the model checkpoint": "links to model=",
}


@pytest.mark.parametrize("layout", NESTED)
def test_nested_inbox_and_work_folders_are_refused_before_anything_is_taken(
    layout: str, model_a: Path, tmp_path: Path
) -> None:
    """Each layout would have the daemon take its own output (round after round, or its versions and state.db), or
    another daemon's files, or the reference photos it compares against: one line, and every file stays put."""
    inbox, workdir, model, overrides = tmp_path / "inbox", tmp_path / "work", model_a, []
    if layout == "inbox in its own error folder":
        inbox = workdir / "error"
    elif layout == "inbox in another daemon's labelled folder":
        inbox = other_daemon(tmp_path, model_a) / "labelled"
    elif layout == "another daemon's work folder in the inbox":
        inbox.mkdir()
        other_daemon(tmp_path, model_a).rename(inbox / "old_work")
    elif layout == "album linking to the work folder":
        (workdir / "crops").mkdir(parents=True)
        inbox.mkdir()
        (inbox / "trip").symlink_to(workdir / "crops", target_is_directory=True)
    elif layout == "album linking to a folder holding the work folder":
        inbox.mkdir()
        (inbox / "everything").symlink_to(tmp_path, target_is_directory=True)
    elif layout == "versions folder linking into the inbox":
        (inbox / "datasets").mkdir(parents=True)
        workdir.mkdir()
        (workdir / "versions").symlink_to(inbox / "datasets", target_is_directory=True)
    elif layout == "known identities in the inbox":
        overrides = [f"dedup.known_root={inbox / 'people'}", "dedup.calibrate=false"]
        (inbox / "people" / "someone").mkdir(parents=True)
        (inbox / "people" / "someone" / "0.jpg").write_bytes(lfw_people(1)[0])
    elif layout == "album linking to the known identities":
        known = tmp_path / "known"
        overrides = [f"dedup.known_root={known}", "dedup.calibrate=false"]
        (known / "someone").mkdir(parents=True)
        (known / "someone" / "0.jpg").write_bytes(lfw_people(1)[0])
        inbox.mkdir()
        (inbox / "people").symlink_to(known, target_is_directory=True)
    elif layout == "album linking to the model checkpoint":
        model = shutil.copytree(model_a, tmp_path / "checkpoint")
        inbox.mkdir()
        (inbox / "weights").symlink_to(model, target_is_directory=True)
    (inbox / "album").mkdir(parents=True, exist_ok=True)
    (inbox / "album" / "a.jpg").write_bytes(lfw_people(1)[0])
    before = files_under(tmp_path)
    with pytest.raises(AutolabelError, match=NESTED[layout]) as refused, exclusive(workdir, inbox):
        Autolabeller(inbox, workdir, config(model, *overrides), log=lambda _: None).run_once()
    assert "\n" not in str(refused.value)
    after = files_under(tmp_path)
    assert {path: after.get(path) for path in before} == before, "a file was taken"


def test_an_unchanged_model_file_is_not_read_again(model_a: Path, tmp_path: Path) -> None:
    """The daemon resolves its model every pass; model.pt is hashed again only when its size, mtime or inode
    changed. Shown by bytes changed behind an unchanged stat: the key stays the one first read."""
    checkpoint = shutil.copytree(model_a, tmp_path / "checkpoint")
    weights = checkpoint / "model.pt"
    key = resolve_model(str(checkpoint), None)[0]
    stat = weights.stat()
    flipped = bytearray(weights.read_bytes())
    flipped[-1] ^= 0xFF
    weights.write_bytes(flipped)  # in place: the same inode and size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert resolve_model(str(checkpoint), None)[0] == key, "model.pt was read again though its stat is unchanged"


def test_a_replaced_model_file_is_hashed_again(model_a: Path, tmp_path: Path) -> None:
    """Training writes a new model.pt in place, or renames one over the old; either is a new embedding model."""
    checkpoint = shutil.copytree(model_a, tmp_path / "checkpoint")
    weights, model_b = checkpoint / "model.pt", save_backbone(tmp_path / "b", seed=1)
    keys = [resolve_model(str(checkpoint), None)[0]]

    def written_in_place() -> None:  # same inode; a later mtime
        mtime = weights.stat().st_mtime_ns
        shutil.copyfile(model_b / "model.pt", weights)
        os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))

    def renamed_over() -> None:  # a new inode, even with the old mtime
        mtime = weights.stat().st_mtime_ns
        shutil.copyfile(model_a / "model.pt", checkpoint / "new.pt")
        os.utime(checkpoint / "new.pt", ns=(mtime, mtime))
        os.replace(checkpoint / "new.pt", weights)

    def grown() -> None:  # the same inode and mtime, another size
        mtime = weights.stat().st_mtime_ns
        with weights.open("ab") as stream:
            stream.write(b"\0")
        os.utime(weights, ns=(mtime, mtime))

    for replace in (written_in_place, renamed_over, grown):
        replace()
        keys.append(resolve_model(str(checkpoint), None)[0])
        assert keys[-1] == checkpoint_key(hashlib.sha256(weights.read_bytes()).hexdigest()) != keys[-2]


def test_near_copies_scored_by_different_models_keep_the_better_face() -> None:
    """A face's score carries the norm of the model that embedded it; a later champion's norms have another scale."""
    parts = {"inter_ocular": 60.0, "yaw": 0.0, "roll": 0.0, "brightness": 120.0, "contrast": 50.0, "clipped": 0.0}
    sharp = QualityScore(blur=300.0, **parts, embedding_norm=0.001)  # round 1's model: small norms
    blurred = QualityScore(blur=40.0, **parts, embedding_norm=30.0)  # round 2's
    assert blurred.score > sharp.score and sharp.heuristic > blurred.heuristic
    faces = [
        {"face": name, "album": "a", "quality": quality.to_dict(), "score": quality.score}
        for name, quality in (("sharp", sharp), ("blurred", blurred))
    ]
    same = np.full((2, 8), 8**-0.5, dtype=np.float32)  # one photo, twice
    labelled = label_identities(faces, same, np.eye(2, 256, dtype=np.float32), load_config(None, ["model=m"]), {})
    assert [(d["subject"], d["target"]) for d in labelled.decisions] == [("blurred", "sharp")]


def test_a_model_that_cannot_embed_opens_no_round(model_a: Path, tmp_path: Path) -> None:
    """An open round keeps its model until it ends: a diverged or damaged one would hold the inbox for good."""
    inbox, workdir = tmp_path / "inbox", tmp_path / "work"
    (inbox / "album").mkdir(parents=True)
    (inbox / "album" / "0.jpg").write_bytes(lfw_people(1)[0])
    diverged = save_backbone(tmp_path / "diverged", seed=0)
    state = torch.load(diverged / "model.pt", weights_only=True)
    state["model"] = {name: value.float().fill_(math.nan) for name, value in state["model"].items()}
    torch.save(state, diverged / "model.pt")
    damaged = save_backbone(tmp_path / "damaged", seed=0)
    (damaged / "model.pt").write_bytes(b"half a checkpoint")
    for broken, problem in (
        (diverged, "its embeddings are not finite"),
        (damaged, "not a readable PyTorch checkpoint"),
    ):
        with pytest.raises((AutolabelError, ValueError), match=problem):
            Autolabeller(inbox, workdir, config(broken), log=lambda _: None).run_once()
    labeller = Autolabeller(inbox, workdir, config(model_a), log=lambda _: None)
    assert labeller.state.rounds() == []
    assert labeller.run_once().round == 1  # the configured model now, not one a round is stuck with
