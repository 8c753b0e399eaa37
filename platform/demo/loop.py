"""The closed loop, stage by stage, under one demo home: align, base model, label, sweep, distil, export, label again.

Every training job goes through the queue and the scheduler this demo starts; every model it labels with is
the registry's champion. A finished stage is recorded in `<home>/demo.json` with its figures, so an
interrupted demo resumes at the stage it was in, whose stopped jobs resume from their checkpoints; a completed
one starts over on the next run, keeping only the aligned crops in `<home>/cache`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from faceforge.data.sample_data import SAMPLE_ROOT, DemoData
from faceforge.demo.data import DemoSets, align_set, build_sets, score_version, union_folder
from faceforge.demo.profile import RECIPE, Profile
from faceforge.demo.services import STOP_SECONDS, Child, DemoError, follow_jobs, free_port, wait_until_serving
from faceforge.jobs import (
    CANCELLED,
    FAILED,
    LOST,
    RUNNING,
    TERMINAL,
    Job,
    JobStore,
    make_jobs,
    merge_overrides,
    override_key,
    quoted_path,
    retry,
    store_path,
)
from faceforge.jobs.executors.local_runner import process_start_time, write_atomic
from faceforge.jobs.paths import job_dir
from faceforge.jobs.store import new_id
from faceforge.locks import try_lock
from faceforge.registry import CHAMPION_ALIAS, REGISTERED_MODEL, Version, select_and_register

STATE_FILE = "demo.json"
CACHE = "cache"  # aligned crops: what a fresh start keeps, as they depend only on the photos and the settings
# The sample ships photos of at most 112 px, where faces are ~40 px wide: search smaller faces, accept closer eyes.
SMALL_PHOTOS = ("min_face_size=20", "quality.min_inter_ocular=10")
# MTCNN's smallest face when aligning, px. A larger one drops pyramid levels: 32 px is 1.3x faster than 20 on
# CelebA's 256 px photos and found the same faces in 160 of them; 60 px is 4x faster on LFW's (faces ~95 px).
ALIGN_MIN_FACE = {"base": 32, "pairs": 60}
SAMPLE_ALIGN_MIN_FACE = {"base": 12, "pairs": 24}  # the shipped sample's photos are shrunk to 112 and 100 px
# Every pair photo gets a crop, so every model is evaluated on all the pairs; a base photo without a face is left out.
PAIR_FALLBACKS = ("haar", "center")
ALIGN_WORKERS = 2
GRACE_SECONDS = 10  # SIGTERM to SIGKILL for a job the demo stops: the trainer checkpoints at the next step
# What each stage's jobs must read and write (its data, evaluation set, MLflow database, starting point).
DEMO_SETS = frozenset({
    "data", "data.root", "data.crop_fraction", "eval", "eval.pairs", "eval.root", "eval.bin", "eval.crop_fraction",
    "mlflow", "mlflow.tracking_uri", "mlflow.experiment", "trainer.init_from", "distill", "distill.teacher",
})  # fmt: skip
FINE_TUNE_WARMUP = 10  # steps: the default 100 would be most of a short fine-tuning run


@dataclass
class Stage:
    name: str
    seconds: float
    figures: dict[str, str]  # what the summary table shows
    values: dict[str, Any]  # what later stages (and a resumed run) need


def check_overrides(profile: Profile, overrides: list[str]) -> None:
    """The user's training overrides, checked before anything runs rather than minutes later inside a job."""
    keys = [override_key(override) for override in overrides]
    if profile.sweep_key in keys:
        raise DemoError(
            f"{profile.sweep_key} is what the demo's sweep varies ({profile.sweep}); override something else"
        )
    if owned := [key for key in keys if key in DEMO_SETS]:
        raise DemoError(f"{owned[0]} is set by the demo for each stage; override something else")
    try:
        jobs = make_jobs(merge_overrides(["trainer=demo", *RECIPE, *profile.model], overrides), name="demo-check")
    except ValueError as err:
        raise DemoError(f"demo overrides: {err}") from None
    if len(jobs) > 1:
        raise DemoError("demo overrides take one value each; the demo runs its own sweep")


