"""The single-process edge of training: check the config against the disk, set up MLflow, start the ranks."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from faceforge.data import load_bin, open_dataset
from faceforge.data.verification import read_pairs
from faceforge.distill.distiller import STATE_FILE as DISTILL_STATE
from faceforge.distill.teacher import IDENTITY_PREFIX, check_same_teacher, load_teacher, teacher_identity
from faceforge.eval.metrics import check_folds
from faceforge.jobs.executors.local_runner import JOB_LOCK_FD_VARIABLE
from faceforge.locks import try_lock
from faceforge.train.checkpoint import LATEST, load_file, read_meta, read_model_state, resolve_checkpoint
from faceforge.train.config import ConfigError, HeadConfig, TrainConfig
from faceforge.train.torchrun import STOP_SIGNALS
from faceforge.train.tracking import create_run, run_always_ended

RUN_ID_FILE = "mlflow_run_id"
TRAIN_LOCK = ".train.lock"
PR_SET_PDEATHSIG = 1  # prctl(2)


def resolve_data(cfg: TrainConfig) -> None:
    """Fill unset data and eval paths with the demo data: ../shared/data if present, else the shipped sample."""
    if cfg.data.root is not None and (cfg.eval.pairs or cfg.eval.bin or cfg.eval.disabled):
        return
    from faceforge.data.sample_data import demo_data_paths

    try:
        demo = demo_data_paths()
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    print(f"data: {demo.source}", flush=True)
    if cfg.data.root is None:
        cfg.data.root = str(demo.train_root)
    if not (cfg.eval.pairs or cfg.eval.bin or cfg.eval.disabled):
        cfg.eval.pairs, cfg.eval.root = str(demo.pairs), str(demo.pairs_root)


def check_against_disk(cfg: TrainConfig) -> int:
    """Errors a user should see before any process starts or an MLflow run exists; returns the number of classes."""
    if cfg.data.root == "???":  # Hydra's mark for a value the chosen group leaves to the command line
        raise ConfigError("data.root is not set: give data.root=<folder or RecordIO directory>")
    root = Path(cfg.data.root)
    if not root.exists():
        raise ConfigError(f"data.root {root} does not exist")
    try:
        dataset = open_dataset(root)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.root {root}: {err}") from None
    nproc = cfg.trainer.nproc
    if cfg.head.type == "margin":
        if dataset.num_classes < nproc:
            raise ConfigError(f"{dataset.num_classes} identities cannot be sharded over trainer.nproc={nproc} ranks")
        if len(dataset) < cfg.data.batch_size:
            raise ConfigError(
                f"data.root {root}: {len(dataset)} images cannot fill one global batch of "
                f"data.batch_size={cfg.data.batch_size}"
            )
    elif (identities := len(np.unique(dataset.labels))) < cfg.head.p * nproc:
        raise ConfigError(
            f"data.root {root}: {identities} identities cannot fill one {cfg.head.type} step of head.p={cfg.head.p} "
            f"identities x trainer.nproc={nproc} ranks"
        )
    for key in ("pairs", "root", "bin"):
        value = getattr(cfg.eval, key)
        if value and not cfg.eval.disabled and not Path(value).exists():
            raise ConfigError(f"eval.{key} {value} does not exist")
    cache_dir = Path(cfg.distill.cache_dir)
    if cfg.distill.teacher and cfg.distill.cache:  # made now, not after the teacher's whole pass over the data
        if cache_dir.exists() and not cache_dir.is_dir():
            raise ConfigError(f"distill.cache_dir {cache_dir} is a file, not a folder")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"distill.cache_dir {cache_dir} cannot be made a folder: {err.strerror}") from None
    check_verification_set(cfg)
    check_device(cfg)
    check_resume(cfg, dataset.num_classes, dataset.identity_digest)
    return dataset.num_classes


def check_verification_set(cfg: TrainConfig) -> None:
    """The evaluation set is scored only after the last step, so it is read now (a pairs file without its images):
    a missing image or a set k-fold accuracy cannot score would otherwise fail the run after all its training."""
    if cfg.eval.disabled or not (cfg.eval.bin or cfg.eval.pairs):
        return
    if cfg.eval.bin:
        source = f"eval.bin {cfg.eval.bin}"
        try:
            vset = load_bin(cfg.eval.bin)
        except (ValueError, OSError) as err:
            raise ConfigError(f"eval.bin: {err}") from None
        issame, folds = vset.issame, vset.folds
    else:
        source = f"eval.pairs {cfg.eval.pairs}"
        if not cfg.eval.root:
            raise ConfigError(f"{source} needs eval.root, the folder its image names refer to")
        try:
            _, issame, folds = read_pairs(cfg.eval.pairs, cfg.eval.root)
        except (ValueError, OSError) as err:
            raise ConfigError(f"eval.pairs: {err}") from None
    try:
        check_folds(issame, folds)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None


def check_device(cfg: TrainConfig) -> None:
    """Each local rank takes the CUDA device of its local rank, so a CUDA run needs one device per rank."""
    device = cfg.trainer.device
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return
    found = torch.cuda.device_count()
    if found < cfg.trainer.nproc:
        raise ConfigError(
            f"trainer.device={device} with trainer.nproc={cfg.trainer.nproc} needs {cfg.trainer.nproc} CUDA "
            f"device(s), found {found}"
        )


def check_resume(cfg: TrainConfig, num_classes: int, identities: str) -> None:
    """trainer.resume must hold a checkpoint this config can load: the same network, loss, optimizer and people,
    every file of it readable. Caught here, before any rank starts or the MLflow run is taken up."""
    resume, checkpoints = cfg.trainer.resume, Path(cfg.output_dir) / "checkpoints"
    if not resume or (resume == "auto" and not (checkpoints / LATEST).is_file()):
        return  # "auto" with no checkpoints yet starts fresh
    try:
        path = resolve_checkpoint(checkpoints if resume == "auto" else Path(resume))
        state = read_model_state(path, "model_config", "model", "optimizer", "step")
        meta = read_meta(path)
        for name in meta.get("head_files", []):
            load_file(path / name, "classifier shard")
    except (ValueError, OSError) as err:
        raise ConfigError(f"trainer.resume: {err}") from None
    # The loop builds the network from init_from's checkpoint when set (pruned widths included), else from model.*.
    init = cfg.trainer.init_from
    expected = read_model_state(Path(init))["model_config"] if init else asdict(cfg.model)
    if got := _differences(state["model_config"], expected):
        raise ConfigError(f"trainer.resume {path} holds a different model: {got}")
    saved_head = state.get("train_config", {}).get("head")
    if saved_head is not None:
        names = {f.name for f in fields(HeadConfig)}
        was = HeadConfig(**{key: value for key, value in saved_head.items() if key in names}).loss_settings()
        if changed := _differences(was, cfg.head.loss_settings()):
            raise ConfigError(
                f"trainer.resume {path} was trained with another loss: head {changed}; "
                f"start a new run from its weights with trainer.init_from={path}"
            )
    saved_optim = "adamw" if "betas" in state["optimizer"]["param_groups"][0] else "sgd"  # only AdamW's have betas
    if saved_optim != cfg.optim.name:
        raise ConfigError(f"trainer.resume {path} was trained with optim={saved_optim}, not {cfg.optim.name}")
    check_distill_resume(cfg, path)
    if cfg.head.type == "margin" and (saved_classes := meta.get("num_classes")) != num_classes:
        held = f"a {saved_classes}-class classifier" if saved_classes else "no margin-head classifier"
        raise ConfigError(f"trainer.resume {path} holds {held}, data.root has {num_classes} identities")
    if cfg.head.type == "margin" and meta.get("identities") not in (None, identities):  # None: saved before digests
        raise ConfigError(
            f"trainer.resume {path}: data.root holds {num_classes} identities but not the ones it trained on (other "
            f"people or another order), so its classifier rows would stand for the wrong people; resume on that "
            f"data, or start from its weights with trainer.init_from={path}"
        )


def _differences(saved: dict, config: dict) -> str:
    """`key=saved (config: value)` for each key on which a checkpoint and the config differ; empty when none."""
    keys = sorted(key for key in saved.keys() | config.keys() if saved.get(key) != config.get(key))
    return ", ".join(f"{key}={saved.get(key)!r} (config: {config.get(key)!r})" for key in keys)


def check_distill_resume(cfg: TrainConfig, path: Path) -> None:
    """The teacher must be the one the checkpoint learnt from, and a projection (teacher and student widths differ),
    whose parameters the backbone's optimizer holds, must be there in both or in neither."""
    cpu, state_file = torch.device("cpu"), path / DISTILL_STATE
    try:
        saved = load_file(state_file, "distillation state") if state_file.is_file() else {}
    except ValueError as err:
        raise ConfigError(f"trainer.resume: {err}") from None
    teacher = load_teacher(cfg.distill.teacher, cfg.mlflow.tracking_uri, cpu) if cfg.distill.teacher else None
    had_projection = bool(saved.get("projection"))
    needs_projection = teacher is not None and teacher.embedding_dim != cfg.model.embedding_dim
    if had_projection != needs_projection:
        change = "drop the" if had_projection else "add a"
        raise ConfigError(
            f"trainer.resume {path}: this run would {change} distillation projection, whose weights are in the "
            f"optimizer's state; start a new run (trainer.init_from={path} starts from its weights)"
        )
    saved_teacher = saved.get("teacher")
    if teacher is None or saved_teacher is None:
        return
    if not saved_teacher.startswith(IDENTITY_PREFIX):
        print(f"trainer.resume {path} predates teacher weight hashes: distill.teacher is taken on trust", flush=True)
    check_same_teacher(saved_teacher, teacher_identity(teacher), path, cfg.distill.teacher)


