"""The closed-loop demo's parts that need no training: profiles, the identity split, albums and ground truth,
the aligned base and pair sets and their cache, union folders, clustering scores against the truth, the demo
home's resume rules, the summary table and a Ctrl-C while it aligns."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_align_interrupt import CLI, signal_group_when, worker_starting

from faceforge import models
from faceforge.cli import _interrupt, build_parser, main
from faceforge.data.folder import identity_images, list_images
from faceforge.data.image import read_image
from faceforge.data.sample_data import SAMPLE_ROOT, demo_data_paths, pair_files
from faceforge.demo import FULL, RECIPE, TINY, Demo, DemoError, Stage, summary_table
from faceforge.demo.data import (
    UNLABELLED,
    align_set,
    base_photos,
    build_sets,
    deal_albums,
    link_files,
    photo_labels,
    score_version,
    split_identities,
    union_folder,
)
from faceforge.demo.loop import CACHE, SAMPLE_ALIGN_MIN_FACE, STATE_FILE, check_overrides, lock_home, open_home
from faceforge.demo.services import train_progress
from faceforge.jobs import CANCELLED, QUEUED, make_jobs
from faceforge.jobs.executors.local_runner import EXIT_CODE_FILE
from faceforge.jobs.paths import job_dir

from conftest import shared_data

SAMPLE = demo_data_paths(SAMPLE_ROOT.parent / "no-shared-data-here")  # the shipped sample, on every machine


def test_profiles_reject_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="split identities"):
        replace(TINY, split_identities=TINY.held_out_identities + 1)
    with pytest.raises(ValueError, match=">= 2 albums"):
        replace(FULL, albums=1)
    with pytest.raises(ValueError, match="pairs per fold"):
        replace(TINY, pairs_per_fold=1)
    with pytest.raises(ValueError, match="base photos per identity"):
        replace(FULL, base_photos_per_identity=1)
    with pytest.raises(ValueError, match="base identities"):
        replace(FULL, base_identities=0)


def test_held_out_identities_are_disjoint_and_stable() -> None:
    folders = list(identity_images(SAMPLE.train_root))
    base, held_out = split_identities(folders, 10, min_photos=4)
    assert len(held_out) == 10 and len(base) == len(folders) - 10
    assert not {f.name for f in base} & {f.name for f in held_out}
    assert split_identities(folders, 10, min_photos=4) == (base, held_out), "a rerun holds out the same people"
    with pytest.raises(ValueError, match="cannot hold out"):
        split_identities(folders, len(folders), min_photos=4)
    with pytest.raises(ValueError, match="0 with 1000 photos"):
        split_identities(folders, 1, min_photos=1000)


def test_albums_split_some_people_over_two() -> None:
    profile = replace(TINY, held_out_identities=5, photos_per_identity=6, albums=3, split_identities=2)
    people = list(identity_images(SAMPLE.train_root))[:5]
    albums = deal_albums(people, profile)
    assert sorted(albums) == ["album-1", "album-2", "album-3"]
    where: dict[str, set[str]] = {}
    for album, photos in albums.items():
        for source in photos.values():
            where.setdefault(Path(source).parent.name, set()).add(album)
    assert sorted(len(where[p.name]) for p in people) == [1, 1, 1, 2, 2]
    assert sum(len(photos) for photos in albums.values()) == 5 * 6
    with pytest.raises(ValueError, match="photos, the profile needs"):
        deal_albums(people, replace(profile, photos_per_identity=1000))


def test_base_photos_take_the_profiles_share_of_people_and_photos() -> None:
    folders = list(identity_images(SAMPLE.train_root))
    photos = base_photos(folders, TINY)
    assert len({p.parent for p in photos}) == TINY.base_identities
    assert len(photos) == TINY.base_identities * TINY.base_photos_per_identity
    assert base_photos(folders, TINY) == photos, "a rerun trains on the same photos"
    everything = replace(TINY, base_identities=None, base_photos_per_identity=None)
    assert base_photos(folders, everything) == [p for f in folders for p in list_images(f)]


def test_pair_files_name_both_photos_of_each_pair() -> None:
    pairs = [["Ann", "1", "3"], ["Ann", "1", "Bob", "12"]]
    assert pair_files(pairs) == ["Ann/Ann_0001.jpg", "Ann/Ann_0003.jpg", "Bob/Bob_0012.jpg"]


def test_sets_hold_out_people_with_their_ground_truth(tmp_path: Path) -> None:
    sets = build_sets(SAMPLE, TINY, tmp_path / "data")
    truth = json.loads(sets.truth.read_text())
    inbox = sorted(p.relative_to(sets.inbox).as_posix() for p in sets.inbox.rglob("*") if p.is_file())
    assert inbox == sorted(truth) and len(truth) == sets.photos == TINY.held_out_identities * TINY.photos_per_identity
    base = {p.name for p in sets.base_photos.iterdir()}
    assert len(base) == sets.base_identities == TINY.base_identities
    assert not base & set(truth.values()), "the base model never sees a held-out person"
    assert all(p.is_symlink() for p in sets.base_photos.rglob("*.jpg"))
    assert len(list(sets.base_photos.rglob("*.jpg"))) == sets.base_images
    lines = sets.pairs.read_text().splitlines()
    assert lines[0] == f"10\t{TINY.pairs_per_fold}" and len(lines) == 1 + 10 * 2 * TINY.pairs_per_fold
    linked = sorted(p.relative_to(sets.pair_photos).as_posix() for p in sets.pair_photos.rglob("*.jpg"))
    assert linked == pair_files([line.split() for line in lines[1:]]), "exactly the photos the pairs name"
    assert not sets.base.exists() and not sets.pairs_root.exists(), "the align stage writes them"


def test_the_full_profile_fits_the_shipped_sample(tmp_path: Path) -> None:
    """A fresh machine without ../shared/data runs the full demo on the sample: it has fewer pairs per fold."""
    sets = build_sets(SAMPLE, FULL, tmp_path / "data")
    assert sets.photos == FULL.held_out_identities * FULL.photos_per_identity
    assert sets.base_identities == len(identity_images(SAMPLE.train_root)) - FULL.held_out_identities
    sample_per_fold = int(SAMPLE.pairs.read_text().split()[1])
    assert sample_per_fold < FULL.pairs_per_fold
    assert sets.pairs.read_text().splitlines()[0] == f"10\t{sample_per_fold}"
    assert len(sets.pairs.read_text().splitlines()) == 1 + 10 * 2 * sample_per_fold


def test_aligned_sets_link_their_own_crops_and_reuse_the_cache(tmp_path: Path) -> None:
    people = list(identity_images(SAMPLE.train_root))[:2]
    photos = {f"{p.parent.name}/{p.name}": p for folder in people for p in list_images(folder)[:2]}
    link_files(photos, tmp_path / "photos")
    options = {"min_face_size": SAMPLE_ALIGN_MIN_FACE["base"], "fallbacks": ("center",)}
    counts, new = align_set(tmp_path / "photos", SAMPLE.train_root, tmp_path / "cache", tmp_path / "base", 1, **options)
    assert counts == {"aligned": 4} and new == 4
    crops = sorted(p.relative_to(tmp_path / "base").as_posix() for p in (tmp_path / "base").rglob("*.jpg"))
    assert crops == sorted(photos)
    assert read_image(tmp_path / "base" / crops[0]).shape == (112, 112, 3)
    # Half the photos again: all from the cache, and the folder links only those.
    (tmp_path / "photos" / people[1].name).rename(tmp_path / "elsewhere")
    counts, new = align_set(tmp_path / "photos", SAMPLE.train_root, tmp_path / "cache", tmp_path / "base", 1, **options)
    assert counts == {"aligned": 2} and new == 0
    assert [p.name for p in (tmp_path / "base").iterdir()] == [people[0].name]
    assert len(list((tmp_path / "cache").iterdir())) == 1


def write_version(root: Path, records: dict[str, str]) -> Path:
    """A dataset version with one face per photo ({album/photo: identity}) and its crops."""
    version = root / "v0001"
    for k, identity in enumerate(records.values()):
        (version / "images" / identity).mkdir(parents=True, exist_ok=True)
        (version / "images" / identity / f"face{k}.jpg").write_bytes(b"jpeg")
    lines = [json.dumps({"face": f"face{k}", "source": s, "identity": i}) for k, (s, i) in enumerate(records.items())]
    (version / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return version


def test_union_adds_the_versions_people_to_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base"
    for name, images in (("a", 2), ("b", 3)):
        (base / name).mkdir(parents=True)
        for i in range(images):
            (base / name / f"{i}.jpg").write_bytes(b"jpeg")
    version = write_version(tmp_path, {"album-1/x.jpg": "id_x", "album-1/y.jpg": "id_x", "album-2/z.jpg": "id_z"})
    assert union_folder(base, version, tmp_path / "union") == (4, 8)
    assert sorted(p.name for p in (tmp_path / "union").iterdir()) == ["a", "b", "id_x", "id_z"]
    assert len(list_images(tmp_path / "union" / "id_x")) == 2
    assert union_folder(base, version, tmp_path / "union") == (4, 8), "a rerun rebuilds the links"
    (base / "id_x").mkdir()
    with pytest.raises(ValueError, match="appears twice"):
        union_folder(base, version, tmp_path / "union2")


def test_photos_without_a_face_count_as_singletons(tmp_path: Path) -> None:
    truth = {"album-1/a1.jpg": "A", "album-1/a2.jpg": "A", "album-2/a3.jpg": "A", "album-2/b1.jpg": "B"}
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    version = write_version(tmp_path, {"album-1/a1.jpg": "id_1", "album-1/a2.jpg": "id_1", "album-2/b1.jpg": "id_2"})
    labels = photo_labels(version, truth)
    assert labels["album-2/a3.jpg"] == UNLABELLED + "album-2/a3.jpg"
    scores = score_version(version, tmp_path / "truth.json", tmp_path / "clusters.json")
    assert scores.faces == 4 and scores.clusters == 3 and scores.pairwise_precision == 1.0
    assert scores.pairwise_recall == pytest.approx(2 / 6)  # 1 of A's 3 pairs found (ordered pairs: 2 of 6)
    assert json.loads((tmp_path / "clusters.json").read_text()) == labels  # for `faceforge data cluster-eval`


def test_a_demo_home_resumes_restarts_or_refuses(tmp_path: Path) -> None:
    home = tmp_path / "home"
    state = open_home(home, TINY, fresh=False)
    assert state["stages"] == {} and (home / STATE_FILE).is_file()
    state["stages"]["data"] = {"name": "data", "seconds": 1.0, "figures": {}, "values": {}}
    (home / STATE_FILE).write_text(json.dumps(state))
    assert "data" in open_home(home, TINY, fresh=False)["stages"], "an unfinished demo resumes"
    with pytest.raises(DemoError, match="unfinished tiny demo"):
        open_home(home, FULL, fresh=False)
    assert open_home(home, FULL, fresh=True)["stages"] == {}, "--fresh starts over"
    state = json.loads((home / STATE_FILE).read_text()) | {"complete": True}
    (home / STATE_FILE).write_text(json.dumps(state))
    (home / "leftover").write_text("from the finished run")
    (home / CACHE / "aligned-x").mkdir(parents=True)
    assert open_home(home, FULL, fresh=False)["stages"] == {} and not (home / "leftover").exists()
    assert (home / CACHE / "aligned-x").is_dir(), "aligned crops outlive a finished demo"
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("not the demo's")
    with pytest.raises(DemoError, match="did not make"):
        open_home(other, TINY, fresh=True)
    assert (other / "precious.txt").exists()


def test_a_wipe_killed_part_way_is_finished_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state file goes last, whatever order the folder lists in: without it the home's leftovers would look like
    someone else's files, refused even with --fresh."""
    home = tmp_path / "home"
    state = open_home(home, TINY, fresh=False) | {"complete": True}
    (home / STATE_FILE).write_text(json.dumps(state))
    for name in ("data", "logs", CACHE):
        (home / name).mkdir()
    iterdir, rmtree = Path.iterdir, shutil.rmtree

    def state_file_first(path: Path) -> list[Path]:
        return sorted(iterdir(path), key=lambda entry: entry.name != STATE_FILE)

    def killed(path: Path) -> None:
        raise InterruptedError(f"killed while deleting {path}")

    monkeypatch.setattr(Path, "iterdir", state_file_first)
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(InterruptedError):
        open_home(home, TINY, fresh=False)
    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert open_home(home, TINY, fresh=False)["stages"] == {}, "the next run finishes the wipe"
    assert sorted(p.name for p in home.iterdir()) == [CACHE, STATE_FILE]

    state = open_home(home, TINY, fresh=False)  # an unfinished demo, cleared with --fresh: killed, rerun without
    state["stages"]["data"] = {"name": "data", "seconds": 1.0, "figures": {}, "values": {}}
    (home / STATE_FILE).write_text(json.dumps(state))
    (home / "data").mkdir()
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(InterruptedError):
        open_home(home, TINY, fresh=True)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert open_home(home, TINY, fresh=False)["stages"] == {}, "the wipe, not a resume with its files gone"
    assert not (home / "data").exists()


