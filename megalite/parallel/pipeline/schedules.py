"""Forward-backward schedules: which micro-batch each stage runs forward or backward, and when.

Every schedule has the signature of :func:`forward_backward_no_pipelining`::

    forward_backward(*, forward_step_func, data_iterator, model, num_microbatches, seq_length,
                     micro_batch_size, forward_only=False, no_sync_func=None, grid=None,
                     timeline=None) -> list[dict]

- ``forward_step_func(data_iterator, model_chunk) -> (output_tensor, loss_func)``; on the last stage
  ``loss_func(output_tensor) -> (loss, {"lm loss": loss.detach()})``.
- Each micro-batch's loss is divided by ``num_microbatches`` before backward, so the accumulated
  gradient is that of the mean loss over the step's micro-batches.
- The returned list holds the ``loss_func`` dicts, one per micro-batch, on the last stage ([] on
  the others); the caller averages them (and broadcasts for logging).
- ``no_sync_func() -> context manager`` suppresses DDP's gradient all-reduce; it wraps every
  backward but the last micro-batch's, so the reduction runs once per step.
- ``timeline`` (:class:`~megalite.parallel.pipeline.timeline.Timeline`) records every pass.

Pick one with :func:`get_forward_backward_func`.  The pipelined schedules (GPipe, 1F1B,
interleaved 1F1B, ZB-H1) are in ``orders.py`` (the order of passes, pure Python, shared with the
simulator) and ``executor.py`` (running an order with a model and point-to-point messages).
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

import torch

from megalite.parallel.state import ProcessGrid

from .executor import pipelined_forward_backward
from .microbatch import forward_and_loss
from .orders import check_schedule, default_schedule
from .timeline import Timeline, record


def get_forward_backward_func(pp_size: int, virtual_pp_size: Optional[int] = None,
                              schedule: Optional[str] = None) -> Callable[..., List[dict]]:
    """The schedule for this layout: ``schedule`` (one of ``orders.SCHEDULES``) or, when None, the
    default of ``orders.default_schedule`` (no pipelining for one stage)."""
    if schedule is None:
        schedule = default_schedule(pp_size, virtual_pp_size)
    if pp_size == 1 and (virtual_pp_size or 1) == 1:
        return forward_backward_no_pipelining  # every pipelined schedule degenerates to this at PP=1
    check_schedule(schedule, pp_size, virtual_pp_size)

    def forward_backward(**kwargs) -> List[dict]:
        return pipelined_forward_backward(schedule=schedule, **kwargs)

    forward_backward.__name__ = f"forward_backward_{schedule.replace('-', '_')}"
    forward_backward.__doc__ = f"The {schedule} pipeline schedule (see megalite.parallel.pipeline.orders)."
    return forward_backward


def forward_backward_no_pipelining(*, forward_step_func, data_iterator, model, num_microbatches: int,
                                   seq_length: int, micro_batch_size: int, forward_only: bool = False,
                                   no_sync_func=None, grid: Optional[ProcessGrid] = None,
                                   timeline: Optional[Timeline] = None) -> List[dict]:
    """Gradient accumulation on one stage: forward and backward each micro-batch in turn.

    Gradients of micro-batches 0..m-2 accumulate locally (inside ``no_sync_func()``); the last
    micro-batch's backward runs outside it, so DDP reduces the summed gradient once.
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    if len(chunks) != 1:
        raise ValueError(f"no pipelining runs one model chunk, got {len(chunks)}; "
                         f"a virtual pipeline needs a pipeline size > 1")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be at least 1, got {num_microbatches}")
    (chunk,) = chunks
    no_sync = no_sync_func or contextlib.nullcontext
    losses: List[dict] = []
    for microbatch in range(num_microbatches):
        last = microbatch == num_microbatches - 1
        with (contextlib.nullcontext() if last else no_sync()):
            with record(timeline, "F", microbatch), torch.set_grad_enabled(not forward_only):
                loss = forward_and_loss(forward_step_func, data_iterator, chunk, num_microbatches, losses)
            if not forward_only:
                with record(timeline, "B", microbatch):
                    loss.backward()
    return losses