def launch(cfg: TrainConfig) -> dict[str, float]:
    """Train with cfg.trainer.nproc local ranks; returns rank 0's final evaluation metrics."""
    resolve_data(cfg)
    check_against_disk(cfg)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, or no permission
        raise ConfigError(f"output_dir {out} cannot be made a folder: {err.strerror}") from None
    lock = _train_lock(out)
    try:
        metrics, run_id = _run(cfg, out, lock)
    finally:
        os.close(lock)
    print(f"checkpoints: {out / 'checkpoints'}")
    print(f"MLflow UI:   mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}   (run {run_id})")
    return metrics


def _run(cfg: TrainConfig, out: Path, lock: int) -> tuple[dict[str, float], str]:
    """The MLflow run (a resumed run's own), then training, in this process or under torchrun."""
    run_id_file = out / RUN_ID_FILE

    def open_run() -> str:
        if cfg.trainer.resume and run_id_file.exists():
            run_id = run_id_file.read_text().strip()
            _check_run(cfg.mlflow.tracking_uri, run_id, run_id_file)
            return run_id
        tags = {f"faceforge.{key}": value for key in ("job_id", "sweep_id") if (value := getattr(cfg.mlflow, key))}
        run_id = create_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.run_name, cfg.to_dict(), tags)
        run_id_file.write_text(run_id)
        return run_id

    with run_always_ended(cfg.mlflow.tracking_uri, cfg.resume_hint, open_run) as run_id:
        config_path = out / "config.yaml"
        cfg.save(config_path)
        print(f"output: {out}\nmlflow: {cfg.mlflow.tracking_uri} run {run_id}", flush=True)
        if cfg.trainer.nproc == 1:
            from faceforge.train.loop import train

            metrics = train(cfg, run_id)
        else:
            metrics = _torchrun(cfg, config_path, run_id, lock)
    return metrics, run_id


