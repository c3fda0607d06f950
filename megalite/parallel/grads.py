"""Finish a step's gradients: data-parallel reduction, then the sums the model's layout needs.

After backward, three kinds of parameter still hold only part of their gradient:

1. every parameter, over data parallelism: each replica saw a different slice of the batch
   (DDP averages over DP x CP; with --overlap-grad-reduce most of it already happened in backward);
2. the tied word embedding under pipeline parallelism: the first stage's input embedding and the last
   stage's output layer are one parameter of the unsplit model, held twice
   (``ParamInfo.shared_embedding``): d(loss)/dW = the sum of both stages' grads, over ``grid.embedding_group``;
3. parameters replicated over TP but fed a sequence shard under sequence parallelism (norm weights,
   row-parallel biases; ``ParamInfo.sequence_parallel``): each TP rank saw s/tp tokens, so the full grad is
   the sum over the TP group (Korthikanti et al. 2022, Sec. 4.2.2).

After :func:`finalize_model_grads` every copy of a parameter holds the gradient of the
single-process model (under a sharded strategy: within the range of the grad buffer this rank owns;
the ranks of a TP group, and the first and last stage's tied embedding buckets, own the same ranges).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megalite.parallel.param_info import ParamInfo, param_info
from megalite.parallel.state import ProcessGrid


def local_grads(params: Sequence[torch.nn.Parameter], model_chunks: Sequence[torch.nn.Module],
                create: bool = True) -> List[Optional[torch.Tensor]]:
    """The tensors holding the params' gradients on this rank: the part a sharded DDP keeps (its
    ``local_grad``), DDP's fp32 ``main_grad``, else ``.grad`` (zeros if unused, or None if not ``create``)."""
    owner = {id(p): chunk for chunk in model_chunks if hasattr(chunk, "local_grad") for p in chunk.parameters()}
    return [owner[id(p)].local_grad(p) if id(p) in owner else _grad_of(p) if create else p.grad for p in params]


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor:
    """The tensor holding ``param``'s gradient: DDP's fp32 ``main_grad``, else ``.grad`` (zeros if unused)."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        return main_grad
    if param.grad is None:
        # Unused here, but the peer rank still sums with us: take part with zeros.
        param.grad = torch.zeros_like(param)
    return param.grad


def _all_reduce_coalesced(grads: List[torch.Tensor], group) -> None:
    """Sum ``grads`` over ``group`` with one collective (flatten, all-reduce, copy back)."""
    if not grads or dist.get_world_size(group) == 1:
        return
    by_dtype = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for dtype in sorted(by_dtype, key=str):  # same order on every rank
        same = by_dtype[dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for grad in same:
            grad.view(-1).copy_(flat[offset:offset + grad.numel()])
            offset += grad.numel()


def _params(model_chunks: Sequence[torch.nn.Module],
            wanted: Callable[[ParamInfo], bool] = lambda info: True) -> List[torch.nn.Parameter]:
    """Each trainable parameter of the chunks once, if ``wanted(its ParamInfo)``."""
    seen, params = set(), []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad and wanted(param_info(param)) and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


@torch.no_grad()
def allreduce_plain_data_parallel_grads(model_chunks: Sequence[torch.nn.Module], grid: ProcessGrid) -> None:
    """Average ``.grad`` of modules that are not DDP-wrapped over DP x CP (no overlap, no buckets)."""
    group = grid.dp_cp_group
    size = dist.get_world_size(group)
    if size == 1 or not model_chunks:
        return
    grads = [_grad_of(p) for p in _params(model_chunks)]
    torch._foreach_mul_(grads, 1.0 / size)
    _all_reduce_coalesced(grads, group)


@torch.no_grad()
def allreduce_embedding_grads(model_chunks: Sequence[torch.nn.Module], grid: ProcessGrid) -> None:
    """Sum the tied embedding's grads over the first and last pipeline stage (no-op without PP)."""
    if grid.pp_size == 1 or not grid.is_embedding_rank:
        return
    tied = _params(model_chunks, lambda info: info.shared_embedding)
    _all_reduce_coalesced(local_grads(tied, model_chunks), grid.embedding_group)


@torch.no_grad()
def allreduce_sequence_parallel_grads(model_chunks: Sequence[torch.nn.Module], grid: ProcessGrid) -> None:
    """Sum the grads of TP-replicated, sequence-sharded parameters over TP (no-op without TP)."""
    if grid.tp_size == 1:
        return
    sequence_sharded = _params(model_chunks, lambda info: info.sequence_parallel)
    _all_reduce_coalesced(local_grads(sequence_sharded, model_chunks), grid.tp_group)


def finalize_model_grads(model_chunks: Sequence[torch.nn.Module], grid: ProcessGrid) -> None:
    """Finish DP reduction of every chunk, then the embedding (PP) and sequence-parallel (TP) sums.

    ``model_chunks``: this rank's model chunks, DDP-wrapped (grads in ``param.main_grad``) or plain
    (grads in ``param.grad``, averaged here over DP x CP with one blocking collective per dtype).
    """
    plain_chunks = []
    for chunk in model_chunks:
        if hasattr(chunk, "finish_grad_sync"):
            chunk.finish_grad_sync()
        else:
            plain_chunks.append(chunk)
    allreduce_plain_data_parallel_grads(plain_chunks, grid)
    allreduce_sequence_parallel_grads(model_chunks, grid)
    allreduce_embedding_grads(model_chunks, grid)
