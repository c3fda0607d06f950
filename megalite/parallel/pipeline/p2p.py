"""Point-to-point messages between pipeline stages: activations forward, their gradients back.

Every message has the fixed shape ``[s/cp/tp if sequence-parallel else s/cp, b, h]`` (docs/architecture.md), so the
receiver allocates its buffer without being told a shape.  A schedule never waits on a single
send or receive: it runs the *exchanges* the simulator derived from its order (``executor.py``),
each a batch of sends and receives that every involved rank posts at the same point of its order,
through ``batch_isend_irecv``.  Batching is what makes this safe on NCCL, where the sends and
receives between two ranks share one stream and a lone blocking send facing a lone blocking send
would deadlock; on gloo each op is an independent isend/irecv.  Ops inside an exchange are
sorted the same way on both ends, and carry distinct tags, so they pair up on either backend.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
from torch.autograd.graph import GradientEdge, get_gradient_edge


def message_shape(config, seq_length: int, micro_batch_size: int, cp_size: int = 1) -> Tuple[int, int, int]:
    """``[s/cp/tp if sequence-parallel else s/cp, b, h]``: the shape of every pipeline message.

    ``cp_size``: context-parallel ranks, each of which holds s/cp tokens of every sequence.
    """
    if seq_length % cp_size:
        raise ValueError(f"sequence length {seq_length} is not divisible by the CP size {cp_size}")
    seq = seq_length // cp_size
    if getattr(config, "sequence_parallel", False):
        tp = getattr(config, "tensor_model_parallel_size", 1)
        if seq % tp:
            raise ValueError(f"{seq} tokens per CP rank are not divisible by the TP size {tp} under sequence "
                             f"parallelism")
        seq //= tp
    return (seq, micro_batch_size, config.hidden_size)


def exchange(sends: List[Tuple[torch.Tensor, int, int]], recvs: List[Tuple[torch.Tensor, int, int]], group) -> None:
    """Post ``sends`` and ``recvs`` ((tensor, peer global rank, tag) each) as one batch and wait for all."""
    ops = [dist.P2POp(dist.isend, tensor, peer, group, tag) for tensor, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, tensor, peer, group, tag) for tensor, peer, tag in recvs]
    if not ops:
        return
    for work in dist.batch_isend_irecv(ops):
        work.wait()


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
