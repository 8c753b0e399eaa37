"""Model-parallel margin softmax: each rank holds C/W classifier rows and only features cross the network.

Usage, inside a torchrun job (one rank per device):

    head = ShardedMarginSoftmax(num_classes=1_000_000, embedding_dim=512, margin=margin_spec("arcface"),
                                sample_rate=0.1)
    head_optimizer = HeadOptimizer(head, kind="sgd", momentum=0.9, weight_decay=5e-4)
    loss = head(backbone(images), labels)   # local batch in, global-batch mean loss out
    loss.backward()                          # backbone (DDP) gets its gradient; the head its row gradient
    head_optimizer.step(lr)

One batch through it:
1. The local features of every rank are all-gathered (`all_gather_with_grad`), so each rank scores the
   whole global batch against its own class shard: logits are N × C/W, never N × C.
2. Partial FC keeps every positive class of the shard and a random share of the others, so a step
   touches about r·C/W rows.
3. The cross-entropy is distributed: the row max is all-reduced with MAX, then the sum of exponentials
   and the target logit with SUM. The shard's logit buffer is turned into softmax probabilities in place
   and becomes the gradient buffer in backward.
4. Backward returns the feature gradient (summed over shards by the all-gather's backward) and writes
   the gradient of the sampled rows straight into the head's gradient buffer.

Cosine logits are computed as (x/|x|)·w · 1/|w| so the C/W × D weight is never copied to normalise it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from faceforge.heads.margins import MarginSpec
from faceforge.parallel.dist import all_gather_tensor, all_reduce_max, all_reduce_sum, rank, world_size

_NORM_EPS = 1e-12


def shard_range(num_classes: int, num_shards: int, shard: int) -> tuple[int, int]:
    """Rows [start, end) of shard `shard`; the first C % W shards hold one extra row."""
    if num_classes < num_shards:
        raise ValueError(f"cannot shard {num_classes} classes over {num_shards} ranks: need classes >= ranks")
    base, extra = divmod(num_classes, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and returns each slice to its owner.

    The slice is multiplied by W: DDP then averages backbone gradients over W ranks, which yields
    exactly the gradient of the global-batch mean loss.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.rows = group, tensor.shape[0]
        return all_gather_tensor(tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        size = world_size(ctx.group)
        grad = all_reduce_sum(grad.contiguous().clone(), ctx.group)
        start = rank(ctx.group) * ctx.rows
        return grad[start : start + ctx.rows] * size, None


def all_gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    if world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


class _ShardedMarginCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        features: torch.Tensor,
        head: ShardedMarginSoftmax,
        rows: torch.Tensor | None,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        margin, group = head.margin, head.group
        weight = head.weight if rows is None else head.weight.index_select(0, rows)
        if margin.normalized:
            feature_norm = features.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
            inputs = features / feature_norm
            inv_weight_norm = weight.norm(dim=1).clamp_min(_NORM_EPS).reciprocal()
            logits = (inputs @ weight.T).mul_(inv_weight_norm)
        else:
            feature_norm, inputs, inv_weight_norm = None, features, None
            logits = inputs @ weight.T

        target_rows = (targets >= 0).nonzero().squeeze(1)
        target_cols = targets[target_rows]
        cos_target = logits[target_rows, target_cols]
        logits[target_rows, target_cols] = margin.target_logit(cos_target)
        if margin.scale != 1.0:
            logits.mul_(margin.scale)

        row_max = all_reduce_max(logits.amax(dim=1), group)
        logits.sub_(row_max[:, None])
        target_logit = torch.zeros_like(row_max)
        target_logit[target_rows] = logits[target_rows, target_cols]
        all_reduce_sum(target_logit, group)
        probs = logits.exp_()
        sum_exp = all_reduce_sum(probs.sum(dim=1), group)
        probs.div_(sum_exp[:, None])

        ctx.head, ctx.rows, ctx.weight = head, rows, weight
        ctx.save_for_backward(probs, inputs, target_rows, target_cols, cos_target)
        ctx.feature_norm, ctx.inv_weight_norm = feature_norm, inv_weight_norm
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        head, rows, weight = ctx.head, ctx.rows, ctx.weight
        margin = head.margin
        probs, inputs, target_rows, target_cols, cos_target = ctx.saved_tensors
        # d loss / d logit = softmax − one-hot; then through the scale and, for targets, through ψ.
        grad = probs
        grad[target_rows, target_cols] -= 1.0
        grad.mul_(grad_loss * margin.scale / grad.shape[0])
        if not margin.is_identity and len(target_rows):
            with torch.enable_grad():
                cos = cos_target.detach().requires_grad_()
                (dpsi,) = torch.autograd.grad(margin.target_logit(cos).sum(), cos)
            grad[target_rows, target_cols] *= dpsi

        if margin.normalized:
            # cos_ij = u_i·w_j / |w_j|: fold 1/|w_j| into the gradient, then remove the radial parts.
            grad.mul_(ctx.inv_weight_norm)
            grad_inputs = grad @ weight
            grad_weight = head.weight_grad_target(rows)
            grad_weight = torch.mm(grad.T, inputs, out=grad_weight) if grad_weight is not None else grad.T @ inputs
            radial = torch.bmm(weight.unsqueeze(1), grad_weight.unsqueeze(2)).view(-1)
            grad_weight.addcmul_(weight, (radial * ctx.inv_weight_norm.square())[:, None], value=-1.0)
            radial_inputs = (grad_inputs * inputs).sum(dim=1, keepdim=True)
            grad_features = (grad_inputs - radial_inputs * inputs) / ctx.feature_norm
        else:
            grad_features = grad @ weight
            grad_weight = head.weight_grad_target(rows)
            grad_weight = torch.mm(grad.T, inputs, out=grad_weight) if grad_weight is not None else grad.T @ inputs
        head.accumulate_weight_grad(rows, grad_weight)
        return grad_features, None, None, None


class ShardedMarginSoftmax(nn.Module):
    """The classifier shard of this rank plus the distributed margin cross-entropy over all shards.

    The weight is a buffer, not an autograd parameter: its gradient goes to `self.grad` for the rows a
    step used, and `HeadOptimizer` updates only those rows. With Partial FC (sample_rate < 1) a row that
    was not sampled therefore receives no update at all in that step: neither a momentum step nor weight
    decay, and its optimizer state is left as it was (the "lazy" rule of sparse optimizers). This makes
    the optimizer cost proportional to r, and with r = 1 it is ordinary dense SGD/AdamW.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: MarginSpec,
        sample_rate: float = 1.0,
        *,
        group: dist.ProcessGroup | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.margin, self.sample_rate, self.group, self.seed = margin, sample_rate, group, seed
        self.rank, self.world_size = rank(group), world_size(group)
        self.class_start, self.class_end = shard_range(num_classes, self.world_size, self.rank)
        num_local = self.class_end - self.class_start
        generator = torch.Generator().manual_seed(seed * 1_000_003 + self.rank)
        weight = torch.empty(num_local, embedding_dim, dtype=dtype).normal_(0.0, 0.01, generator=generator)
        self.register_buffer("weight", weight.to(device))
        self.grad: torch.Tensor | None = None
        self._has_grad = torch.zeros(num_local, dtype=torch.bool, device=device)
        self.steps_sampled = 0

    @property
    def num_local(self) -> int:
        return self.class_end - self.class_start

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.embedding_dim:
            raise ValueError(f"features have dim {features.shape[1]}, the head expects {self.embedding_dim}")
        all_features = all_gather_with_grad(features.to(self.weight.dtype), self.group)
        all_labels = all_gather_tensor(labels.to(self.weight.device, torch.long), self.group)
        rows, targets = self._sample(all_labels)
        return _ShardedMarginCrossEntropy.apply(all_features, self, rows, targets)

    def _sample(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The rows this step uses (None = all) and each sample's target column among them (−1: elsewhere)."""
        local = labels - self.class_start
        in_shard = (local >= 0) & (local < self.num_local)
        if self.sample_rate >= 1.0:
            return None, torch.where(in_shard, local, -1)
        positives = torch.unique(local[in_shard])
        num_sample = max(math.ceil(self.sample_rate * self.num_local), len(positives))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + self.steps_sampled)
        self.steps_sampled += 1
        priority = torch.rand(self.num_local, generator=generator).to(self.weight.device)
        priority[positives] = 2.0
        rows = torch.topk(priority, num_sample, sorted=False).indices.sort().values
        targets = torch.where(in_shard, torch.searchsorted(rows, local.clamp(0, self.num_local - 1)), -1)
        return rows, targets

    def weight_grad_target(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The gradient buffer itself when a dense gradient can be written into it without a copy."""
        if rows is not None or self._has_grad.any():
            return None
        if self.grad is None:
            self.grad = torch.empty_like(self.weight)
        return self.grad

    def accumulate_weight_grad(self, rows: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Add a step's row gradient; rows first touched since `zero_grad` are overwritten, not added."""
        if self.grad is None:
            self.grad = torch.zeros_like(self.weight)
        if rows is None:
            if grad is not self.grad:
                stale = (~self._has_grad).nonzero().squeeze(1)
                self.grad.index_fill_(0, stale, 0.0)
                self.grad.add_(grad)
            self._has_grad.fill_(True)
            return
        fresh = ~self._has_grad[rows]
        self.grad.index_copy_(0, rows[fresh], grad[fresh])
        self.grad.index_add_(0, rows[~fresh], grad[~fresh])
        self._has_grad[rows] = True

    def grad_rows(self) -> torch.Tensor | None:
        """Rows holding a gradient since `zero_grad`; None means every row (use the dense tensors)."""
        return None if bool(self._has_grad.all()) else self._has_grad.nonzero().squeeze(1)

    @property
    def has_grad(self) -> bool:
        return bool(self._has_grad.any())

    def zero_grad(self) -> None:
        self._has_grad.fill_(False)

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes}, shard=[{self.class_start}, {self.class_end}), "
            f"dim={self.embedding_dim}, sample_rate={self.sample_rate}, margin={self.margin}"
        )
