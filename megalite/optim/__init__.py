"""Optimizers: fused Adam kernels front, mixed precision, ZeRO-1, learning-rate schedules.

:func:`build_optimizer` sits above both shardings so that neither module imports the other.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megalite.config.settings import OptimizerConfig
from megalite.optim.distributed import ZeroOneShards
from megalite.optim.optimizer import MegaliteOptimizer
from megalite.parallel.state import ProcessGrid

__all__ = ["build_optimizer", "MegaliteOptimizer"]


def build_optimizer(model_chunks: Sequence[torch.nn.Module], opt_config: OptimizerConfig,
                    grid: Optional[ProcessGrid]) -> MegaliteOptimizer:
    """The optimizer for ``model_chunks`` (plain or DDP-wrapped modules, one per virtual pipeline chunk).

    Under a sharded strategy (``--use-distributed-optimizer``, ``--data-parallel-sharding-strategy``) the
    chunks must be DDP-wrapped with that strategy, and the optimizer updates only this rank's shards.
    """
    if opt_config.shards_optimizer():
        return MegaliteOptimizer(model_chunks, opt_config, grid, sharding=ZeroOneShards(model_chunks))
    if any(getattr(chunk, "use_distributed_optimizer", False) for chunk in model_chunks):
        # Such DDP only reduce-scatters: each rank's grads are valid in its own shard only.
        raise ValueError("the model is wrapped for ZeRO-1/2/3 (a sharded strategy) but the optimizer config "
                         "shards nothing; set the same strategy for both")
    return MegaliteOptimizer(model_chunks, opt_config, grid)
