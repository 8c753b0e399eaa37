"""Command-line entry point: `faceforge <command>`; each command is a thin wrapper over a library call."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # commands import what they need when they run, so `faceforge --help` stays fast
    from faceforge.jobs import Job, JobStore

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _train(args: argparse.Namespace) -> None:
    from faceforge.train.app import main

    main(["--multirun", *args.overrides] if args.multirun else args.overrides)


def _distill(args: argparse.Namespace) -> None:
    from faceforge.distill.cli import main

    main(args.overrides, args.multirun)


def _prune(args: argparse.Namespace) -> None:
    from faceforge.prune.cli import main

    main(args)


def _eval(args: argparse.Namespace) -> None:
    import tempfile

    from faceforge.data import ImageFolderDataset, load_bin, load_pairs
    from faceforge.eval import (
        check_folds,
        embed_images,
        evaluate_verification,
        format_metrics,
        gallery_probe_split,
        identification_rank_k,
        save_roc_plot,
    )
    from faceforge.eval.report import pair_scores
    from faceforge.eval.sources import load_model, recorded_settings

    # Every input is read and checked before the first image is embedded: a mistake costs seconds, not a run.
    vset = None
    if args.bin or args.pairs:
        vset = load_bin(args.bin) if args.bin else load_pairs(args.pairs, args.root or args.pairs.parent)
        check_folds(vset.issame, vset.folds)
    if args.gallery:
        folder = ImageFolderDataset(args.gallery)
        gallery, probe = gallery_probe_split(folder.labels)
    if args.roc:
        if vset is None or args.roc.is_dir():
            raise ValueError(f"--roc {args.roc}: " + ("give a .png file path" if vset else "give --pairs or --bin"))
        args.roc.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.roc.parent).close()  # an unwritable folder fails now, not after the run
    model = load_model(args.model, args.tracking_uri)
    input_size = getattr(model, "input_size", None) if args.input_size is None else args.input_size
    if not isinstance(input_size, int):
        raise ValueError(f"{args.model} does not record its input size: give --input-size")
    crop = args.crop_fraction
    if crop is None:  # raw LFW photos need ~0.5, aligned crops 1.0: what the model's own evaluation used
        crop = float(recorded_settings(args.model, args.tracking_uri).get("eval.crop_fraction") or 1.0)
        print(f"crop fraction {crop:g}, as the model's training evaluated (--crop-fraction to change)", flush=True)
    embed = dict(input_size=input_size, crop_fraction=crop, batch_size=args.batch_size, progress=True)
    if vset is not None:
        features = embed_images(model, vset.images, names=vset.sources, **embed)
        metrics = evaluate_verification(features, vset)
        print(format_metrics(metrics))
        if args.roc:
            save_roc_plot(pair_scores(features, vset), vset.issame, args.roc, f"{vset.name}: {args.model}")
            print(f"ROC plot: {args.roc}")
    if args.gallery:
        paths = [path for path, _ in folder.samples]
        feats = embed_images(model, [Path(p).read_bytes() for p in paths], names=paths, **embed)
        ranks = identification_rank_k(feats[gallery], folder.labels[gallery], feats[probe], folder.labels[probe])
        print("  ".join(f"rank-{k}={v:.4f}" for k, v in ranks.items()))


def _models(args: argparse.Namespace) -> None:
    from faceforge.models import cards_markdown, write_model_cards

    cards = write_model_cards(args.out, input_size=args.input_size, embedding_dim=args.embedding_dim)
    print(cards_markdown(cards))
    if args.out is not None:
        print(f"written to {args.out}")


def _config_reference(args: argparse.Namespace) -> None:
    from faceforge.train.app import CONFIG_DIR
    from faceforge.train.reference import configuration_reference

    args.out.write_text(configuration_reference(CONFIG_DIR))
    print(f"written to {args.out}")


def _export(args: argparse.Namespace) -> None:
    from faceforge.export import DEFAULT_CALIBRATION, EXPORTS_EXPERIMENT, export_model
    from faceforge.registry import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    try:
        result = export_model(
            args.model,
            args.format,
            uri,
            out=args.out,
            calibration=args.calibration,
            crop_fraction=args.crop_fraction,
            calibration_count=args.calibration_count,
            calibration_method=args.calibration_method or DEFAULT_CALIBRATION,
            log=not args.no_log,
            overwrite=args.overwrite,
            say=print,
        )
    except KeyboardInterrupt:  # built in a hidden folder, an export is whole only once its card.json is written
        sys.exit("faceforge export: interrupted before the export was complete; rerun to export")
    print(result.card.summary())
    print(f"written to {result.out}")
    if result.run_id is not None:
        print(f"logged to MLflow: run {result.run_id} of experiment {EXPORTS_EXPERIMENT!r} in {uri}")
        print("see it with `faceforge mlflow-ui` or on the web UI's models page")


def _data_pack(args: argparse.Namespace) -> None:
    from faceforge.data import pack_folder

    summary = pack_folder(args.src, args.dst, reencode=args.reencode, overwrite=args.overwrite)
    print("  ".join(f"{k}={v}" for k, v in summary.items()))


def _data_inspect(args: argparse.Namespace) -> None:
    from faceforge.data import format_summary, inspect_dataset

    print(format_summary(inspect_dataset(args.path, root=args.root)))


def _data_align(args: argparse.Namespace) -> None:
    from faceforge.data_pipeline import align_tree

    try:
        counts = align_tree(
            args.src,
            args.dst,
            args.detector,
            args.workers,
            args.size,
            all_faces=args.all_faces,
            fallbacks=args.fallback or (),
            redo=args.redo or (),
            min_face_size=args.min_face_size,
        )
    except KeyboardInterrupt:  # the manifest holds every photo done so far
        sys.exit(f"faceforge data align: interrupted; rerun the same command to resume ({args.dst})")
    print("  ".join(f"{k}={v}" for k, v in counts.items()) + f"  manifest: {args.dst / 'manifest.jsonl'}")


def _data_cluster_eval(args: argparse.Namespace) -> None:
    from faceforge.data_pipeline.cluster_metrics import score_files

    print(score_files(args.pred, args.labels).format())


def _autolabel_workdir(args: argparse.Namespace) -> Path:
    from faceforge.jobs.paths import faceforge_home

    return args.workdir or faceforge_home() / "autolabel"


def _autolabel(args: argparse.Namespace) -> None:
    from faceforge.data_pipeline.autolabel import Autolabeller, exclusive, load_config

    config = load_config(args.config, args.overrides)
    workdir = _autolabel_workdir(args)
    with exclusive(workdir, args.inbox):
        labeller = Autolabeller(args.inbox, workdir, config)
        if args.autolabel_command == "watch":
            print(f"watching {args.inbox} every {config.poll_seconds:g} s (Ctrl-C stops after the batch in flight)")
            labeller.watch()
        elif (report := labeller.run_once()) is None:
            print("nothing to do: no new files and the same embedding model")
        else:
            print(json.dumps(report.stats, indent=2))


def _autolabel_status(args: argparse.Namespace) -> None:
    from faceforge.data_pipeline.autolabel import status

    state = status(_autolabel_workdir(args))
    last = state.get("last_round")
    print(f"work folder {state['workdir']}: daemon {'running' if state['running'] else 'not running'}")
    if last:
        rate = state["files_per_second"]
        print(f"last round {last['round']}: {last['version']}, {last['files']} file(s) in {last['seconds']:.1f} s"
              + (f" ({rate:.2f} files/s)" if rate else ""))  # fmt: skip
    if state["retraining_pending"]:
        print(f"retraining pending: {state['retraining_pending']} new identities; the job store could not take the "
              "job, and each pass tries again")  # fmt: skip
    elif state["retraining_job"]:
        print(f"retraining enqueued: {state['retraining_job']}")
    print("files: " + ("  ".join(f"{k}={v}" for k, v in sorted(state["files"].items())) or "none yet"))
    for source, outcome, reason in state.get("recent_problems", []):
        print(f"  {outcome:8} {source}: {reason}")
    if args.stale_after is not None:  # a healthcheck: the daemon runs and has beaten recently
        beat = state.get("heartbeat")
        age = time.time() - beat[0] if beat else None
        if not state["running"] or age is None or age > args.stale_after:
            sys.exit(f"faceforge autolabel status: unhealthy: daemon {'running' if state['running'] else 'down'}, "
                     f"last heartbeat {'never' if age is None else f'{age:.0f} s ago'}")  # fmt: skip


def _data_list(args: argparse.Namespace) -> None:
    from faceforge.data_pipeline.autolabel import status

    versions = status(_autolabel_workdir(args))["versions"]
    if not versions:
        print("no dataset versions yet: run `faceforge autolabel run INBOX`")
    for v in versions:
        ari = "-" if v["ari_with_previous"] is None else f"{v['ari_with_previous']:.3f}"
        drops = sum((v["drops"] or {}).values())
        print(
            f"{v['version']}  round {v['round']}  {v['identities']} identities  {v['images']} images  "
            f"{v['new_identities']} new  {v['merges']} merges  {drops} drops  ARI {ari}  {v['path']}"
        )


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1-65535)")
    return port


def _interrupt(signum: int, frame: object) -> None:
    """The first Ctrl-C (or SIGTERM) stops the demo's jobs and servers in order; more would cut that short and leave
    the servers, which run in their own sessions, behind: they are dropped until it is done. By a handler, not SIG_IGN:
    one that arrived with the first would then be reported as "ignored due to race condition" with a traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    print("faceforge demo: stopping jobs and servers (up to a minute)...", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


def _demo(args: argparse.Namespace) -> None:
    from faceforge.data.sample_data import demo_data_paths
    from faceforge.demo import PROFILES, RECIPE, Demo
    from faceforge.jobs.paths import faceforge_home

    if options := [word for word in args.overrides if word.startswith("--")]:
        raise ValueError(f"options go before the Hydra overrides: {' '.join(options)}")
    if args.train_only:  # issue 2's demo: the base model alone, trained in this process
        loop_only = {"--home": args.home, "--fresh": args.fresh, "--keep-serving": args.keep_serving}
        loop_only |= {"--profile": args.profile != "full", "--port": args.port != 8000}
        if given := [name for name, value in loop_only.items() if value]:
            raise ValueError(f"--train-only takes Hydra overrides only, not {', '.join(given)}")
        from faceforge.train.app import main

        main(["trainer=demo", *RECIPE, *args.overrides])
        return
    home = args.home or faceforge_home() / "demo"
    data = demo_data_paths()
    print(f"faceforge demo ({args.profile} profile) in {home}; data: {data.source}", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a service manager's stop is a Ctrl-C
        signal.signal(sig, _interrupt)
    try:
        demo = Demo(home, PROFILES[args.profile], data, args.overrides, port=args.port, fresh=args.fresh)
        demo.run(keep_serving=args.keep_serving)
    except KeyboardInterrupt:
        sys.exit(f"faceforge demo: interrupted; jobs and servers stopped. Rerun it to resume ({home})")


def _job_store() -> JobStore:
    from faceforge.jobs import JobStore, store_path

    return JobStore(store_path())


def _stored_job(store: JobStore, job_id: str) -> Job:
    try:
        return store.get(job_id)
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def _enqueue(command: str, overrides: list[str], **options: Any) -> None:
    """Validate every point first, so a bad override enqueues nothing; then print ids and queue positions."""
    from faceforge.jobs import make_jobs
    from faceforge.train.config import ConfigError

    try:
        jobs = make_jobs(overrides, **options)
    except ConfigError as err:
        print(f"faceforge queue {command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    store = _job_store()
    store.submit(jobs)
    positions = store.positions()
    sweep = f" in sweep {jobs[0].sweep_id}" if jobs[0].sweep_id else ""
    print(f"queued {len(jobs)} job(s){sweep} ({store.path})")
    for job in jobs:
        print(f"  {job.id}  position {positions.get(job.id, '-')}  {job.name}  {' '.join(job.overrides)}")


def _queue_submit(args: argparse.Namespace) -> None:
    options = dict(name=args.name, priority=args.priority or 0, slots=args.slots, executor=args.executor or "local")
    _enqueue("submit", args.overrides, **options)


def _queue_clone(args: argparse.Namespace) -> None:
    from faceforge.jobs import merge_overrides, override_key
    from faceforge.train.config import ConfigError

    original = _stored_job(_job_store(), args.id)
    try:
        overrides = merge_overrides(original.overrides, args.overrides)
    except ConfigError as err:
        print(f"faceforge queue clone: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"clone of {original.id}: {' '.join(overrides)}")
    slots = args.slots
    if slots is None and not any(override_key(o) == "trainer.nproc" for o in args.overrides):
        slots = original.slots  # the original's share of the machine, unless the clone changes its ranks
    _enqueue(
        "clone",
        overrides,
        name=args.name,
        priority=original.priority if args.priority is None else args.priority,
        slots=slots,
        executor=args.executor or original.executor,
    )


def _when(timestamp: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _queue_list(args: argparse.Namespace) -> None:
    if args.limit < 0:
        print("faceforge queue list: error: --limit must be 0 (all jobs) or more", file=sys.stderr)
        sys.exit(2)
    store = _job_store()
    states, limit = [args.state] if args.state else None, args.limit or None
    # One row past the limit tells that some were left out, without counting every job; SQLite reads -1 as no limit.
    fetched = store.list(states=states, sweep_id=args.sweep, limit=limit + 1 if limit else -1)
    jobs = fetched[:limit]
    positions = store.positions()
    rows = [("ID", "NAME", "STATE", "POS", "PRIO", "SLOTS", "EXECUTOR", "TRIES", "CREATED", "SWEEP")]
    for job in jobs:
        position, created = str(positions.get(job.id, "")), _when(job.created_at)
        row = (job.id, job.name, job.state, position, str(job.priority), str(job.slots), job.executor)
        rows.append((*row, str(job.attempts), created, job.sweep_id or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if len(fetched) > len(jobs):  # the oldest are the ones hidden, among them the head of the queue
        kind = f"{args.state} jobs" if args.state else "jobs"
        print(f"showing the {len(jobs)} newest {kind}; more exist: pass --limit 0 to list them all", file=sys.stderr)


def _queue_show(args: argparse.Namespace) -> None:
    store = _job_store()
    job = _stored_job(store, args.id)
    fields = {
        "id": job.id,
        "name": job.name,
        "state": job.state + (f" (position {position})" if (position := store.positions().get(job.id)) else ""),
        "sweep": job.sweep_id or "-",
        "executor": f"{job.executor}, {job.slots} slot(s), {job.nodes} node(s), priority {job.priority}",
        "attempts": f"{job.attempts} of {job.max_attempts}",
        "created": _when(job.created_at),
        "started": _when(job.started_at),
        "finished": _when(job.finished_at),
        "cancel requested": "yes" if job.cancel_requested else "no",
        "lease": f"{job.lease_owner} until {_when(job.lease_expires)}" if job.lease_owner else "-",
        "handle": job.handle or "-",
        "exit code": "-" if job.exit_code is None else str(job.exit_code),
        "mlflow run": job.mlflow_run_id or "-",
        "log": job.log_path or "-",
        "error": job.error or "-",
        "overrides": " ".join(job.overrides),
    }
    for key, value in fields.items():
        print(f"{key + ':':18}{value}")
    for key, value in sorted(job.metrics.items()):
        print(f"{'  ' + key + ':':18}{value:.6g}")


def _queue_logs(args: argparse.Namespace) -> None:
    import time

    from faceforge.jobs.logs import read_log

    store = _job_store()
    job = _stored_job(store, args.id)
    if job.state == "queued" and not args.follow:
        print(f"{job.id} is queued; it has no log yet (--follow waits for it)", file=sys.stderr)
        return
    offset, log_path = 0, job.log_path
    while True:  # the log in the job folder, which the scheduler keeps copying from a remote executor
        if job.log_path != log_path:  # a new Ray submission writes a new file; local attempts append to job.log
            offset, log_path = 0, job.log_path
        finished = job.terminal  # known before the read, so the last read sees all the job wrote
        text, offset = read_log(job.log_path, offset, finished)
        sys.stdout.write(text)
        sys.stdout.flush()
        if not text:
            if finished or not args.follow:
                return
            time.sleep(0.5)
        job = store.get(job.id)


def _queue_cancel(args: argparse.Namespace) -> None:
    store = _job_store()
    job = _stored_job(store, args.id)
    ended = job.terminal
    if not ended:
        job = store.cancel(job.id)
        ended = job.terminal and job.state != "cancelled"  # it ended just before the cancel, which left it so
    if ended:
        raise ValueError(f"{job.id} already {job.state}")
    if job.terminal:
        print(f"{job.id} cancelled")
    else:
        print(
            f"{job.id} cancel requested: its scheduler sends SIGTERM (the trainer checkpoints), SIGKILL after a grace"
        )


def _scheduler(args: argparse.Namespace) -> None:
    import logging
    import threading

    from faceforge.jobs import JobStore, faceforge_home, store_path
    from faceforge.jobs.executors import get_executor
    from faceforge.jobs.scheduler import Scheduler

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("faceforge").setLevel(logging.INFO)
    executors = {"local": get_executor("local", slots=args.slots, grace_seconds=args.grace_seconds)}
    if args.ray_address:
        executors["ray"] = get_executor("ray", address=args.ray_address)
    store = JobStore(store_path())
    scheduler = Scheduler(store, executors, faceforge_home(), args.lease_seconds, args.poll_seconds)
    if args.once:
        scheduler.run_once()
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # running jobs carry on; another scheduler adopts them
        signal.signal(sig, lambda signum, frame: stop.set())
    print(f"scheduler {scheduler.owner} on {store.path}; Ctrl-C stops it, running jobs carry on", flush=True)
    scheduler.run_forever(stop)


def _registry_champion(args: argparse.Namespace) -> None:
    from faceforge.registry import REGISTERED_MODEL, champion, default_tracking_uri

    print(champion(args.tracking_uri or default_tracking_uri(), args.name or REGISTERED_MODEL).describe())


def _registry_select(args: argparse.Namespace) -> None:
    from faceforge.registry import default_tracking_uri, select_and_register, sweep_policy

    uri = args.tracking_uri or default_tracking_uri()
    # Each option given replaces that part of the policy the sweep was launched with; the rest is kept.
    policy, _ = sweep_policy(
        uri, args.sweep_id, metric=args.metric, max_latency_ms=args.max_latency_ms, max_params=args.max_params
    )
    _, version = select_and_register(uri, args.sweep_id, policy, args.name)
    print(version.describe())


def _mlflow_ui(args: argparse.Namespace) -> None:
    from faceforge.registry import default_tracking_uri
    from faceforge.registry.database import database_path

    uri = args.tracking_uri or default_tracking_uri()
    if not database_path(uri).is_file():
        raise FileNotFoundError(f"no MLflow database at {database_path(uri)}; train or queue a job first")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host]
    command += ["--port", str(args.port), "--workers", str(args.workers)]
    print(" ".join(command), flush=True)
    # MLflow's server runs its workers as children that outlive a SIGTERM to it alone: one group, stopped whole.
    server = subprocess.Popen(command, start_new_session=True)  # an argument list, never a shell

    def stop(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    sys.exit(server.wait())


def _web(args: argparse.Namespace) -> None:
    import uvicorn

    from faceforge.jobs.paths import faceforge_home
    from faceforge.web import create_app

    app = create_app(faceforge_home())
    print(f"faceforge web: http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceforge", description="Train, evaluate and package face models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (Hydra overrides, -m for sweeps)", add_help=False)
    # A leading option is not part of a REMAINDER, so Hydra's -m is declared here and passed on.
    train.add_argument("-m", "--multirun", action="store_true", help="one run per sweep point (Hydra multirun)")
    train.add_argument("overrides", nargs=argparse.REMAINDER)
    train.set_defaults(func=_train)
    distill = commands.add_parser(
        "distill", help="train a student from a frozen teacher: train distill=embedding ...", add_help=False
    )
    distill.add_argument("-m", "--multirun", action="store_true", help="one run per sweep point (Hydra multirun)")
    distill.add_argument("overrides", nargs=argparse.REMAINDER)
    distill.set_defaults(func=_distill)

    demo = commands.add_parser(
        "demo", help="the whole loop: train, auto-label, sweep, select, distil, export int8, re-label (~17 min)"
    )
    demo.add_argument("--profile", choices=("full", "tiny"), default="full", help="stage sizes; tiny is for tests")
    demo.add_argument("--home", type=Path, default=None, help="demo home (default: $FACEFORGE_HOME/demo, runs/demo)")
    demo.add_argument("--port", type=_port, default=8000, help="web UI port (another free one if taken)")
    demo.add_argument(
        "--fresh",
        action="store_true",
        help="start over instead of resuming an interrupted demo (a finished one always starts over, replacing its "
        "results)",
    )
    demo.add_argument("--keep-serving", action="store_true", help="keep the web UI up at the end until Ctrl-C")
    demo.add_argument(
        "--train-only", action="store_true", help="only issue 2's demo: MobileFaceNet on 2 ranks, LFW evaluation"
    )
    demo.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides for every training job")
    demo.set_defaults(func=_demo)

    ev = commands.add_parser("eval", help="verification (pairs.txt or .bin) and 1:N identification")
    ev.add_argument("model", help="checkpoint directory or MLflow model URI (models:/name@champion)")
    pair_set = ev.add_mutually_exclusive_group()
    pair_set.add_argument("--pairs", type=Path, help="LFW-format pairs.txt")
    pair_set.add_argument("--bin", type=Path, help="InsightFace .bin verification file")
    ev.add_argument("--root", type=Path, help="image root of --pairs (default: its folder)")
    ev.add_argument("--gallery", type=Path, help="image folder for 1:N identification (gallery/probe split)")
    ev.add_argument("--input-size", type=int, default=None, help="for models that do not record theirs")
    ev.add_argument(
        "--crop-fraction", type=float, default=None, help="default: what the model's training evaluated with, else 1"
    )
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--roc", type=Path, help="write the ROC curve to this PNG")
    ev.add_argument(
        "--tracking-uri", default=None, help="for models:/ sources; default: sqlite:///$FACEFORGE_HOME/mlflow.db"
    )
    ev.set_defaults(func=_eval)

    mdl = commands.add_parser("models", help="model card of every backbone: params, MACs, CPU latency")
    mdl.add_argument("--out", type=Path, default=None, help="also write the markdown page (docs/models.md)")
    mdl.add_argument("--input-size", type=int, default=112)
    mdl.add_argument("--embedding-dim", type=int, default=512)
    mdl.set_defaults(func=_models)

    reference = commands.add_parser("config-reference", help="write the configuration reference from configs/")
    reference.add_argument("--out", type=Path, default=DOCS / "configuration.md")
    reference.set_defaults(func=_config_reference)

    prune = commands.add_parser("prune", help="prune a backbone's channels to a MAC budget, then fine-tune it")
    prune.add_argument("model", help="checkpoint directory or MLflow model URI (models:/name@champion)")
    budget = prune.add_mutually_exclusive_group(required=True)
    budget.add_argument("--macs-ratio", type=float, help="keep at most this fraction of the model's MACs, in (0, 1]")
    budget.add_argument("--target-macs", type=int, help="keep at most this many MACs (batch 1, FLOPs / 2)")
    prune.add_argument("--criterion", choices=("bn", "l1"), default="bn", help="BN |gamma| or expand-filter L1 norm")
    prune.add_argument("--min-channels", type=int, default=8, help="hidden channels every block keeps at least")
    prune.add_argument("--out", type=Path, default=None, help="default: $FACEFORGE_HOME/pruned/<model>-<time>")
    prune.add_argument("--no-finetune", action="store_true", help="only write the pruned checkpoint")
    prune.add_argument(
        "--tracking-uri", default=None, help="for models:/ sources; default: sqlite:///$FACEFORGE_HOME/mlflow.db"
    )
    prune.add_argument("overrides", nargs="*", help="Hydra overrides of the fine-tuning run, as for `faceforge train`")
    prune.set_defaults(func=_prune)

    export = commands.add_parser("export", help="ONNX, int8 ONNX or a C array for firmware, with a model card")
    export.add_argument("model", help="checkpoint directory or MLflow model URI (models:/name@champion)")
    export.add_argument("--format", choices=("onnx", "onnx-int8", "c-array"), default="onnx")
    export.add_argument("--out", type=Path, default=None, help="default: $FACEFORGE_HOME/exports/<model>-<format>")
    export.add_argument(
        "--calibration", type=Path, help="int8 calibration faces: a folder or a .txt list (default: training data)"
    )
    export.add_argument("--calibration-count", type=int, default=256, help="images drawn evenly from the set")
    export.add_argument(
        "--calibration-method",
        help="how int8 activation ranges are taken from the faces: percentile (all but the 0.001%% largest "
        "magnitudes; the default) or minmax (all)",
    )
    export.add_argument("--crop-fraction", type=float, default=None, help="default: the crop the model trained with")
    export.add_argument(
        "--tracking-uri",
        default=None,
        help="where models:/ sources are read and the export is logged (default: sqlite:///$FACEFORGE_HOME/mlflow.db)",
    )
    export.add_argument("--no-log", action="store_true", help="only write the files; log nothing to MLflow")
    export.add_argument("--overwrite", action="store_true", help="replace the export already in --out")
    export.set_defaults(func=_export)

    data = commands.add_parser("data", help="dataset tools")
    data_cmds = data.add_subparsers(dest="data_command", required=True)
    pack = data_cmds.add_parser("pack", help="image folder -> InsightFace RecordIO (train.rec/.idx/property)")
    pack.add_argument("src", type=Path)
    pack.add_argument("dst", type=Path)
    pack.add_argument("--reencode", action="store_true", help="re-encode as JPEG instead of copying bytes")
    pack.add_argument("--overwrite", action="store_true")
    pack.set_defaults(func=_data_pack)
    insp = data_cmds.add_parser("inspect", help="summarise a folder, RecordIO dir, .bin or pairs.txt")
    insp.add_argument("path", type=Path)
    insp.add_argument("--root", type=Path, default=None, help="image root for a pairs.txt")
    insp.set_defaults(func=_data_inspect)
    align = data_cmds.add_parser("align", help="detect faces, align them to the ArcFace template, write crops")
    align.add_argument("src", type=Path, help="raw photos or an identity-folder tree")
    align.add_argument("dst", type=Path, help="the same folders, aligned JPEG crops and manifest.jsonl; reruns resume")
    align.add_argument("--detector", choices=("mtcnn", "haar"), default="mtcnn")
    align.add_argument(
        "--fallback",
        action="append",
        choices=("haar", "center"),
        help="for photos without a face found, in the order given; center (O-Net in the middle) crops every photo",
    )
    align.add_argument(
        "--redo", action="append", choices=("no_face", "error"), help="run the photos so recorded again (resume skips)"
    )
    align.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    align.add_argument("--size", type=int, default=112, help="crop side in pixels")
    align.add_argument("--min-face-size", type=int, default=20, help="smallest face searched for, in pixels")
    align.add_argument(
        "--all-faces", action="store_true", help="every face as <stem>_<k>.jpg, not the largest, most central one"
    )
    align.set_defaults(func=_data_align)
    cluster_eval = data_cmds.add_parser(
        "cluster-eval", help="score a clustering against true labels: pairwise and BCubed P/R/F, NMI, counts"
    )
    files_help = "a .csv with a path,label header row, or a .json object {path: label}; both list the same faces"
    cluster_eval.add_argument("pred", type=Path, help=f"predicted clusters: {files_help}")
    cluster_eval.add_argument("labels", type=Path, help="true identities, same format")
    cluster_eval.set_defaults(func=_data_cluster_eval)
    listing = data_cmds.add_parser("list", help="the auto-labelled dataset versions, oldest first")
    listing.add_argument("--workdir", type=Path, default=None, help="default: $FACEFORGE_HOME/autolabel")
    listing.set_defaults(func=_data_list)

    autolabel = commands.add_parser("autolabel", help="label an inbox of photo albums into versioned datasets")
    autolabel_cmds = autolabel.add_subparsers(dest="autolabel_command", required=True)
    for name, text in (
        ("run", "one round over what is in the inbox now, then exit"),
        ("watch", "rounds whenever files arrive or the champion changes, until stopped"),
    ):
        cmd = autolabel_cmds.add_parser(name, help=text)
        cmd.add_argument("inbox", type=Path, help="one sub-folder per album; files are moved out once decided")
        cmd.add_argument(
            "overrides", nargs="*", help="key=value over configs/autolabel.yaml, e.g. cluster.threshold=0.6"
        )
        cmd.add_argument("--config", type=Path, default=None, help="another autolabel.yaml")
        cmd.add_argument("--workdir", type=Path, default=None, help="default: $FACEFORGE_HOME/autolabel")
        cmd.set_defaults(func=_autolabel)
    autolabel_status = autolabel_cmds.add_parser("status", help="last round, files by outcome, recent problems")
    autolabel_status.add_argument("--workdir", type=Path, default=None, help="default: $FACEFORGE_HOME/autolabel")
    autolabel_status.add_argument(
        "--stale-after", type=float, default=None, help="exit 1 unless a daemon runs and beat within this many s"
    )
    autolabel_status.set_defaults(func=_autolabel_status)

    queue = commands.add_parser("queue", help="the job queue ($FACEFORGE_HOME/jobs.db): submit, watch, cancel")
    queue_cmds = queue.add_subparsers(dest="queue_command", required=True)
    submit = queue_cmds.add_parser(
        "submit", help="enqueue a training job; sweep grammar (lr=0.1,0.05) makes one per point"
    )
    clone = queue_cmds.add_parser("clone", help="enqueue a copy of a job; overrides replace those of the same key")
    clone.add_argument("id")
    for command, required in ((submit, "+"), (clone, "*")):
        command.add_argument("overrides", nargs=required, help="Hydra overrides, as for `faceforge train`")
        command.add_argument(
            "--priority", type=int, default=None, help="higher runs first (default 0 / the original's)"
        )
        command.add_argument(
            "--slots",
            type=int,
            default=None,
            help="cores (GPUs) it takes (default trainer.nproc; a clone keeps the original's unless it sets that)",
        )
        command.add_argument("--executor", choices=("local", "ray"), default=None)
        command.add_argument("--name", default=None, help="default: <backbone>-<head>")
    submit.set_defaults(func=_queue_submit)
    clone.set_defaults(func=_queue_clone)
    listing = queue_cmds.add_parser("list", help="jobs, newest first, with their queue positions")
    listing.add_argument("--state", choices=("queued", "running", "succeeded", "failed", "cancelled", "lost"))
    listing.add_argument("--sweep", default=None, help="only the jobs of this sweep id")
    listing.add_argument("--limit", type=int, default=1000, help="list at most this many, the newest (0: all)")
    listing.set_defaults(func=_queue_list)
    show = queue_cmds.add_parser("show", help="every field of a job")
    show.add_argument("id")
    show.set_defaults(func=_queue_show)
    logs = queue_cmds.add_parser("logs", help="a job's log")
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=_queue_logs)
    cancel = queue_cmds.add_parser("cancel", help="cancel a queued job, or stop a running one")
    cancel.add_argument("id")
    cancel.set_defaults(func=_queue_cancel)

    sched = commands.add_parser("scheduler", help="run the loop that claims queued jobs and drives executors")
    sched.add_argument("--slots", type=int, default=None, help="local slots (default: this machine's cores)")
    sched.add_argument(
        "--ray-address",
        default=os.environ.get("FACEFORGE_RAY_ADDRESS") or None,
        help="also drive ray jobs on this cluster (dashboard URL; default $FACEFORGE_RAY_ADDRESS)",
    )
    sched.add_argument("--once", action="store_true", help="one pass (claim, start, record), then exit")
    sched.add_argument("--lease-seconds", type=float, default=30.0, help="how soon another scheduler adopts jobs")
    sched.add_argument("--poll-seconds", type=float, default=1.0)
    sched.add_argument("--grace-seconds", type=float, default=30.0, help="SIGTERM to SIGKILL on cancel")
    sched.set_defaults(func=_scheduler)

    registry = commands.add_parser("registry", help="the MLflow model registry: champion and sweep selection")
    registry.add_argument("--tracking-uri", default=None, help="default: sqlite:///$FACEFORGE_HOME/mlflow.db")
    registry.add_argument("--name", default=None, help="registered model name (default: the sweep's, else faceforge)")
    registry_cmds = registry.add_subparsers(dest="registry_command", required=True)
    champ = registry_cmds.add_parser("champion", help="print the champion version, its run, metric and card")
    champ.set_defaults(func=_registry_champion)
    select = registry_cmds.add_parser("select", help="rerun a sweep's selection and register its winner")
    select.add_argument("sweep_id")
    select.add_argument(
        "--metric", default=None, help="tar_far_1e-04, accuracy, eer (lowest wins)...; default: the sweep's own policy"
    )
    select.add_argument(
        "--max-latency-ms", type=float, default=None, help="CPU latency limit (1 thread, batch 1); default: the sweep's"
    )
    select.add_argument("--max-params", type=int, default=None, help="parameter count limit; default: the sweep's")
    select.set_defaults(func=_registry_select)

    ui = commands.add_parser("mlflow-ui", help="serve the MLflow UI on the platform's tracking database")
    ui.add_argument("--tracking-uri", default=None, help="default: sqlite:///$FACEFORGE_HOME/mlflow.db")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=_port, default=5000)
    ui.add_argument("--workers", type=int, default=1, help="server processes (MLflow's default of 4 is for teams)")
    ui.set_defaults(func=_mlflow_ui)

    web = commands.add_parser("web", help="the web UI: submit jobs and sweeps, follow them, compare, pick models")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=_port, default=8000)
    web.set_defaults(func=_web)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling `overrides` at the first option; key=value words after the options are overrides too.
    if extra and args.command in ("train", "distill"):  # Hydra's own flags (--help, --cfg job, ...), in place
        args.overrides = [*extra, *args.overrides]
    elif extra and isinstance(getattr(args, "overrides", None), list) and all("=" in w[1:] for w in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "eval" and not (args.pairs or args.bin or args.gallery):
        sys.exit("faceforge eval: error: give --pairs, --bin or --gallery")
    if args.command == "eval" and args.root and not args.pairs:
        sys.exit("faceforge eval: error: --root is the image root of --pairs; give --pairs too")
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # user mistakes and unreadable or existing paths: one line
        sys.exit(f"faceforge {args.command}: error: {err}")
    except KeyboardInterrupt:  # commands that leave something to resume say so themselves
        sys.exit(f"faceforge {args.command}: interrupted")
