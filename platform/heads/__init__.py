"""Loss definitions: margin-softmax specs (ArcFace, CosFace, SphereFace, MagFace, softmax) and pair losses."""

from faceforge.heads.magface import MagFaceMargin
from faceforge.heads.margins import MARGIN_PRESETS, MarginSpec, margin_spec
from faceforge.heads.pair_losses import batch_hard_triplet_loss, contrastive_loss

__all__ = [
    "MARGIN_PRESETS",
    "MagFaceMargin",
    "MarginSpec",
    "batch_hard_triplet_loss",
    "contrastive_loss",
    "margin_spec",
]
