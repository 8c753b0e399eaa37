"""Model-parallel margin softmax: each rank holds C/W classifier rows and only features cross the network.

Usage, inside a torchrun job (one rank per device):

    head = ShardedMarginSoftmax(num_classes=1_000_000, embedding_dim=512, margin=margin_spec("arcface"),
                                sample_rate=0.1)
    head_optimizer = HeadOptimizer(head, kind="sgd", momentum=0.9, weight_decay=5e-4)
    loss = head(backbone(images), labels)   # local batch in, global-batch mean loss out
    loss.backward()                          # backbone (DDP) gets its gradient; the head its row gradient
    head_optimizer.step(lr)

or, when that backward gives the step's whole head gradient (no accumulation, no clipping):

    head_optimizer.step_in_next_backward(lr)  # the backward below updates each block of rows as it goes
    head(backbone(images), labels).backward()

One batch through it:
1. The local features of every rank are all-gathered (`all_gather_with_grad`), so each rank scores the
   whole global batch against its own class shard: logits are C/W × N (class-major), never C × N.
2. Partial FC keeps every positive class of the shard and a random share of the others, so a step
   touches about r·C/W rows.
3. The cross-entropy is distributed: each sample's max logit is all-reduced with MAX, then the sum of
   exponentials and the target logit with SUM. The shard's logit buffer is turned into exponentials in
   place, becomes the gradient buffer in backward, and is reused by the next step.
4. Backward returns the feature gradient (summed over shards by the all-gather's backward) and writes
   the gradient of the sampled rows straight into the head's gradient buffer, or, with
   `step_in_next_backward`, hands each block's gradient to the optimizer while the block is in cache.

MagFace: every rank computes each sample's margin m(a) from the gathered features' norms; the rank that
owns a sample's class returns d loss/d m, which reaches the norm and, through the all-gather's backward,
the sample's owner. The norm regulariser is added on every rank but its gradient is taken only on the
sample's own rank, so it counts once per sample like the cross-entropy.

Cosine logits are computed as (x/|x|)·w · 1/|w| so the C/W × D weight is never copied to normalise it.
Both passes walk the used rows in blocks (`row_blocks`): a block of weight is read once per pass, and
everything done to it (its norms, the matmuls, the radial projection of its gradient) runs while it is
in cache. Under Partial FC only a block at a time is gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from faceforge.heads.margins import MarginSpec
from faceforge.parallel.dist import all_gather_tensor, all_reduce_max, all_reduce_sum, rank, world_size

_NORM_EPS = 1e-12
# Rows per block: a block of weight (4 MB at D = 512) and its logits stay in cache between their uses.
_BLOCK_ROWS = 2048


def row_blocks(num_rows: int) -> list[slice]:
    """Consecutive slices of at most _BLOCK_ROWS rows covering [0, num_rows)."""
    return [slice(start, min(start + _BLOCK_ROWS, num_rows)) for start in range(0, num_rows, _BLOCK_ROWS)]


def shard_range(num_classes: int, num_shards: int, shard: int) -> tuple[int, int]:
    """Rows [start, end) of shard `shard`; the first C % W shards hold one extra row."""
    if num_classes < num_shards:
        raise ValueError(f"cannot shard {num_classes} classes over {num_shards} ranks: need classes >= ranks")
    base, extra = divmod(num_classes, num_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def _matmul(
    a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None, accumulate: bool = False
) -> torch.Tensor:
    """a @ b with both operands in `dtype`, the product in a's dtype: returned, or written (added) into `out`.

    bfloat16 operands run on AMX or tensor cores at several times the float32 rate. The CPU's mm rounds
    the product to bfloat16 too; it comes back to float32 at once, so the softmax, the gradients and the
    optimizer stay float32, as under arcface_torch's fp16 flag.
    """
    if a.dtype == dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    product = torch.mm(a.to(dtype), b.to(dtype))
    if out is None:
        return product.to(a.dtype)
    return out.add_(product) if accumulate else out.copy_(product)


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
        sample_margin: torch.Tensor | None,
    ) -> torch.Tensor:
        margin, group = head.margin, head.group
        if margin.normalized:
            feature_norm = features.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
            inputs = features / feature_norm
        else:
            feature_norm, inputs = None, features
        num_rows = head.num_local if rows is None else len(rows)
        logits = head.take_logits_buffer(num_rows, len(inputs))
        inv_weight_norm = logits.new_empty(num_rows) if margin.normalized else None
        matmul_inputs = inputs.to(head.matmul_dtype)
        for block in row_blocks(num_rows):
            weight = head.weight_block(rows, block)
            block_logits = _matmul(weight, matmul_inputs.T, head.matmul_dtype, out=logits[block])
            if inv_weight_norm is not None:
                inv_weight_norm[block] = weight.norm(dim=1).clamp_min(_NORM_EPS).reciprocal()
                block_logits.mul_(inv_weight_norm[block, None])

        target_samples = (targets >= 0).nonzero().squeeze(1)
        target_classes = targets[target_samples]
        cos_target = logits[target_classes, target_samples]
        target_margin = None if sample_margin is None else sample_margin[target_samples]
        logits[target_classes, target_samples] = margin.target_logit(cos_target, target_margin)
        if margin.scale != 1.0:
            logits.mul_(margin.scale)

        sample_max = all_reduce_max(logits.amax(dim=0), group)
        logits.sub_(sample_max)
        target_logit = torch.zeros_like(sample_max)
        target_logit[target_samples] = logits[target_classes, target_samples]
        all_reduce_sum(target_logit, group)
        exps = logits.exp_()
        sum_exp = all_reduce_sum(exps.sum(dim=0), group)

        ctx.head, ctx.rows = head, rows
        ctx.save_for_backward(
            exps, sum_exp, inputs, matmul_inputs, target_classes, target_samples, cos_target, target_margin
        )
        ctx.feature_norm, ctx.inv_weight_norm = feature_norm, inv_weight_norm
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, torch.Tensor | None]:
        head, rows, inv_weight_norm = ctx.head, ctx.rows, ctx.inv_weight_norm
        margin = head.margin
        exps, sum_exp, inputs, matmul_inputs, target_classes, target_samples, cos_target, target_margin = (
            ctx.saved_tensors
        )
        # d loss / d logit = softmax − one-hot = (exp − S·one-hot) / S for a sample's sum of exponentials S;
        # then through the scale and, for targets, through ψ. Per-sample factors wait for the block loop.
        grad = exps
        grad[target_classes, target_samples] -= sum_exp[target_samples]
        sample_scale = grad_loss * margin.scale / (len(sum_exp) * sum_exp)
        grad_margin = None if target_margin is None else torch.zeros_like(sum_exp)
        if not margin.is_identity and len(target_samples):
            with torch.enable_grad():
                cos = cos_target.detach().requires_grad_()
                extra = None if target_margin is None else target_margin.detach().requires_grad_()
                psi = margin.target_logit(cos, extra).sum()
                dpsi, *dpsi_dmargin = torch.autograd.grad(psi, [cos] if extra is None else [cos, extra])
            grad_target = grad[target_classes, target_samples]
            if grad_margin is not None:
                grad_margin[target_samples] = grad_target * sample_scale[target_samples] * dpsi_dmargin[0]
            grad[target_classes, target_samples] = grad_target * dpsi

        grad_inputs = torch.zeros_like(inputs)
        update, head.update_in_backward = head.update_in_backward, None
        dense_grad = head.claim_dense_grad() if rows is None and update is None else None
        for block in row_blocks(len(grad)):
            weight = head.weight_block(rows, block)
            block_grad = grad[block].mul_(sample_scale)
            if inv_weight_norm is not None:
                # cos_ij = u_i·w_j / |w_j|: fold 1/|w_j| into the gradient, then remove w_j's radial part.
                block_grad.mul_(inv_weight_norm[block, None])
            _matmul(block_grad.T, weight, head.matmul_dtype, out=grad_inputs, accumulate=True)
            grad_weight = _matmul(
                block_grad, matmul_inputs, head.matmul_dtype, out=None if dense_grad is None else dense_grad[block]
            )
            if inv_weight_norm is not None:
                radial = torch.linalg.vecdot(weight, grad_weight) * inv_weight_norm[block].square()
                grad_weight.addcmul_(weight, radial[:, None], value=-1.0)
            if update is not None:  # the weight block was read above for the last time this step
                update(block if rows is None else rows[block], grad_weight)
            elif dense_grad is None:
                head.accumulate_weight_grad(head.block_rows(rows, block), grad_weight)
        head.keep_logits_buffer(grad)

        if margin.normalized:
            radial_inputs = (grad_inputs * inputs).sum(dim=1, keepdim=True)
            grad_inputs = (grad_inputs - radial_inputs * inputs) / ctx.feature_norm
        return grad_inputs, None, None, None, grad_margin


class ShardedMarginSoftmax(nn.Module):
    """The classifier shard of this rank plus the distributed margin cross-entropy over all shards.

    The weight is a buffer, not an autograd parameter: its gradient goes to `self.grad` for the rows a
    step used, and `HeadOptimizer` updates only those rows. With Partial FC (sample_rate < 1) a row that
    was not sampled therefore receives no update at all in that step: neither a momentum step nor weight
    decay, and its optimizer state is left as it was (the "lazy" rule of sparse optimizers). This makes
    the optimizer cost proportional to r, and with r = 1 it is ordinary dense SGD/AdamW.

    `matmul_dtype=torch.bfloat16` runs the three matmuls of a step (most of its time) in bfloat16 while
    weight, logits, gradients and optimizer state stay in `dtype`; the trainer sets it with `trainer.amp`.
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
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.margin, self.sample_rate, self.group, self.seed = margin, sample_rate, group, seed
        self.matmul_dtype = matmul_dtype or dtype
        self.rank, self.world_size = rank(group), world_size(group)
        self.class_start, self.class_end = shard_range(num_classes, self.world_size, self.rank)
        num_local = self.class_end - self.class_start
        generator = torch.Generator().manual_seed(seed * 1_000_003 + self.rank)
        weight = torch.empty(num_local, embedding_dim, dtype=dtype).normal_(0.0, 0.01, generator=generator)
        self.register_buffer("weight", weight.to(device))
        self.grad: torch.Tensor | None = None
        self._has_grad = torch.zeros(num_local, dtype=torch.bool, device=device)
        self._spare_logits: torch.Tensor | None = None
        # Set by HeadOptimizer.step_in_next_backward: (rows as a slice or indices, their gradient) -> None.
        self.update_in_backward: Callable[[slice | torch.Tensor, torch.Tensor], None] | None = None
        self.steps_sampled = 0

    @property
    def num_local(self) -> int:
        return self.class_end - self.class_start

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.embedding_dim:
            raise ValueError(f"features have dim {features.shape[1]}, the head expects {self.embedding_dim}")
        all_features = all_gather_with_grad(features.to(self.weight.dtype), self.group)
        all_labels = all_gather_tensor(labels.to(self.weight.device, torch.long), self.group)
        # Checked on the gathered batch so every rank raises together; a label in no shard would be trained
        # with no positive logit at all.
        low, high = torch.stack(torch.aminmax(all_labels)).tolist() if all_labels.numel() else (0, 0)  # one sync
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"labels span {low}..{high}, outside the head's {self.num_classes} classes")
        rows, targets = self._sample(all_labels)
        magface = self.margin.magface
        if magface is None:
            return _ShardedMarginCrossEntropy.apply(all_features, self, rows, targets, None)
        norm = all_features.norm(dim=1)
        loss = _ShardedMarginCrossEntropy.apply(all_features, self, rows, targets, magface.margin(norm))
        # The all-gather's backward sums every rank's gradient: take the regulariser's on the sample's rank only.
        own = torch.zeros_like(norm, dtype=torch.bool)
        own[self.rank * len(features) : (self.rank + 1) * len(features)] = True
        regularizer = magface.regularizer(norm)
        return loss + torch.where(own, regularizer, regularizer.detach()).mean()

    def _sample(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The rows this step uses (None = all) and each sample's target as an index into them (−1: elsewhere)."""
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

    def weight_block(self, rows: torch.Tensor | None, block: slice) -> torch.Tensor:
        """A block of the rows a step uses: a view of the weight, or a gathered copy under Partial FC."""
        return self.weight[block] if rows is None else self.weight.index_select(0, rows[block])

    def block_rows(self, rows: torch.Tensor | None, block: slice) -> torch.Tensor:
        """Shard row indices of a block of the rows a step uses."""
        if rows is None:
            return torch.arange(block.start, block.stop, device=self.weight.device)
        return rows[block]

    def take_logits_buffer(self, num_rows: int, batch: int) -> torch.Tensor:
        """The (rows × batch) logit buffer, reused across steps: touching hundreds of fresh MB every step
        costs as much as a matmul. A step holds it until its backward, so two pending steps never share it.
        """
        buffer, self._spare_logits = self._spare_logits, None
        if buffer is None or buffer.shape != (num_rows, batch):
            buffer = torch.empty(num_rows, batch, dtype=self.weight.dtype, device=self.weight.device)
        return buffer

    def keep_logits_buffer(self, buffer: torch.Tensor) -> None:
        self._spare_logits = buffer

    def claim_dense_grad(self) -> torch.Tensor | None:
        """The whole gradient buffer for a dense step to write into, if no row holds a gradient yet
        (the step then owns every row); None when the step must accumulate instead."""
        if self.has_grad:
            return None
        if self.grad is None:
            self.grad = torch.empty_like(self.weight)
        self._has_grad.fill_(True)
        return self.grad

    def accumulate_weight_grad(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Add a step's gradient for `rows`; rows first touched since `zero_grad` are overwritten, not added."""
        if self.grad is None:
            self.grad = torch.zeros_like(self.weight)
        self.grad.index_fill_(0, rows[~self._has_grad[rows]], 0.0)
        self.grad.index_add_(0, rows, grad)
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
