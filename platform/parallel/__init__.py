"""Distributed training: process groups, collectives, and the model-parallel sharded margin softmax."""

from faceforge.parallel.dist import (
    DistContext,
    all_gather_tensor,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from faceforge.parallel.row_optim import HeadOptimizer, clip_grad_norm
from faceforge.parallel.sharded_softmax import ShardedMarginSoftmax, all_gather_with_grad, shard_range

__all__ = [
    "DistContext",
    "HeadOptimizer",
    "ShardedMarginSoftmax",
    "all_gather_tensor",
    "all_gather_with_grad",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "clip_grad_norm",
    "init_distributed",
    "shard_range",
    "shutdown_distributed",
]
