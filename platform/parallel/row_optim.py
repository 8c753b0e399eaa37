"""Optimizer for the sharded classifier: SGD-momentum or AdamW on the rows that received a gradient.

It follows torch.optim.SGD / AdamW update rules exactly, so r = 1 training matches plain PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.optim.sgd import sgd

from faceforge.parallel.dist import all_reduce_sum
from faceforge.parallel.sharded_softmax import ShardedMarginSoftmax, row_blocks


class HeadOptimizer:
    """Row-sparse optimizer whose state is sharded exactly like the head's weight."""

    def __init__(
        self,
        head: ShardedMarginSoftmax,
        *,
        kind: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if kind not in ("sgd", "adamw"):
            raise ValueError(f"unknown optimizer {kind!r}; use sgd or adamw")
        self.head, self.kind = head, kind
        self.momentum, self.weight_decay, self.betas, self.eps = momentum, weight_decay, betas, eps
        self.step_count = 0
        names = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
        self.state: dict[str, torch.Tensor] = {name: torch.zeros_like(head.weight) for name in names}

    @torch.no_grad()
    def step(self, lr: float) -> None:
        head = self.head
        if not head.has_grad:
            return
        self.step_count += 1
        rows = head.grad_rows()
        if rows is None:
            self._update_rows(slice(None), head.grad, lr)
        else:
            # A block of rows at a time, so the gathered copies stay small.
            for block in row_blocks(len(rows)):
                self._update_rows(rows[block], head.grad.index_select(0, rows[block]), lr)
        head.zero_grad()

    def step_in_next_backward(self, lr: float) -> None:
        """Have the head's next backward apply this step, each block of rows while its weight is in cache.

        The C/W x D gradient is then never written and read back (a dense step moves 4 weight-sized arrays
        through memory instead of 7) and its buffer is never allocated. Valid only when that one backward yields
        the step's whole head gradient: no accumulation, no clipping (which needs every gradient first).
        """
        if self.head.has_grad:
            raise RuntimeError("the head already holds a gradient from an earlier backward; call step() instead")
        self.step_count += 1
        self.head.update_in_backward = functools.partial(self._update_rows, lr=lr)

    @torch.no_grad()
    def _update_rows(self, rows: slice | torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Update weight and state rows: a slice in place through views, indices gathered and written back."""
        head = self.head
        if isinstance(rows, slice):
            self._update(head.weight[rows], grad, {name: t[rows] for name, t in self.state.items()}, lr)
            return
        weight = head.weight.index_select(0, rows)
        state = {name: tensor.index_select(0, rows) for name, tensor in self.state.items()}
        self._update(weight, grad, state, lr)
        head.weight.index_copy_(0, rows, weight)
        for name, tensor in state.items():
            self.state[name].index_copy_(0, rows, tensor)

    def _update(self, weight: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float) -> None:
        """One in-place update of `weight` and `state` (dense or gathered rows)."""
        if self.kind == "sgd":
            # torch's fused kernel: one pass over weight, gradient and momentum instead of four.
            sgd(
                [weight],
                [grad],
                [state["momentum_buffer"]],
                fused=True,
                weight_decay=self.weight_decay,
                momentum=self.momentum,
                lr=lr,
                dampening=0.0,
                nesterov=False,
                maximize=False,
            )
            return
        beta1, beta2 = self.betas
        weight.mul_(1.0 - lr * self.weight_decay)
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias1, bias2 = 1.0 - beta1**self.step_count, 1.0 - beta2**self.step_count
        denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(self.eps)
        weight.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "step_count": self.step_count, "state": dict(self.state)}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint head optimizer is {state['kind']!r}, the config asks for {self.kind!r}")
        self.step_count = int(state["step_count"])
        for name, tensor in state["state"].items():
            self.state[name].copy_(tensor)


@torch.no_grad()
def clip_grad_norm(
    params: Iterable[torch.nn.Parameter],
    head: ShardedMarginSoftmax | None,
    max_norm: float,
    group: dist.ProcessGroup | None = None,
) -> float:
    """Clip by the global norm over the (already reduced) backbone gradients and every head shard."""
    head_has_grad = head is not None and head.has_grad
    grads = [p.grad for p in params if p.grad is not None]
    backbone_sq = sum((g.double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64))
    head_sq = torch.zeros((), dtype=torch.float64)
    rows = head.grad_rows() if head_has_grad else None
    if head_has_grad:
        head_grad = head.grad if rows is None else head.grad[rows]
        head_sq = torch.linalg.vector_norm(head_grad, dtype=torch.float64).square().cpu()
    if head is not None:
        head_sq = all_reduce_sum(head_sq.to(head.weight.device), group).cpu()
    total = float((backbone_sq + head_sq).sqrt())
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
        if head_has_grad:
            if rows is None:
                head.grad.mul_(scale)
            else:
                head.grad.index_copy_(0, rows, head.grad[rows] * scale)
    return total
