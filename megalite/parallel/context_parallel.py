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
token.  :func:`attention_over_cp` all-gathers K and V over the CP group (one collective for both;
backward reduce-scatters their gradients, the adjoint), puts them back in sequence order, and runs
each local query chunk against the keys up to its end with the exact mask ``key index <= query
index``.  (Ring attention, Liu et al. 2023, would pass K/V blocks around the ring with an online
softmax instead, overlapping communication; not built here.)

**The loss** over a split sequence is megalite/model/loss.py's, which sums the token counts over CP.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megalite.parallel import state
from megalite.parallel.mappings import all_gather_along, reduce_scatter_along

__all__ = ["cp_group", "cp_size", "cp_rank", "chunk_ids", "split_sequence", "merge_sequence",
           "split_for_context_parallel", "merge_from_context_parallel", "context_parallel_positions",
           "gather_from_cp", "attention_over_cp"]

# attend(q [b, a, sq, d], k [b, g, sk, d], v [b, g, sk, d], mask [sq, sk] bool or None = causal) -> [b, a, sq, d]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def cp_group():
    """The CP process group, or None without a grid (one process: CP size 1)."""
    return state.get_grid().cp_group if state.grid_is_initialized() else None


def cp_size() -> int:
    return state.get_grid().cp_size if state.grid_is_initialized() else 1


def cp_rank() -> int:
    return state.get_grid().cp_rank if state.grid_is_initialized() else 0


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


# -- attention -----------------------------------------------------------------------------------------
def attention_over_cp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Attend) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence's keys (those of the CP group).

    q: [b, a, s/CP, d], k and v: [b, g, s/CP, d] -> [b, a, s/CP, d], all in this rank's token order
    (chunks ``chunk_ids(CP, rank)``).  ``attend(q, k, v, mask)`` computes softmax attention (GQA and
    dropout are its business); ``mask`` is [sq, sk] bool, True where the query may read the key, or
    None for the plain causal mask.  Without CP this is ``attend(q, k, v, None)``.
    """
    size = cp_size()
    if size == 1:
        return attend(q, k, v, None)
    c = q.shape[2] // 2
    # K and V in one collective: [2, b, g, s, d], then from CP-rank order back to sequence order.
    kv = gather_from_cp(torch.stack([k, v]), dim=3)
    k_all, v_all = merge_sequence(kv.chunk(size, dim=3), dim=3).unbind(0)
    outputs = []
    for slot, chunk in enumerate(chunk_ids(size, cp_rank())):
        # Queries of chunk i sit at positions i c .. i c + c - 1 and read keys 0 .. (i + 1) c - 1;
        # query row j may read key column m iff m <= i c + j: a lower triangle shifted by i c.
        keys = (chunk + 1) * c
        mask = torch.ones(c, keys, dtype=torch.bool, device=q.device).tril(diagonal=chunk * c)
        outputs.append(attend(q[:, :, slot * c:(slot + 1) * c], k_all[:, :, :keys], v_all[:, :, :keys], mask))
    return torch.cat(outputs, dim=2)
