"""How the routers' auxiliary losses reach the gradient and the log, without passing through the loss function.

A router's balancing loss and z-loss belong to a layer that may sit on any pipeline stage, while the language
model's loss exists on the last stage only.  As in Megatron-LM, each auxiliary loss is therefore attached to
the layer's output by :func:`attach`: forward returns the output unchanged; backward passes the output's
gradient through and gives the auxiliary loss the gradient ``scale`` -- what the main loss's gradient is at
that point: the fp16 loss scale / the micro-batches of the step (the main loss is divided by them in
megalite/parallel/pipeline/microbatch.py).  The step's auxiliary loss is so the mean over micro-batches, like
the main loss, and data parallelism averages it over ranks with the gradients.

The values are also recorded (unscaled by their coefficient, as Megatron logs them) per layer and summed over
the step's micro-batches; megalite/training/moe_step.py averages and reduces them for the log line.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["attach", "set_backward_scale", "record", "take_records"]

_state = {"scale": 1.0}
_records: Dict[str, Dict[int, torch.Tensor]] = {}


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor):
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        aux_grad = torch.full(ctx.aux_shape, _state["scale"], dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, aux_grad


def attach(output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    """``output`` unchanged; its backward also backpropagates ``aux_loss`` with the current scale."""
    return _Attach.apply(output, aux_loss)


def set_backward_scale(scale: float) -> None:
    """The gradient each attached auxiliary loss receives: loss scale / micro-batches of the step (1.0 by
    default, which is right for one micro-batch and no fp16 loss scaling)."""
    _state["scale"] = float(scale)


def record(name: str, layer_number: int, value: torch.Tensor) -> None:
    """Add ``value`` (detached) to ``name``'s running sum for global layer ``layer_number``."""
    per_layer = _records.setdefault(name, {})
    value = value.detach().float()
    per_layer[layer_number] = per_layer[layer_number] + value if layer_number in per_layer else value


def take_records() -> Dict[str, Dict[int, torch.Tensor]]:
    """The sums recorded since the last call, which are cleared."""
    taken = {name: dict(per_layer) for name, per_layer in _records.items()}
    _records.clear()
    return taken
