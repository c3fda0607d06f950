"""Context parallelism (CP): each rank of a CP group holds a part of every sequence.

**The split, balanced for the causal mask** (Megatron-LM's scheme).  A sequence of ``s`` tokens is cut
into ``2 CP`` chunks of ``c = s / (2 CP)`` tokens and CP rank ``r`` holds chunks ``r`` and
``2 CP - 1 - r``, in that order::

    s = 8, CP = 2, c = 2        tokens  0 1 | 2 3 | 4 5 | 6 7
        CP rank 0: chunks 0, 3  ->      0 1 6 7
        CP rank 1: chunks 1, 2  ->      2 3 4 5

Under the causal mask the queries of chunk ``i`` read ``(i + 1) c`` keys, so rank ``r`` reads
``(r + 1) c + (2 CP - r) c = (2 CP + 1) c`` keys per query row of a chunk: every rank does the same
attention work (cutting into CP contiguous pieces would give the last rank CP times the first's).
Everything outside attention (embeddings, norms, MLP, loss) is per-token and runs on the local
``s / CP`` tokens unchanged; position ids travel with the tokens, so RoPE and learned positions see
the true positions.

**Attention across the split.**  Each rank's queries need the keys and values of every earlier
token: megalite/parallel/cp_attention.py brings them by ring, all-gather or all-to-all
(``--cp-comm-type``) and computes fused blocks merged by log-sum-exp, never the score matrix.

**The loss** over a split sequence is megalite/model/loss.py's, which sums the token counts over CP.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megalite.parallel import state
from megalite.parallel.mappings import all_gather_along, reduce_scatter_along

__all__ = ["cp_group", "cp_size", "cp_rank", "cp_comm_type", "chunk_ids", "split_sequence", "merge_sequence",
           "split_for_context_parallel", "merge_from_context_parallel", "context_parallel_positions",
           "gather_from_cp"]

def cp_group():
    """The CP process group, or None without a grid (one process: CP size 1)."""
    return state.get_grid().cp_group if state.grid_is_initialized() else None


def cp_size() -> int:
    return state.get_grid().cp_size if state.grid_is_initialized() else 1


def cp_rank() -> int:
    return state.get_grid().cp_rank if state.grid_is_initialized() else 0


def cp_comm_type() -> str:
    """How attention reaches the other CP ranks' keys (``--cp-comm-type``; cp_attention.py)."""
    return state.get_grid().cp_comm_type if state.grid_is_initialized() else "p2p"


# -- the split (pure functions) ----------------------------------------------------------------------
def chunk_ids(size: int, rank: int) -> Tuple[int, int]:
    """The two chunks (of 2 x ``size``) that CP rank ``rank`` holds, in its local order.

    >>> [chunk_ids(4, r) for r in range(4)]
    [(0, 7), (1, 6), (2, 5), (3, 4)]
    """
    return rank, 2 * size - 1 - rank


def split_sequence(x: torch.Tensor, size: int, rank: int, dim: int) -> torch.Tensor:
    """This CP rank's tokens of ``x`` along ``dim``: chunks ``rank`` and ``2 size - 1 - rank``, concatenated.

    x: [..., s, ...] -> [..., s/size, ...] (a copy; ``x`` itself when size is 1).
    """
    if size == 1:
        return x
    if x.shape[dim] % (2 * size):
        raise ValueError(f"context parallelism over {size} ranks cuts the sequence into {2 * size} chunks, but "
                         f"dim {dim} of a tensor of shape {tuple(x.shape)} has {x.shape[dim]} tokens; use a "
                         f"sequence length divisible by {2 * size}")
    chunks = x.chunk(2 * size, dim)
    return torch.cat([chunks[i] for i in chunk_ids(size, rank)], dim)


def merge_sequence(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """The inverse of :func:`split_sequence`: ``parts[r]`` is CP rank r's piece -> the whole sequence."""
    size = len(parts)
    if size == 1:
        return parts[0]
    chunks: List[Optional[torch.Tensor]] = [None] * (2 * size)
    for rank, part in enumerate(parts):
        first, second = part.chunk(2, dim)
        chunks[chunk_ids(size, rank)[0]], chunks[chunk_ids(size, rank)[1]] = first, second
    return torch.cat(chunks, dim)


def split_for_context_parallel(batch: Dict[str, torch.Tensor], size: int, rank: int) -> Dict[str, torch.Tensor]:
    """A micro-batch (tokens, labels, loss_mask, position_ids, each [b, s]) -> this CP rank's [b, s/CP] of each."""
    return {key: split_sequence(value, size, rank, dim=1) for key, value in batch.items()}


def merge_from_context_parallel(batches: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`split_for_context_parallel`: ``batches[r]`` from CP rank r -> the whole batch."""
    return {key: merge_sequence([b[key] for b in batches], dim=1) for key in batches[0]}


def context_parallel_positions(local_seq: int, device=None) -> torch.Tensor:
    """True positions [s/CP] of this CP rank's ``local_seq`` tokens (``arange`` without CP)."""
    size = cp_size()
    return split_sequence(torch.arange(local_seq * size, device=device), size, cp_rank(), dim=0)


# -- the communication pair --------------------------------------------------------------------------
class _GatherFromCP(torch.autograd.Function):
    """y = concat_r x_r along ``dim``, each rank's consumer reading a different part of y
    =>  dL/dx_r = (sum_q dL/dy_q)[part of r]: a reduce-scatter (the same algebra as SP's
    all-gather / reduce-scatter pair, on the CP group)."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return all_gather_along(x, dim, group=cp_group(), kind="cp_all_gather")

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along(grad, ctx.dim, group=cp_group(), kind="cp_reduce_scatter"), None


def gather_from_cp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x: [..., s/CP, ...] -> [..., s, ...] in CP-rank order (rank 0's chunks, then rank 1's, ...)."""
    return _GatherFromCP.apply(x, dim) if cp_size() > 1 else x
