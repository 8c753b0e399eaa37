"""The single-process edge of training: check the config against the disk, set up MLflow, start the ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from faceforge.data import open_dataset
from faceforge.train.config import ConfigError, TrainConfig
from faceforge.train.tracking import create_run, finish_run

RUN_ID_FILE = "mlflow_run_id"


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
    """Errors a user should see before any process starts; returns the number of classes."""
    root = Path(cfg.data.root)
    if not root.exists():
        raise ConfigError(f"data.root {root} does not exist")
    try:
        dataset = open_dataset(root)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.root {root}: {err}") from None
    if cfg.head.type == "margin" and dataset.num_classes < cfg.trainer.nproc:
        raise ConfigError(
            f"{dataset.num_classes} identities cannot be sharded over trainer.nproc={cfg.trainer.nproc} ranks"
        )
    for key in ("pairs", "root", "bin"):
        value = getattr(cfg.eval, key)
        if value and not cfg.eval.disabled and not Path(value).exists():
            raise ConfigError(f"eval.{key} {value} does not exist")
    return dataset.num_classes


def launch(cfg: TrainConfig) -> dict[str, float]:
    """Train with cfg.trainer.nproc local ranks; returns rank 0's final evaluation metrics."""
    resolve_data(cfg)
    check_against_disk(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_id_file = out / RUN_ID_FILE
    if cfg.trainer.resume and run_id_file.exists():
        run_id = run_id_file.read_text().strip()
    else:
        tags = {f"faceforge.{key}": value for key in ("job_id", "sweep_id") if (value := getattr(cfg.mlflow, key))}
        run_id = create_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.run_name, cfg.to_dict(), tags)
        run_id_file.write_text(run_id)
    config_path = out / "config.yaml"
    cfg.save(config_path)
    print(f"output: {out}\nmlflow: {cfg.mlflow.tracking_uri} run {run_id}", flush=True)

    metrics: dict[str, float] = {}
    succeeded = False
    try:
        if cfg.trainer.nproc == 1:
            from faceforge.train.loop import train

            metrics = train(cfg, run_id)
        else:
            metrics = _torchrun(cfg, config_path, run_id)
        succeeded = True
    finally:
        finish_run(cfg.mlflow.tracking_uri, run_id, succeeded)
    print(f"checkpoints: {out / 'checkpoints'}")
    print(f"MLflow UI:   mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}   (run {run_id})")
    return metrics


def _torchrun(cfg: TrainConfig, config_path: Path, run_id: str) -> dict[str, float]:
    """Local ranks under torchrun; multi-node jobs run the same worker under torchrun's own rendezvous."""
    metrics_path = config_path.parent / "metrics.yaml"
    metrics_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
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
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"training ranks exited with code {result.returncode}; see the log above")
    import yaml

    return yaml.safe_load(metrics_path.read_text()) if metrics_path.exists() else {}