def lock_home(home: Path) -> int:
    """A lock on the home directory, held while the demo lives: a second demo there would stop this one's jobs."""
    home.mkdir(parents=True, exist_ok=True)
    if (descriptor := try_lock(home, os.O_RDONLY)) is None:
        raise DemoError(f"another faceforge demo is running in {home}")
    return descriptor


def open_home(home: Path, profile: Profile, fresh: bool) -> dict[str, Any]:
    """The demo state of `home`: resumed when unfinished, otherwise (or with `fresh`) a clean start."""
    path = home / STATE_FILE
    if home.exists() and any(home.iterdir()) and not path.is_file():
        raise DemoError(f"{home} holds files the demo did not make; choose another --home")
    state = json.loads(path.read_text()) if path.is_file() else None
    if state is not None:
        stop_leftovers(home, state)
        if not (fresh or state["complete"]) and state["profile"] != profile.name:
            raise DemoError(
                f"{home} holds an unfinished {state['profile']} demo: resume it with --profile {state['profile']} "
                "or start over with --fresh"
            )
        if fresh or state["complete"]:
            # Marked complete, and kept until the new state replaces it below: a wipe killed part-way leaves a home
            # the next run recognises and wipes again, with or without --fresh.
            write_atomic(path, json.dumps(state | {"complete": True}, indent=1))
            for entry in home.iterdir():
                if entry.name in (CACHE, STATE_FILE):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            state = None
    home.mkdir(parents=True, exist_ok=True)
    state = state or {"profile": profile.name, "complete": False, "stages": {}, "jobs": {}, "children": {}}
    write_atomic(path, json.dumps(state, indent=1))
    return state


