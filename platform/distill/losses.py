"""Distillation losses and their weighted sum with the head's own loss.

Embedding distillation pulls each student feature (through a linear projection when the widths differ)
onto the teacher's feature of the same image.

Centre distillation is the idea of MarginDistillation (Svitov & Alyamkin, 2020) and AdaDistill (Boutros et
al., ECCV 2024): train the student with a margin softmax whose classifier is not learnt but given by the
teacher. Here the classifier is the teacher's class centres, the normalised mean of each identity's normalised
teacher features over the training set, frozen; the student's feature (projected) must sit closer, by an
additive angular margin, to its own identity's centre than to any other, which transfers the teacher's class
geometry rather than image-by-image positions. AdaDistill also adapts its centres during training (an
adaptive moving average of teacher features, sample-level targets early, class-level later); these stay fixed.
The centres are a `ShardedMarginSoftmax` whose rows are never updated, so each rank holds C/W of them and
the loss runs distributed exactly like the head.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceforge.heads import margin_spec
from faceforge.parallel import ShardedMarginSoftmax

EMBEDDING_LOSSES = ("cosine", "l2")
HeadLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample 1 − cos, or the Euclidean distance √(2 − 2cos) between the normalised features.

    The two share their minimum; the distance pulls relatively harder on samples that are already close.
    """
    cos = F.cosine_similarity(student, teacher, dim=1)
    if kind == "cosine":
        return 1.0 - cos
    if kind == "l2":
        return (2.0 - 2.0 * cos).clamp_min(1e-12).sqrt()
    raise ValueError(f"unknown embedding loss {kind!r}; use one of {', '.join(EMBEDDING_LOSSES)}")


def class_centres(features: np.ndarray, labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """C x D: the normalised mean of each class's (normalised) features; a class without images stays zero."""
    rows = torch.from_numpy(np.asarray(features, dtype=np.float64))
    sums = torch.zeros(num_classes, rows.shape[1], dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(np.asarray(labels, dtype=np.int64)), rows)
    return F.normalize(sums, dim=1).float()


def centre_classifier(
    centres: torch.Tensor, s: float, m: float, device: torch.device | str = "cpu"
) -> ShardedMarginSoftmax:
    """ArcFace (s, m) over the teacher's centres; this rank keeps only its shard of them."""
    head = ShardedMarginSoftmax(len(centres), centres.shape[1], margin_spec("arcface", s=s, m2=m), device=device)
    head.weight.copy_(centres[head.class_start : head.class_end])
    return head


class DistillLoss:
    """head_weight · head loss + embedding_weight · embedding distance + centre_weight · centre ArcFace.

    Called per micro-batch with the student's embeddings, labels and the teacher's features of the same
    images. `projection` maps student to teacher width (identity when they match) and trains with the student.
    The mean of every term since the last `pop_terms` is kept for logging.
    """

    def __init__(
        self,
        *,
        head_loss: HeadLoss,
        head_weight: float,
        projection: nn.Module,
        embedding_weight: float,
        embedding_loss: str,
        centres: ShardedMarginSoftmax | None,
        centre_weight: float,
    ) -> None:
        if embedding_loss not in EMBEDDING_LOSSES:
            raise ValueError(f"unknown embedding loss {embedding_loss!r}; use one of {', '.join(EMBEDDING_LOSSES)}")
        if centre_weight > 0 and centres is None:
            raise ValueError("centre_weight > 0 needs the teacher's class centres")
        self.head_loss, self.head_weight = head_loss, head_weight
        self.projection = projection
        self.embedding_weight, self.embedding_loss = embedding_weight, embedding_loss
        self.centres, self.centre_weight = centres, centre_weight
        self._sums: dict[str, float] = {}
        self._calls = 0

    def __call__(
        self, student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None
    ) -> torch.Tensor:
        terms: dict[str, torch.Tensor] = {}
        if self.head_weight > 0:
            terms["head"] = self.head_loss(student, labels)
        projected = self.projection(student)
        if self.embedding_weight > 0:
            assert teacher is not None, "embedding distillation needs the teacher's features"
            terms["embedding"] = embedding_distance(projected, teacher, self.embedding_loss).mean()
        if self.centre_weight > 0:
            assert self.centres is not None
            # The centres never train: drop last step's row gradient so each step claims the dense buffer.
            self.centres.zero_grad()
            terms["centre"] = self.centres(projected, labels)
        weights = {"head": self.head_weight, "embedding": self.embedding_weight, "centre": self.centre_weight}
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.item()
        self._calls += 1
        return sum(weights[name] * value for name, value in terms.items())

    def pop_terms(self) -> dict[str, float]:
        """Each term's mean per micro-batch since the last call, as `distill.<term>` metrics."""
        means = {f"distill.{name}": total / max(self._calls, 1) for name, total in self._sums.items()}
        self._sums, self._calls = {}, 0
        return means
