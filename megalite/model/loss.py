"""The language-model loss, the one every path uses (training, its tests, the tools): the mean of the
per-token losses over the tokens that count, ``sum(l m) / sum(m)``.

Under context parallelism each CP rank holds part of every sequence's tokens, and DDP averages
gradients over DP x CP.  With ``S_r = sum(l m)`` and ``M_r = sum(m)`` on CP rank r, the one-rank
loss is ``sum_r S_r / sum_r M_r``; rank r backpropagates ``CP S_r / sum_q M_q``, so that DDP's
average over the CP ranks gives the one-rank gradient (Megatron-LM's pretrain_gpt multiplies by the
CP size for the same reason).  Without CP both are ``sum(l m) / sum(m)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from megalite.parallel.context_parallel import cp_group, cp_size
from megalite.parallel.mappings import all_reduce

__all__ = ["LanguageModelLoss", "language_model_loss"]


class LanguageModelLoss(NamedTuple):
    loss: torch.Tensor       # what this rank backpropagates
    mean: torch.Tensor       # the micro-batch's mean loss over all its tokens (every CP rank's), detached


def language_model_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> LanguageModelLoss:
    """per_token_loss, loss_mask: [b, s/CP], this rank's tokens (the whole sequence without CP).

    >>> loss = language_model_loss(torch.tensor([[1., 2., 9.]]), torch.tensor([[1, 1, 0]]))
    >>> float(loss.loss), float(loss.mean)
    (1.5, 1.5)
    """
    loss_mask = loss_mask.to(per_token_loss.dtype)
    local_sum = (per_token_loss * loss_mask).sum()
    size = cp_size()
    if size == 1:
        loss = local_sum / loss_mask.sum()
        return LanguageModelLoss(loss, loss.detach())
    totals = all_reduce(torch.stack([local_sum.detach(), loss_mask.sum()]), group=cp_group())
    return LanguageModelLoss(local_sum * (size / totals[1]), totals[0] / totals[1])
