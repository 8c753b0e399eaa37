"""Evaluation: verification and identification metrics, flip-TTA embedding, reports and ROC plots."""

from faceforge.eval.embed import embed_images
from faceforge.eval.metrics import (
    DEFAULT_FARS,
    best_threshold,
    check_folds,
    eer,
    gallery_probe_split,
    identification_rank_k,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
)
from faceforge.eval.report import (
    evaluate_model,
    evaluate_verification,
    format_metrics,
    pair_scores,
    save_roc_plot,
)

__all__ = [
    "DEFAULT_FARS",
    "best_threshold",
    "check_folds",
    "eer",
    "embed_images",
    "evaluate_model",
    "evaluate_verification",
    "format_metrics",
    "gallery_probe_split",
    "identification_rank_k",
    "kfold_accuracy",
    "pair_scores",
    "roc_auc",
    "roc_curve",
    "save_roc_plot",
    "tar_at_far",
]
