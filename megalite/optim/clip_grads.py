"""The global gradient norm over the whole TP x CP x DP x PP grid, and clipping by it.

The norm must be the norm of the single-process model's gradient, whatever the layout:

    ||g||^2 = sum over the model's parameters, each counted ONCE, of ||g_p||^2

Each rank holds pieces; a piece is counted on exactly one rank:

- tensor-parallel shards (``ParamInfo.partition_dim`` set) are disjoint: every TP rank counts its own;
- parameters replicated over TP (norm weights, row-parallel biases; their grads are equal on every TP
  rank once ``finalize_model_grads`` has summed the sequence-parallel ones) count on TP rank 0 only;
- the tied word embedding lives on the first and the last pipeline stage (``ParamInfo.shared_embedding``,
  grads summed over the embedding group): it counts on the first stage only;
- where the experts have groups of their own (EP > 1, or TP > 1: megalite/parallel/state.py) each EP rank
  holds its own experts, equal over its expert-DP group (under ZeRO-1 sharded over it, every piece disjoint):
  an expert counts on the first rank of its expert-DP group (every rank under ZeRO-1; under expert TP its
  ffn slices on every expert-TP rank, its fc2 bias, whole there, on the first); the partial sums then
  run over the whole grid (the model-parallel group, then DP x CP), so every other parameter counts on DP
  and CP rank 0 only;
- data-parallel and context-parallel replicas hold equal, already-averaged grads (DDP averages over
  DP x CP) and count nothing extra -- except under ZeRO-1, where each DP x CP rank holds a disjoint
  shard and counts it.

The partial sums of squares are then summed over the groups that split the replica (the
model-parallel group, plus the DP x CP group under ZeRO-1).  The same all-reduce carries the count
of non-finite gradients (over ALL local grads, duplicates included), so that every rank agrees on
whether an fp16 step overflowed at no extra collective.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megalite.parallel.param_info import param_info
from megalite.parallel.state import ProcessGrid


def param_is_counted_in_norm(param: torch.nn.Parameter, grid: Optional[ProcessGrid], sharded: bool = False) -> bool:
    """False for a copy whose gradient another rank of the same replica already counts (see module doc).
    ``sharded``: a ZeRO-1 piece, disjoint from every other rank's over DP x CP (experts: the expert-DP group)."""
    if grid is None:
        return True
    info = param_info(param)
    experts_apart = getattr(grid, "edp_group", None) is not None
    if info.expert_parallel and experts_apart:   # (an expert tensor whole on every expert-TP rank: on the first)
        whole_over_etp = not info.tensor_parallel and getattr(grid, "etp_rank", 0) != 0
        return (sharded or grid.ranks["edp"][0] == grid.rank) and not whole_over_etp
    if not info.tensor_parallel and grid.tp_rank != 0:
        return False
    if info.shared_embedding and grid.pp_size > 1 and grid.pp_rank != 0:
        return False
    if not sharded and experts_apart and (grid.dp_rank != 0 or grid.cp_rank != 0):
        return False   # the norm is summed over DP x CP too (ReplicatedParams.norm_groups)
    return True


def global_grad_norm(grads: Sequence[torch.Tensor], counted: Sequence[bool],
                     groups: Iterable) -> Tuple[float, bool]:
    """Return (L2 norm of the counted grads over ``groups``, whether any grad anywhere is inf/nan).

    ``grads``: fp32 tensors (already unscaled); ``counted[i]`` says whether grads[i] counts toward the
    norm on this rank.  Every rank of each group must call this (it is one all-reduce per group).
    """
    device = grads[0].device if grads else torch.device("cpu")
    # [sum of squares of counted grads, number of non-finite grads]; float64 so the sum of many
    # squares neither overflows nor depends much on the order.
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    if grads:
        squares = torch.stack(torch._foreach_norm(list(grads))).double() ** 2  # one fused pass on GPU
        # A norm is inf/nan iff its grad holds an inf/nan (unless a finite grad's norm passes 3e38).
        stats[1] = (~torch.isfinite(squares)).sum()
        mask = torch.tensor(list(counted), dtype=torch.bool, device=device)
        stats[0] = squares[mask].sum()
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(stats, group=group)
    sum_sq, nonfinite = stats.tolist()
    return sum_sq ** 0.5, nonfinite > 0


def clip_grads_by_norm_(grads: Sequence[torch.Tensor], max_norm: float, total_norm: float) -> float:
    """Scale ``grads`` in place by min(1, max_norm / (total_norm + 1e-6)); returns the factor."""
    coefficient = max_norm / (total_norm + 1.0e-6)
    if coefficient < 1.0:
        if grads:  # a ZeRO-1 rank may own no piece of a tiny model
            torch._foreach_mul_(list(grads), coefficient)
        return coefficient
    return 1.0