def stop_leftovers(home: Path, state: dict[str, Any]) -> None:
    """Children and jobs of an earlier demo that was killed outright: stopped, so they cannot race this one."""
    from faceforge.jobs.executors import get_executor

    children = list(state.get("children", {}).values())
    for pid, started in children:
        if process_start_time(pid) == started:  # the very process the earlier demo started, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS  # an old scheduler still ticking could start a job after the list
    while any(process_start_time(pid) == started for pid, started in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    executor = get_executor("local", grace_seconds=GRACE_SECONDS)
    store = JobStore(store_path(home))
    leftover = [job for job in store.list(limit=1_000) if not job.terminal and job.handle]
    deadline = time.monotonic() + 3 * GRACE_SECONDS
    while leftover and time.monotonic() < deadline:
        for job in leftover:
            executor.stop(job)
        time.sleep(1.0)
        leftover = [job for job in leftover if executor.status(job).state not in TERMINAL]
    for job in store.list(limit=1_000):
        if job.terminal:
            continue
        if job.state == RUNNING and job.lease_owner and executor.status(job).state in TERMINAL:
            # Its scheduler died with the earlier demo, so the job is recorded as it ended: stopped, resumable.
            store.finish(job.id, job.lease_owner, CANCELLED, error="stopped when an earlier demo was killed")
        else:
            store.cancel(job.id)


class Demo:
    def __init__(
        self,
        home: Path,
        profile: Profile,
        data: DemoData,
        overrides: list[str],
        port: int,
        fresh: bool,
    ) -> None:
        self.home, self.profile, self.data, self.overrides = home.resolve(), profile, data, overrides
        self.on_sample = data.train_root == SAMPLE_ROOT / "train"  # small photos: smaller faces to search for
        self.out = tqdm.write  # between progress bars
        check_overrides(profile, overrides)
        self.lock = lock_home(self.home)
        self.state = open_home(self.home, profile, fresh)
        self.uri = f"sqlite:///{self.home}/mlflow.db"
        self.store = JobStore(store_path(self.home))
        # The web UI lists the training sets the demo makes (base, and union once the sweep builds it).
        roots = os.pathsep.join(str(self.home / "data" / name) for name in ("base", "union"))
        self.env = os.environ | {"FACEFORGE_HOME": str(self.home), "FACEFORGE_DATA_ROOTS": roots}
        self.env["MLFLOW_TRACKING_URI"] = self.uri  # what MLflow falls back on anywhere a child does not say
        self.port, self.url = port, ""  # the port is taken when the web server starts, not minutes before
        self.stages: list[Stage] = []
        self.children: list[Child] = []

    # Bookkeeping

    def save(self) -> None:
        write_atomic(self.home / STATE_FILE, json.dumps(self.state, indent=1))

    def stage(self, name: str, run: Callable[[], tuple[dict[str, str], dict[str, Any]]]) -> Stage:
        if (done := self.state["stages"].get(name)) is not None:
            self.out(f"\n== {name}: done in an earlier run, kept")
            stage = Stage(**done)
        else:
            self.out(f"\n== {name}")
            start = time.monotonic()
            figures, values = run()
            stage = Stage(name, time.monotonic() - start, figures, values)
            self.state["stages"][name] = asdict(stage)
            self.save()
        self.out("   " + "; ".join(f"{k} {v}" for k, v in stage.figures.items()))
        self.stages.append(stage)
        return stage

    def value(self, stage: str, key: str) -> Any:
        return self.state["stages"][stage]["values"][key]

    @property
    def sets(self) -> DemoSets:
        values = self.value("data", "sets")
        return DemoSets(**{k: Path(v) if isinstance(v, str) else v for k, v in values.items()})

    # The loop

    def run(self, keep_serving: bool = False) -> list[Stage]:
        started = time.monotonic()
        try:
            self.stage("data", self.prepare)
            self.stage("align", self.align)
            self.start_services()
            self.stage("base model", self.train_base)
            self.stage("label round 1", lambda: self.label(1))
            self.stage("sweep", self.sweep)
            self.stage("distill", self.distill)
            self.stage("export int8", self.export)
            self.stage("label round 2", lambda: self.label(2))
            self.state["complete"] = True
            self.save()
            self.stages.append(Stage("total", time.monotonic() - started, {}, {}))
            self.out("\n" + summary_table(self.stages))
            self.out(self.where_to_look(keep_serving))
            if keep_serving:
                self.out(f"\nserving the web UI at {self.url} until Ctrl-C")
                with contextlib.suppress(KeyboardInterrupt):  # the end the user asked for, not an interruption
                    self.serve()
        finally:
            self.stop()
        return self.stages

    def serve(self) -> None:
        """Until Ctrl-C, or a server dies. Short sleeps, not one endless wait: the kernel may deliver SIGINT to
        any thread (MLflow's, tqdm's), and then only a main thread that wakes on its own runs Python's handler."""
        while True:
            time.sleep(0.5)
            for child in self.children:
                child.check()

    def start_services(self) -> None:
        from faceforge.web.security import resolve_token

        start = time.monotonic()
        token = resolve_token(self.home)  # created here, so the demo can print it: the web server prints nothing
        logs = self.home / "logs"
        scheduler = ["scheduler", "--slots", "2", "--poll-seconds", "0.5", "--grace-seconds", str(GRACE_SECONDS)]
        self.scheduler = Child("scheduler", scheduler, self.env, logs)
        self.children.append(self.scheduler)
        port = free_port(self.port)
        self.url = f"http://127.0.0.1:{port}"
        web = Child("web", ["web", "--port", str(port)], self.env, logs)
        self.children.append(web)
        self.state["children"] = {c.name: [c.process.pid, process_start_time(c.process.pid)] for c in self.children}
        self.save()
        wait_until_serving(web, self.url)
        self.out(f"\nweb UI: {self.url}  (token {token}; log in to submit)  logs: {logs}")
        self.stages.append(Stage("services", time.monotonic() - start, {"web": self.url, "scheduler": "2 slots"}, {}))

    def stop(self) -> None:
        """Cancel the demo's unfinished jobs through the scheduler (SIGTERM, then SIGKILL), then stop the servers."""
        if not self.children:
            return
        pending = [job for job in self.store.list(limit=1_000) if not job.terminal]
        for job in pending:
            self.store.cancel(job.id)
        deadline = time.monotonic() + 3 * GRACE_SECONDS
        while pending and time.monotonic() < deadline and self.scheduler.process.poll() is None:
            time.sleep(0.5)
            pending = [job for job in self.store.list(limit=1_000) if not job.terminal]
        for child in reversed(self.children):
            child.stop()
        self.children = []

    # Stages

    def prepare(self) -> tuple[dict[str, str], dict[str, Any]]:
        building = self.home / ".data-building"  # built whole, then renamed: a rerun never sees half of it
        if building.exists():
            shutil.rmtree(building)
        sets = build_sets(self.data, self.profile, building)
        if (self.home / "data").exists():  # a run killed after the rename, before it recorded the stage
            shutil.rmtree(self.home / "data")
        os.replace(building, self.home / "data")
        sets = DemoSets(**{k: _moved(v, building, self.home / "data") for k, v in asdict(sets).items()})
        p = self.profile
        figures = {
            "base": f"{sets.base_identities} identities, {sets.base_images} photos",
            "inbox": f"{sets.photos} photos of {p.held_out_identities} held-out people in {p.albums} albums "
            f"({p.split_identities} people in two)",
            "from": self.data.source.split(" (")[0],
        }
        return figures, {"sets": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(sets).items()}}

    def align(self) -> tuple[dict[str, str], dict[str, Any]]:
        """The base photos and the pairs' photos to the auto-labeller's aligned crops, on every core."""
        sets = self.sets
        min_face = SAMPLE_ALIGN_MIN_FACE if self.on_sample else ALIGN_MIN_FACE
        figures, values = {}, {}
        for name, photos, source, dst, fallbacks in (
            ("base", sets.base_photos, self.data.train_root, sets.base, ()),
            ("pairs", sets.pair_photos, self.data.pairs_root, sets.pairs_root, PAIR_FALLBACKS),
        ):
            start = time.monotonic()
            counts, new = align_set(
                photos, source, self.home / CACHE, dst, ALIGN_WORKERS, min_face_size=min_face[name], fallbacks=fallbacks
            )
            seconds = time.monotonic() - start
            done = f"{new} aligned at {new / seconds:.1f} img/s" if new else "all from the cache"
            figures[name] = f"{counts['aligned']} of {counts.total()} photos ({done})"
            values[name] = dict(counts) | {"new": new, "seconds": seconds}
        if not values["base"].get("aligned"):
            raise DemoError(f"no face found in any of the {sets.base_images} base photos under {sets.base_photos}")
        return figures, values

    def training(self, *extra: str) -> list[str]:
        """The overrides of a training job: issue 2's recipe, the profile's model, `extra`, then the user's."""
        sets, p = self.sets, self.profile
        common = [
            "trainer=demo",
            *RECIPE,
            f"data.batch_size={p.batch_size}",
            "data.crop_fraction=1.0",  # aligned crops: the whole crop is the face, as the auto-labeller embeds it
            f"eval.pairs={quoted_path(sets.pairs)}",
            f"eval.root={quoted_path(sets.pairs_root)}",
            "eval.crop_fraction=1.0",
            f"mlflow.tracking_uri={quoted_path(self.uri)}",
        ]
        return merge_overrides(merge_overrides(merge_overrides(common, list(p.model)), list(extra)), self.overrides)

    def submit(self, stage: str, jobs: list[Job]) -> list[Job]:
        """Enqueue a stage's jobs, or take up those of an interrupted run: jobs still going are followed, and
        stopped ones with the same settings are queued again, so their trainers resume from their checkpoints."""
        earlier = [self.store.get(i) for i in self.state["jobs"].get(stage, [])]
        stopped = [job for job in earlier if job.state in (FAILED, CANCELLED, LOST)]
        stopping = [job for job in earlier if job.cancel_requested and not job.terminal]
        if earlier and not stopped and not stopping:
            self.out(f"   following the jobs of an earlier run: {', '.join(job.id for job in earlier)}")
            return earlier
        if earlier and not stopping and [job.overrides for job in earlier] == [job.overrides for job in jobs]:
            for job in stopped:
                retry(self.store, self.home, job.id)
            self.out(f"   resuming the stopped jobs of an earlier run: {', '.join(job.id for job in stopped)}")
            return earlier
        self.store.submit(jobs)
        self.state["jobs"][stage] = [job.id for job in jobs]
        self.save()
        self.out(f"   queued {', '.join(f'{job.id} ({job.name})' for job in jobs)}: see {self.url}/queue")
        return jobs

    def checkpoints(self, job_id: str) -> Path:
        """Where a job's trainer keeps its checkpoints (and the `latest` pointer that loaders follow)."""
        return job_dir(self.home, job_id) / "checkpoints"

    def champion_of(self, sweep_id: str) -> Version:
        """The sweep's champion over every point as it ended. The scheduler registers the same when the last point
        ends (selection is idempotent per sweep), but after an interrupted run it may also have crowned the points
        that had ended by then, which a rerun must not take for the whole sweep's champion."""
        try:
            return select_and_register(self.uri, sweep_id)[1]
        except ValueError as err:
            raise DemoError(f"sweep {sweep_id} ended without a champion: {err}") from None

    def train_base(self) -> tuple[dict[str, str], dict[str, Any]]:
        """Issue 2's recipe on 2 ranks through the queue, as a sweep of one, so the scheduler registers it."""
        base = quoted_path(self.sets.base)
        overrides = self.training(f"data.root={base}", f"trainer.steps={self.profile.base_steps}")
        (job,) = self.submit("base", make_jobs(overrides, name="demo-base", sweep_id=new_id("sweep")))
        follow_jobs(self.store, [job.id], "base model", self.scheduler)
        assert job.sweep_id is not None
        version = self.champion_of(job.sweep_id)
        job = self.store.get(job.id)
        figures = {
            **accuracy_figures(job.metrics),
            "champion": f"v{version.version}",
            "mlflow run": job.mlflow_run_id or "-",
        }
        return figures, {"job": job.id, "version": version.version, "run": job.mlflow_run_id}

    def label(self, number: int) -> tuple[dict[str, str], dict[str, Any]]:
        """One auto-label round with the current champion: the first labels the inbox, the second re-labels
        everything because the champion changed; each version is scored against the ground truth."""
        from faceforge.data_pipeline.autolabel import Autolabeller, exclusive, load_config, resolve_model
        from faceforge.data_pipeline.versions import list_versions, read_stats

        overrides = [
            f"model=models:/{REGISTERED_MODEL}@{CHAMPION_ALIAS}",
            f"tracking_uri={self.uri}",
            "settle_seconds=0",
        ]
        if self.on_sample:
            overrides += SMALL_PHOTOS
        workdir, sets = self.home / "autolabel", self.sets
        with exclusive(workdir, sets.inbox), inbox_bar(sets.inbox, f"label round {number}"):
            labeller = Autolabeller(sets.inbox, workdir, load_config(None, overrides), log=self.out)
            try:
                report = labeller.run_once()
            finally:
                labeller.state.close()
        if report is not None:
            version, stats = workdir / "versions" / report.version, report.stats
        else:
            # Nothing new. A run killed after the auto-labeller published this round's version, before demo.json
            # recorded the stage, left it as the newest version, labelled with the current champion: take it up.
            versions = list_versions(workdir / "versions")
            stats = read_stats(versions[-1]) if versions else {}
            if stats.get("model") != resolve_model(labeller.config.model, labeller.config.tracking_uri)[0]:
                raise DemoError(f"round {number}: nothing to label (no new photos and the same champion)")
            version = versions[-1]
        scores = score_version(version, sets.truth, self.home / f"clusters-{version.name}.json")
        files = stats["files"]
        figures = {
            "version": f"{version.name} ({stats['identities']} identities, {stats['images']} images)",
            "files": ", ".join(f"{k} {v}" for k, v in sorted(files.items())),
            "merges": str(stats["merges"]),
            "clustering": f"pairwise F {scores.pairwise_f:.3f}, BCubed F {scores.bcubed_f:.3f}, NMI {scores.nmi:.3f}",
        }
        if number > 1:
            before = self.value(f"label round {number - 1}", "scores")
            figures["F before -> after"] = (
                f"pairwise {before['pairwise_f']:.3f} -> {scores.pairwise_f:.3f}, "
                f"BCubed {before['bcubed_f']:.3f} -> {scores.bcubed_f:.3f}, NMI {before['nmi']:.3f} -> {scores.nmi:.3f}"
            )
        return figures, {"version": str(version), "scores": asdict(scores)}

    def sweep(self) -> tuple[dict[str, str], dict[str, Any]]:
        """Fine-tune the champion on the base set plus the new version: one point per core, both at once."""
        union = self.home / "data" / "union"
        identities, images = union_folder(self.sets.base, Path(self.value("label round 1", "version")), union)
        base_dir = self.checkpoints(self.value("base model", "job"))
        overrides = self.training(
            f"data.root={quoted_path(union)}",
            # ++: a key the trainer configs leave out, so added, not overridden
            f"++trainer.init_from={quoted_path(base_dir)}",
            f"trainer.steps={self.profile.sweep_steps}",
            f"schedule.warmup_steps={FINE_TUNE_WARMUP}",
            "trainer.nproc=1",
            self.profile.sweep,
        )
        jobs = self.submit("sweep", make_jobs(overrides, name="demo-sweep"))
        follow_jobs(self.store, [job.id for job in jobs], f"sweep ({len(jobs)} points)", self.scheduler)
        assert jobs[0].sweep_id is not None
        version = self.champion_of(jobs[0].sweep_id)
        points = [self.store.get(job.id) for job in jobs]
        winner = next((job for job in points if job.mlflow_run_id == version.run_id), None)
        if winner is None:
            raise DemoError(f"the champion v{version.version} is none of this sweep's runs; see {self.uri}")
        added = Path(self.value("label round 1", "version")).name
        axis = self.profile.sweep_key
        figures = {
            "data": f"{identities} identities, {images} images (base + {added})",
            "points": ", ".join(
                f"{_axis(job, axis)} acc {accuracy_figures(job.metrics)['LFW accuracy']}" for job in points
            ),
            "champion": f"v{version.version} ({_axis(winner, axis)}, {version.metric} {version.value:.4f})",
        }
        return figures, {"sweep": jobs[0].sweep_id, "version": version.version, "job": winner.id, "union": str(union)}

    def distill(self) -> tuple[dict[str, str], dict[str, Any]]:
        """A smaller student learns the champion's embeddings (cached teacher features) on the same data."""
        teacher = f"models:/{REGISTERED_MODEL}/{self.value('sweep', 'version')}"
        overrides = self.training(
            "distill=embedding",
            f"distill.teacher={teacher}",
            "distill.cache=true",
            f"data.root={quoted_path(self.value('sweep', 'union'))}",
            f"trainer.steps={self.profile.distill_steps}",
            *self.profile.student,
        )
        (job,) = self.submit("distill", make_jobs(overrides, name="demo-distill"))
        follow_jobs(self.store, [job.id], "distill", self.scheduler)
        job = self.store.get(job.id)
        figures = {
            "student": " ".join(self.profile.student) or "teacher-sized",
            **accuracy_figures(job.metrics),
            "params": f"{job.metrics.get('model.params', float('nan')) / 1e6:.3f} M",
        }
        return figures, {"job": job.id, "run": job.mlflow_run_id}

    def export(self) -> tuple[dict[str, str], dict[str, Any]]:
        """The student to int8 ONNX, calibrated on its own training faces, logged to MLflow with its card."""
        from faceforge.export import export_model

        job = self.store.get(self.value("distill", "job"))
        out = self.home / "exports" / "student-onnx-int8"
        exported = export_model(
            f"runs:/{job.mlflow_run_id}/model",
            "onnx-int8",
            self.uri,
            out=out,
            checkpoint=self.checkpoints(job.id),
            calibration=Path(self.value("sweep", "union")),
            crop_fraction=float(yaml.safe_load(job.config_yaml)["data"]["crop_fraction"]),
            calibration_count=self.profile.calibration_images,
            overwrite=True,  # a resumed stage replaces what its interrupted attempt left
        )
        card = exported.card
        assert card.int8_bytes is not None and card.int8_latency_ms is not None
        figures = {
            "int8": f"{card.int8_bytes / 1024:.0f} KiB, {card.int8_latency_ms:.2f} ms",
            "fp32": f"{card.fp32_bytes / 1024:.0f} KiB, {card.fp32_latency_ms:.2f} ms (1 thread, batch 1)",
            "files": str(out),
        }
        return figures, {"out": str(out), "run": exported.run_id}

    def where_to_look(self, serving: bool) -> str:
        home, last = self.home, Path(self.value("label round 2", "version")).name
        web = self.url if serving else f"FACEFORGE_HOME={home} faceforge web"  # the demo's servers stop as it ends
        return "\n".join(
            [
                "\nwhere to look:",
                f"  web UI        {web}  (token in {home / 'web_token'})",
                f"  MLflow UI     faceforge mlflow-ui --tracking-uri {self.uri}",
                f"  datasets      FACEFORGE_HOME={home} faceforge data list",
                f"  clustering    faceforge data cluster-eval {home}/clusters-{last}.json {self.sets.truth}",
                f"  int8 model    {self.value('export int8', 'out')}",
            ]
        )


