"""How a step's loss is normalized: by micro-batch (default) or by token (``--calculate-per-token-loss``).

By micro-batch, each micro-batch's loss is the mean over its tokens, divided by the number of
micro-batches, and DDP averages over DP x CP: the step's loss is the mean of micro-batch means, so a
token of a micro-batch with few valid tokens weighs more than one of a full micro-batch.

By token (Megatron-LM's ``--calculate-per-token-loss``), the step's loss is the sum of every valid token's
loss over the whole global batch divided by the number of valid tokens N in it (all micro-batches, all
DP ranks)::

    L = sum_{dp, mb, t} m_t l_t / N,      N = sum_{dp, mb, t} m_t

Each micro-batch backpropagates its (this CP rank's) token-loss SUM, undivided; after DDP's average
over the DP x CP ranks the gradient is sum(grad) / (DP CP), so :func:`normalize_grads_per_token`
multiplies it by DP CP / N once N is known -- after the last micro-batch, which is why Megatron (and
this) scales the gradients rather than the losses.  The logged loss is the same L (token-weighted).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from megalite.parallel.context_parallel import cp_group, cp_size
from megalite.parallel.grads import local_grads
from megalite.parallel.state import ProcessGrid

__all__ = ["per_token_terms", "average_loss", "normalize_grads_per_token", "step_token_count"]


def per_token_terms(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """(this rank's token-loss sum, the micro-batch's valid tokens over CP, its mean loss over CP).

    per_token_loss, loss_mask: [b, s/CP]; the sum keeps its graph (what this rank backpropagates)."""
    mask = loss_mask.to(per_token_loss.dtype)
    local_sum = (per_token_loss * mask).sum()
    totals = torch.stack([local_sum.detach(), mask.sum()])
    if cp_size() > 1:
        dist.all_reduce(totals, group=cp_group())
    return local_sum, totals[1], totals[0] / totals[1].clamp(min=1)


def _sum_over_step(grid: ProcessGrid, values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the pipeline (only the last stage holds losses) and the data-parallel ranks."""
    if grid.pp_size > 1:
        dist.all_reduce(values, group=grid.pp_group)
    if grid.dp_size > 1:
        dist.all_reduce(values, group=grid.dp_group)
    return values


def step_token_count(grid: ProcessGrid, losses: List[dict], device: torch.device) -> float:
    """N: the valid tokens of the whole global batch, known on every rank."""
    count = torch.zeros(1, dtype=torch.float64, device=device)
    count[0] = sum(float(d["num_tokens"]) for d in losses)
    return float(_sum_over_step(grid, count)[0])


def average_loss(grid: ProcessGrid, losses: List[dict], device: torch.device) -> float:
    """The step's loss on every rank: the mean of micro-batch means, or with per-token loss (the records
    carry ``num_tokens``) the token-weighted mean L."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if losses and "num_tokens" in losses[0]:
        total[0] = sum(float(d["lm loss"]) * float(d["num_tokens"]) for d in losses)
        total[1] = sum(float(d["num_tokens"]) for d in losses)
    elif losses:
        total[0] = sum(float(d["lm loss"]) for d in losses)
        total[1] = len(losses)
    total = _sum_over_step(grid, total)
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def normalize_grads_per_token(model_chunks: Sequence[torch.nn.Module], grid: ProcessGrid, losses: List[dict],
                              device: torch.device) -> None:
    """After the DP x CP average of token-loss sums: multiply every gradient by DP CP / N."""
    factor = grid.dp_size * grid.cp_size / max(step_token_count(grid, losses, device), 1.0)
    seen, params = set(), []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if id(param) not in seen and param.requires_grad:
                seen.add(id(param))
                params.append(param)
    grads = [g for g in local_grads(params, model_chunks, create=False) if g is not None]
    if grads:
        torch._foreach_mul_(grads, factor)
