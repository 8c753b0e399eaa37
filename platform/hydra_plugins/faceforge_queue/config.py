"""The launcher's options, registered as `hydra/launcher=faceforge_queue` (set them as `hydra.launcher.<name>=`).

No `from __future__ import annotations` here: Hydra's plugin scanner runs this module before it is in
sys.modules, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class QueueLauncherConf:
    _target_: str = "hydra_plugins.faceforge_queue.queue_launcher.QueueLauncher"
    priority: int = 0
    executor: str = "local"
    slots: int | None = None  # per job; trainer.nproc when unset
    # Block until every job is terminal, return their metrics and register the champion.
    wait: bool = False
    poll_seconds: float = 2.0
    # What each job returns when waiting, and what the champion is chosen by, within optional limits;
    # null is the registry's default: TAR at FAR 1e-4, accuracy where too few pairs measure it.
    metric: str | None = None
    max_latency_ms: float | None = None
    max_params: int | None = None
    registered_model: str = "faceforge"
    # Multi-objective search: each job returns these metrics instead (quality first, then the cost to minimise,
    # e.g. [accuracy,model.latency_ms] with hydra.sweeper.direction=[maximize,minimize]); the sweep's Pareto
    # front over the first two is plotted in MLflow. Null: the single metric above.
    objectives: list[str] | None = None


ConfigStore.instance().store(
    group="hydra/launcher", name="faceforge_queue", node=QueueLauncherConf, provider="faceforge"
)
