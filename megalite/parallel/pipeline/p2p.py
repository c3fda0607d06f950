"""Point-to-point messages between pipeline stages: activations forward, their gradients back.

Every message has the fixed shape ``[s/cp/tp if sequence-parallel else s/cp, b, h]`` (docs/architecture.md), so the
receiver allocates its buffer without being told a shape.  Messages are posted without waiting
(:class:`Postbox`): a send as soon as the pass that produced its tensor has run, a receive early,
and a rank waits only on the receive that the pass it is about to run needs (``executor.py``).
Both ends post the messages between them in the same order (the simulator's), and every message
carries a distinct tag: gloo pairs sends with receives by tag, NCCL by the order in which each
pair of ranks posts them, so they pair up on either backend.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
from torch.autograd.graph import GradientEdge, get_gradient_edge


def message_shape(hidden_size: int, seq_length: int, micro_batch_size: int, cp_size: int = 1, tp_size: int = 1,
                  sequence_parallel: bool = False) -> Tuple[int, int, int]:
    """``[s/cp/tp if sequence-parallel else s/cp, b, h]``: the shape of every pipeline message.

    ``cp_size``: context-parallel ranks, each of which holds s/cp tokens of every sequence; under
    ``sequence_parallel`` each of the ``tp_size`` TP ranks holds s/cp/tp of them.
    """
    if seq_length % cp_size:
        raise ValueError(f"sequence length {seq_length} is not divisible by the CP size {cp_size}")
    seq = seq_length // cp_size
    if sequence_parallel:
        if seq % tp_size:
            raise ValueError(f"{seq} tokens per CP rank are not divisible by the TP size {tp_size} under sequence "
                             f"parallelism")
        seq //= tp_size
    return (seq, micro_batch_size, hidden_size)


class Postbox:
    """Posted sends and receives of one step, each waited for only when it must be.

    A send's tensor must stay untouched until its send completes, so the postbox keeps it (and the
    work) until then: :meth:`reap` drops the completed ones, :meth:`wait_all` ends the step.
    """

    def __init__(self, group):
        self.group = group
        self.sends: List[Tuple[object, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        """Post ``tensor`` to global rank ``peer`` and return at once."""
        self.sends.append((dist.isend(tensor, peer, group=self.group, tag=tag), tensor))

    def recv(self, buffer: torch.Tensor, peer: int, tag: int):
        """Post a receive into ``buffer`` from global rank ``peer``; wait on the returned work before reading it."""
        return dist.irecv(buffer, peer, group=self.group, tag=tag)

    def reap(self) -> None:
        self.sends = [(work, tensor) for work, tensor in self.sends if not work.is_completed()]

    def wait_all(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends = []


# torch.autograd.backward and .grad take GradientEdges as outputs from torch 2.5 on.
BACKWARD_TAKES_EDGES = torch.__version__ >= (2, 5)


def release_output(output: torch.Tensor) -> GradientEdge | torch.Tensor:
    """Keep only the autograd edge of a sent activation, so its storage can go.

    Megatron-LM frees a sent output's storage by hand (``deallocate_output_tensor``) and then needs a
    backward that skips the shape check against the freed tensor.  Holding the gradient edge
    (grad_fn, output_nr) instead of the tensor does both: the tensor's memory is returned unless the
    graph itself saved it for backward, and ``torch.autograd.backward(edge, grad)`` checks ``grad``
    against the shape the edge recorded.  Below torch 2.5 (down to the 2.4 floor) the output itself
    is kept: the same backward, without the saving.
    """
    return get_gradient_edge(output) if BACKWARD_TAKES_EDGES else output