def _train_lock(out: Path) -> int:
    """An exclusive lock on the output folder, held while this run's processes live (torchrun inherits it): two
    runs training into one folder would replace each other's checkpoints."""
    if (lock := try_lock(out / TRAIN_LOCK)) is None:
        raise ConfigError(f"{out}: another run is training in this folder; wait for it to end")
    return lock


def _check_run(tracking_uri: str, run_id: str, run_id_file: Path) -> None:
    """A resumed run logs into the MLflow run it began: one missing from this database would fail at the first log."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        deleted = MlflowClient(tracking_uri).get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException:
        raise ConfigError(
            f"{run_id_file} names MLflow run {run_id}, which {tracking_uri} does not hold: resume with the "
            "mlflow.tracking_uri it began with, or delete that file to log to a new run"
        ) from None
    if deleted:
        raise ConfigError(
            f"{run_id_file} names MLflow run {run_id}, which was deleted: restore it (`mlflow runs restore --run-id "
            f"{run_id}` with MLFLOW_TRACKING_URI={tracking_uri}), or delete that file to log to a new run"
        )


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child of a fork runs as little as it can


def die_with_parent(sig: signal.Signals, parent: int) -> None:
    """`sig` to this process when `parent` dies, even by SIGKILL (at once if it already has): torchrun gets SIGTERM
    from its launcher's death and stops its ranks; a rank gets SIGKILL from torchrun's, which no longer can."""
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def _job_lock() -> tuple[int, ...]:
    """The queue's lock on this job, when a queue runner started it: torchrun holds it too, so a launcher killed
    alone with 9 leaves the job running while torchrun stops the ranks, not ended and retried into their folder."""
    fd = os.environ.get(JOB_LOCK_FD_VARIABLE, "")
    try:
        os.fstat(int(fd))
    except (ValueError, OSError):  # not started by a runner, or not inherited here
        return ()
    return (int(fd),)


def _torchrun(cfg: TrainConfig, config_path: Path, run_id: str, lock: int) -> dict[str, float]:
    """Local ranks under torchrun; multi-node jobs run the same worker under torchrun's own rendezvous."""
    metrics_path = config_path.parent / "metrics.yaml"
    metrics_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "faceforge.train.torchrun",
        "--standalone",
        f"--nproc-per-node={cfg.trainer.nproc}",
        "-m",
        "faceforge.train.worker",
        "--config",
        str(config_path),
        "--run-id",
        run_id,
        "--metrics-out",
        str(metrics_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.trainer.threads)}
    # torchrun starts each rank in a session of its own, so no signal to a group reaches them: torchrun forwards
    # SIGTERM, and each rank dies with torchrun (see worker.py). A stop sent to this process's group reaches
    # torchrun twice, from there and from `stop` below; it acts on the first (see torchrun.py).
    launcher = os.getpid()
    ranks = subprocess.Popen(
        command,
        env=env,
        pass_fds=(lock, *_job_lock()),
        preexec_fn=lambda: die_with_parent(signal.SIGTERM, launcher),
    )
    stopped: str | None = None

    def stop(signum: int, frame: object) -> None:
        """Live on until the ranks have checkpointed, so that the caller records how the run ended."""
        nonlocal stopped
        if stopped is None:
            stopped = signal.Signals(signum).name
            ranks.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        returncode = ranks.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        raise SystemExit(f"stopped by {stopped}; {cfg.resume_hint}")
    if returncode != 0:
        raise SystemExit(f"training ranks exited with code {returncode}; see the log above")
    import yaml

    return yaml.safe_load(metrics_path.read_text()) if metrics_path.exists() else {}
