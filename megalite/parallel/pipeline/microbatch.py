"""The step every schedule shares: one micro-batch through the last stage's chunk, to its loss.

It sits below both ``schedules.py`` (no pipelining) and ``executor.py`` (the pipelined schedules),
so neither imports the other for it.
"""
from __future__ import annotations

from typing import List

import torch

__all__ = ["forward_and_loss"]


def forward_and_loss(forward_step_func, data_iterator, chunk: torch.nn.Module, num_microbatches: int,
                     losses: List[dict]) -> torch.Tensor:
    """Run one micro-batch through the last stage's chunk and return its loss / num_microbatches.

    The loss_func's dict is appended to ``losses`` (logging sees the undivided per-micro-batch loss).
    A loss_func that returns three values, ``(loss sum, valid tokens, dict)``, asks for per-token
    normalization (Megatron's convention): the sum is returned undivided, the count goes into the dict
    as ``num_tokens``, and the caller divides the gradients once the step's tokens are known.
    """
    output_tensor, loss_func = forward_step_func(data_iterator, chunk)
    result = loss_func(output_tensor)
    if len(result) == 3:
        loss_sum, num_tokens, loss_dict = result
        losses.append({**loss_dict, "num_tokens": num_tokens})
        return loss_sum
    loss, loss_dict = result
    losses.append(loss_dict)
    return loss / num_microbatches
