"""Metric-learning losses on a batch of embeddings: contrastive and batch-hard triplet.

They need several images per identity in a batch; `faceforge.data.PKBatchSampler` provides P×K batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between L2-normalised embeddings, via 2 − 2·cos (safe gradient at 0)."""
    unit = F.normalize(embeddings.float(), dim=1)  # in float16 the 1e-12 below is 0: sqrt(0)'s gradient is NaN
    squared = (2.0 - 2.0 * unit @ unit.T).clamp_min(0.0)
    return torch.sqrt(squared + 1e-12)


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Mean over positive pairs of d² plus mean over negative pairs of max(0, margin − d)².

    Averaging the two sets separately keeps the loss balanced although negatives outnumber positives.
    """
    dist = _pairwise_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & off_diagonal, ~same
    if not positive.any() or not negative.any():
        raise ValueError("contrastive loss needs at least one positive and one negative pair per batch")
    pos_term = dist[positive].pow(2).mean()
    neg_term = F.relu(margin - dist[negative]).pow(2).mean()
    return pos_term + neg_term


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """For each anchor, its farthest positive against its nearest negative (Hermans et al., 2017)."""
    dist = _pairwise_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & off_diagonal, ~same
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not valid.any():
        raise ValueError("triplet loss needs anchors with both a positive and a negative in the batch")
    hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    hardest_negative = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()
