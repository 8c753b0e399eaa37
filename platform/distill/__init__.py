"""Knowledge distillation: frozen teachers, cached teacher features, embedding and class-centre losses."""

from faceforge.distill.distiller import Distiller, WithIndex, make_projection
from faceforge.distill.features import FeatureTable, cache_key, dataset_digest, teacher_table
from faceforge.distill.losses import DistillLoss, centre_classifier, class_centres, embedding_distance
from faceforge.distill.teacher import load_teacher, teacher_identity

__all__ = [
    "DistillLoss",
    "Distiller",
    "FeatureTable",
    "WithIndex",
    "cache_key",
    "centre_classifier",
    "class_centres",
    "dataset_digest",
    "embedding_distance",
    "load_teacher",
    "make_projection",
    "teacher_identity",
    "teacher_table",
]