def accuracy_figures(metrics: dict[str, float]) -> dict[str, str]:
    accuracy = metrics.get("eval.accuracy")
    tar = metrics.get("eval.tar_far_1e-03")
    return {
        "LFW accuracy": "-" if accuracy is None else f"{accuracy:.4f}",
        "TAR@FAR=1e-3": "-" if tar is None else f"{tar:.3f}",
    }


def _axis(job: Job, key: str) -> str:
    """The sweep point's setting of the swept key, e.g. optim.lr=0.02."""
    return next(o for o in job.overrides if o.split("=", 1)[0] == key)


def _moved(value: Any, old: Path, new: Path) -> Any:
    return new / value.relative_to(old) if isinstance(value, Path) and value.is_relative_to(old) else value


def summary_table(stages: list[Stage]) -> str:
    """One row per stage: its wall time and figures."""
    rows = [("stage", "wall time", "figures")]
    rows += [(s.name, _minutes(s.seconds), "; ".join(f"{k} {v}" for k, v in s.figures.items())) for s in stages]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{name:<{widths[0]}}  {wall:>{widths[1]}}  {figures}".rstrip() for name, wall, figures in rows]
    return "\n".join([lines[0], "-" * max(len(line) for line in lines), *lines[1:]])


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s" if seconds >= 60 else f"{seconds:.1f} s"


@contextmanager
def inbox_bar(inbox: Path, label: str) -> Iterator[None]:
    """A bar over the inbox's photos: the auto-labeller moves each one out once decided."""

    def remaining() -> int:
        return sum(1 for p in inbox.rglob("*") if p.is_file())

    total, stop = remaining(), threading.Event()
    bar = tqdm(total=total, desc=label, unit="photo", dynamic_ncols=True, disable=total == 0)

    def watch() -> None:
        while not stop.wait(1.0):
            bar.update(total - remaining() - bar.n)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.update(total - remaining() - bar.n)
        bar.close()
