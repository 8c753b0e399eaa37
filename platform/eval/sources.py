"""Where a model to evaluate or embed with comes from: a checkpoint path or an MLflow model URI."""

from __future__ import annotations

from pathlib import Path

from torch import nn

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def load_model(source: str, tracking_uri: str | None = None) -> nn.Module:
    """A checkpoint directory (or its parent holding `latest`), or an MLflow URI such as models:/name@champion,
    looked up in `tracking_uri`, by default the platform's database (never MLflow's ./mlflow.db)."""
    if source.startswith(MLFLOW_SCHEMES):
        if any(part in (".", "..") for part in source.split("/")):  # MLflow would follow them out of the run
            raise ValueError(f"{source}: an MLflow model URI cannot hold '.' or '..' parts")
        import mlflow
        from mlflow.exceptions import MlflowException

        from faceforge.registry.database import default_tracking_uri, open_database

        tracking_uri = tracking_uri or default_tracking_uri()
        if tracking_uri.startswith("sqlite:///"):
            open_database(tracking_uri)  # a clear error where MLflow would create an empty database
        mlflow.set_tracking_uri(tracking_uri)
        try:
            return mlflow.pytorch.load_model(source, map_location="cpu").eval()
        except MlflowException as err:
            raise ValueError(f"{source}: {err.message}") from None
    from faceforge.train.checkpoint import load_backbone

    if not Path(source).exists():
        raise FileNotFoundError(f"model source {source} is neither an existing checkpoint nor an MLflow URI")
    return load_backbone(source)


def recorded_settings(source: str, tracking_uri: str | None = None) -> dict[str, str]:
    """The flattened training config that a checkpoint, or an MLflow model's run, recorded; empty without one."""
    if source.startswith(MLFLOW_SCHEMES):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        run_id = mlflow.models.get_model_info(source).run_id
        return dict(mlflow.MlflowClient().get_run(run_id).data.params) if run_id else {}
    from faceforge.train.checkpoint import read_model_state
    from faceforge.train.tracking import flatten

    return {key: str(value) for key, value in flatten(read_model_state(Path(source)).get("train_config", {})).items()}
