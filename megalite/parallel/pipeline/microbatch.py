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
    """
    output_tensor, loss_func = forward_step_func(data_iterator, chunk)
    loss, loss_dict = loss_func(output_tensor)
    losses.append(loss_dict)
    return loss / num_microbatches