def test_a_label_round_killed_after_its_version_is_taken_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after the auto-labeller published the round's version, before demo.json recorded the stage: the
    rerun has nothing new to label, so it scores that version, labelled with the current champion."""
    import faceforge.demo.loop as loop
    from faceforge.data_pipeline import autolabel

    torch.manual_seed(0)
    model = models.create("mobilefacenet", embedding_dim=32, width=0.25, input_size=56)
    (tmp_path / "champion").mkdir()
    torch.save({"model_config": model.config, "model": model.state_dict()}, tmp_path / "champion" / "model.pt")
    resolve = autolabel.resolve_model  # the champion is a checkpoint here: no registry needed
    monkeypatch.setattr(autolabel, "resolve_model", lambda source, uri: resolve(str(tmp_path / "champion"), uri))
    demo = Demo(tmp_path / "home", TINY, SAMPLE, [], port=8000, fresh=False)
    demo.stage("data", demo.prepare)
    score = loop.score_version

    def killed(*args: object) -> None:
        raise InterruptedError("killed after the round")

    monkeypatch.setattr(loop, "score_version", killed)
    with pytest.raises(InterruptedError):
        demo.stage("label round 1", lambda: demo.label(1))
    monkeypatch.setattr(loop, "score_version", score)
    assert "label round 1" not in json.loads((demo.home / STATE_FILE).read_text())["stages"]
    stage = demo.stage("label round 1", lambda: demo.label(1))
    assert stage.figures["version"].startswith("v0001 (") and Path(stage.values["version"]).name == "v0001"
    assert (demo.home / "clusters-v0001.json").is_file()
    os.close(demo.lock)


def test_bad_overrides_stop_the_demo_before_it_starts() -> None:
    check_overrides(TINY, ["model.width=0.5"])
    for overrides, message in (
        (["model.widht=2"], "Could not override 'model.widht'"),
        (["optim.lr=0.1"], "optim.lr is what the demo's sweep varies"),
        (["model.width=0.25,0.5"], "one value each"),
        (["data.root=/elsewhere"], "data.root is set by the demo for each stage"),
        (["+mlflow.tracking_uri=sqlite:///other.db"], "mlflow.tracking_uri is set by the demo"),
    ):
        with pytest.raises(DemoError, match=message):
            check_overrides(TINY, overrides)


def test_a_rerun_resumes_stopped_jobs_and_follows_running_ones(tmp_path: Path) -> None:
    demo = Demo(tmp_path / "home", TINY, demo_data_paths(), [], port=8000, fresh=False)
    store, jobs = demo.store, lambda *extra: make_jobs(["trainer=demo", *RECIPE, *extra], name="demo-base")
    (job,) = demo.submit("base model", jobs())
    store.claim("local", "old-scheduler", 2, 30)
    assert demo.submit("base model", jobs()) == [store.get(job.id)], "a running job is followed"

    store.cancel(job.id)  # the earlier demo's Ctrl-C: SIGTERM, the trainer checkpoints, the scheduler records it
    assert store.finish(job.id, "old-scheduler", CANCELLED, exit_code=1, error="stopped by SIGTERM")
    job_dir(demo.home, job.id).mkdir(parents=True)
    (job_dir(demo.home, job.id) / EXIT_CODE_FILE).write_text("1")
    (again,) = demo.submit("base model", jobs())
    assert again.id == job.id and store.get(job.id).state == QUEUED, "the stopped job is queued again"
    assert not (job_dir(demo.home, job.id) / EXIT_CODE_FILE).exists()

    store.claim("local", "new-scheduler", 2, 30)
    store.cancel(job.id)
    assert store.finish(job.id, "new-scheduler", CANCELLED, exit_code=1)
    (changed,) = demo.submit("base model", jobs("model.width=0.5"))  # other settings: a new job, trained afresh
    assert changed.id != job.id and store.get(job.id).state == CANCELLED
    os.close(demo.lock)


def test_one_demo_at_a_time_per_home(tmp_path: Path) -> None:
    first = lock_home(tmp_path / "home")
    with pytest.raises(DemoError, match="another faceforge demo is running"):
        lock_home(tmp_path / "home")
    os.close(first)  # the first demo ended
    os.close(lock_home(tmp_path / "home"))


def test_progress_is_read_from_the_trainers_bar(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    assert train_progress(str(log)) is None
    log.write_text("output: x\ntrain:   0%|          | 0/500 [00:00<?, ?it/s]\rtrain:  42%|####2     | 210/500 [01:10]")
    assert train_progress(str(log)) == (210, 500)


def test_summary_has_a_row_per_stage_with_wall_time() -> None:
    stages = [
        Stage("base model", 421.5, {"LFW accuracy": "0.6500"}, {}),
        Stage("label round 2", 12.25, {"F before -> after": "pairwise 0.40 -> 0.55"}, {}),
    ]
    lines = summary_table(stages).splitlines()
    assert lines[0].split() == ["stage", "wall", "time", "figures"] and set(lines[1]) == {"-"}
    assert lines[2].startswith("base model") and "7 min 01.5 s  LFW accuracy 0.6500" in lines[2]
    assert "12.2 s  F before -> after pairwise 0.40 -> 0.55" in lines[3]


def test_train_only_keeps_issue_2s_demo() -> None:
    args = build_parser().parse_args(["demo", "--train-only", "trainer.steps=10"])
    assert args.train_only and args.overrides == ["trainer.steps=10"] and args.profile == "full"
    assert build_parser().parse_args(["demo", "--profile", "tiny", "--fresh"]).fresh


def test_only_the_first_interrupt_counts_so_the_orderly_stop_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C during the stop would leave the servers, in their own sessions, running. One that arrives with
    the first, before its handler ran, is dropped too, without CPython's "ignored due to race condition" report."""
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in previous:
            signal.signal(sig, _interrupt)
        with pytest.raises(KeyboardInterrupt):
            signal.pthread_sigmask(signal.SIG_BLOCK, previous)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, previous)  # both are delivered at once
            time.sleep(5)  # the handler raises here, at the latest
        os.kill(os.getpid(), signal.SIGINT)  # dropped: the stop it interrupts is already under way
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert _interrupt not in {signal.getsignal(sig) for sig in previous}
        assert not unraisable
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, previous)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-only", "--home", "elsewhere", "--port", "9999"], "--train-only takes Hydra overrides only, not "
         "--home, --port"),
        (["--profile", "tiny", "trainer.steps=2", "--fresh"], "options go before the Hydra overrides: --fresh"),
    ],
)  # fmt: skip
def test_demo_options_it_would_ignore_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=f"faceforge demo: error: {re.escape(message)}"):
        main(["demo", *argv])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_demo_stopped_while_its_align_workers_start_prints_one_line_and_resumes(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """The workers get a terminal's Ctrl-C too; one importing torch used to print a KeyboardInterrupt traceback."""
    shared_data()
    home = tmp_path / "demo"
    demo = [*CLI, "demo", "--profile", "tiny", "--home", str(home)]
    code, stderr = signal_group_when(demo, sig, worker_starting, tmp_path / "stderr")

    assert code == 1
    assert "Traceback" not in stderr, stderr
    assert stderr.rstrip().splitlines()[-1] == (
        f"faceforge demo: interrupted; jobs and servers stopped. Rerun it to resume ({home})"
    )
    assert list(json.loads((home / STATE_FILE).read_text())["stages"]) == ["data"]

    rerun = Demo(home, TINY, demo_data_paths(), [], port=8000, fresh=False)  # its first stages, without servers
    try:
        rerun.stage("data", rerun.prepare)
        rerun.stage("align", rerun.align)
    finally:
        os.close(rerun.lock)
    base = rerun.value("align", "base")
    assert base["aligned"] > 0 and sum(base.get(status, 0) for status in ("aligned", "no_face", "error")) == (
        TINY.base_identities * TINY.base_photos_per_identity
    )
