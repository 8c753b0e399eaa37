"""Model selection over a sweep's MLflow runs, its Pareto front, and the MLflow model registry (`champion`)."""

from faceforge.registry.champion import (
    CHAMPION_ALIAS,
    REGISTERED_MODEL,
    Version,
    champion,
    register,
    select_and_register,
    versions,
)
from faceforge.registry.database import default_tracking_uri, prepare_tracking
from faceforge.registry.pareto import Front, Point, log_front, pareto_front, plot_front
from faceforge.registry.selection import (
    Candidate,
    Policy,
    Selection,
    save_policy,
    saved_policy,
    select,
    sweep_candidates,
    sweep_policy,
)

__all__ = [
    "CHAMPION_ALIAS",
    "REGISTERED_MODEL",
    "Candidate",
    "Front",
    "Point",
    "Policy",
    "Selection",
    "Version",
    "champion",
    "default_tracking_uri",
    "log_front",
    "pareto_front",
    "plot_front",
    "prepare_tracking",
    "register",
    "save_policy",
    "saved_policy",
    "select",
    "select_and_register",
    "sweep_candidates",
    "sweep_policy",
    "versions",
]
