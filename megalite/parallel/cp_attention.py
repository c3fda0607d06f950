"""Causal attention across the context-parallel (CP) split, at fused-kernel memory.

Each CP rank holds the queries, keys and values of its two chunks (context_parallel.py's split).
Three ways to bring every earlier key to every query (Megatron-LM's ``--cp-comm-type``), all built
from the fused blocks of block_attention.py merged by log-sum-exp, none forming an ``s/CP x s``
score matrix; with packed documents (documents.py) each block is cut further per document.

``p2p`` (ring, the default)
    K and V pass around the CP ring: at step t a rank attends its queries to the K/V block of rank
    ``r - t`` while sending that block on to ``r + 1`` and receiving the next (asynchronous
    send/receive: the transfer runs beside the block's compute).  Backward passes the blocks round
    again with their dK/dV accumulators, which arrive home after the last step.  Per layer and rank:
    (CP - 1) K/V blocks sent in forward, (CP - 1) K/V blocks and CP dK/dV blocks in backward.
``all_gather``
    One all-gather of K and V, then every block; backward gathers again (nothing of the whole
    sequence is kept between forward and backward) and reduce-scatters dK/dV.
``a2a``
    All-to-all from "my tokens, all heads" to "all tokens, my heads" (Jacobs et al. 2023, DeepSpeed
    Ulysses): each rank runs ordinary causal attention over the whole sequence for a/CP heads and
    g/CP key/value groups, then all-to-all back; refused unless CP divides the local groups.

Attention dropout has no fused block kernel here: with dropout > 0 under CP or per-document masks
:func:`attention` falls back to masked attention over the gathered keys (the masked kernel forms
the score matrix; long-context runs set ``--attention-dropout 0``).
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from megalite.parallel.block_attention import (
    Pair,
    backward_pairs,
    forward_pairs,
    new_accumulators,
)
from megalite.parallel.context_parallel import chunk_ids, cp_group, cp_rank, cp_size, merge_sequence
from megalite.parallel.documents import Documents, span_pairs
from megalite.parallel.mappings import all_gather_along, comm_counter, reduce_scatter_along
from megalite.parallel.masked_attention import masked_attention

__all__ = ["CP_COMM_TYPES", "attention", "pairs_between", "check_a2a_heads"]

CP_COMM_TYPES = ("p2p", "all_gather", "a2a")

# attend(q [b, a, sq, d], k [b, g, sk, d], v, mask [b or 1, 1, sq, sk] bool or None = causal) -> [b, a, sq, d]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@functools.lru_cache(maxsize=256)
def pairs_between(q_rank: int, k_rank: int, size: int, chunk: int, documents: Optional[Documents]) -> List[Pair]:
    """The blocks joining CP rank ``q_rank``'s queries with CP rank ``k_rank``'s keys (rows of each
    rank's local [2 chunk] tensors): chunk i's queries read chunk m whole when m < i, causally when
    m == i, not at all when m > i.  Planned once per micro-batch's documents, then reused by every
    layer, ring step and backward (``Documents`` is immutable)."""
    pairs = []
    for q_slot, q_chunk in enumerate(chunk_ids(size, q_rank)):
        for k_slot, k_chunk in enumerate(chunk_ids(size, k_rank)):
            pairs += span_pairs(q_chunk * chunk, q_slot * chunk, k_chunk * chunk, k_slot * chunk, chunk, documents)
    return pairs


@functools.lru_cache(maxsize=64)
def whole_sequence_pairs(seq: int, documents: Optional[Documents]) -> List[Pair]:
    """The blocks of causal attention over a whole sequence of ``seq`` tokens (one per document)."""
    return span_pairs(0, 0, 0, 0, seq, documents)


class _Blocks(torch.autograd.Function):
    """Attention of q over one k/v through the given blocks (one rank's whole sequence)."""

    @staticmethod
    def forward(ctx, q, k, v, pairs):
        out, lse = new_accumulators(q)
        forward_pairs(q, k, v, pairs, out, lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pairs = pairs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
        backward_pairs(dout.contiguous(), q, k, v, out, lse, ctx.pairs, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


# -- p2p: the ring -------------------------------------------------------------------------------------
def _ring_exchange(send, receive):
    """Start sending the tensors ``send`` to the next CP rank and receiving the previous rank's into
    ``receive`` (as many, of the same shapes); returns the requests to wait on."""
    group, size, rank = cp_group(), cp_size(), cp_rank()
    following = dist.get_global_rank(group, (rank + 1) % size)
    preceding = dist.get_global_rank(group, (rank - 1) % size)
    operations = []
    for outgoing, incoming in zip(send, receive):
        comm_counter.bytes["cp_send"] += outgoing.numel() * outgoing.element_size()
        operations += [dist.P2POp(dist.isend, outgoing, following, group),
                       dist.P2POp(dist.irecv, incoming, preceding, group)]
    comm_counter.calls["cp_send"] += 1
    return dist.batch_isend_irecv(operations)


def _wait(requests) -> None:
    for request in requests:
        request.wait()


def _start_next(kv, step: int, size: int):
    """Start passing this step's K/V on, unless it is the last step: (requests, buffers) or (None, None)."""
    if step == size - 1:
        return None, None
    incoming = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in kv]   # contiguous, as sent
    return _ring_exchange([t.contiguous() for t in kv], incoming), incoming


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, documents):
        size, rank, chunk = cp_size(), cp_rank(), q.shape[2] // 2
        kv = (k, v)
        out, lse = new_accumulators(q)
        for step in range(size):
            requests, incoming = _start_next(kv, step, size)
            source = (rank - step) % size
            forward_pairs(q, *kv, pairs_between(rank, source, size, chunk, documents), out, lse)
            if requests is not None:
                _wait(requests)
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.documents = documents
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        size, rank, chunk = cp_size(), cp_rank(), q.shape[2] // 2
        dout = dout.contiguous()
        kv = (k, v)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        # dK and dV of the block in hand travel with it round the ring, home after the last step.
        dkv = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in kv]
        for step in range(size):
            requests, incoming = _start_next(kv, step, size)
            source = (rank - step) % size
            backward_pairs(dout, q, *kv, out, lse, pairs_between(rank, source, size, chunk, ctx.documents), dq, *dkv)
            arriving = [torch.empty_like(t) for t in dkv]
            _wait(_ring_exchange(dkv, arriving))
            dkv = arriving
            if requests is not None:
                _wait(requests)
                kv = incoming
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


# -- all_gather ------------------------------------------------------------------------------------------
def _gather_kv(kv: torch.Tensor) -> torch.Tensor:
    """[2, b, g, 2c, d] on each rank -> [CP, 2, b, g, 2c, d], CP rank order."""
    return all_gather_along(kv, 0, group=cp_group(), kind="cp_all_gather").view(cp_size(), *kv.shape)


class _GatheredBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, documents):
        size, rank, chunk = cp_size(), cp_rank(), q.shape[2] // 2
        kv_all = _gather_kv(torch.stack([k, v]))
        out, lse = new_accumulators(q)
        for source in range(size):
            forward_pairs(q, kv_all[source, 0], kv_all[source, 1], pairs_between(rank, source, size, chunk, documents),
                          out, lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)   # not the gathered K/V: backward gathers again
        ctx.documents = documents
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        size, rank, chunk = cp_size(), cp_rank(), q.shape[2] // 2
        kv_all = _gather_kv(torch.stack([k, v]))
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv_all = torch.zeros(kv_all.shape, dtype=torch.float32, device=q.device)
        for source in range(size):
            backward_pairs(dout, q, kv_all[source, 0], kv_all[source, 1], out, lse,
                           pairs_between(rank, source, size, chunk, ctx.documents), dq, dkv_all[source, 0],
                           dkv_all[source, 1])
        del kv_all
        dkv = reduce_scatter_along(dkv_all.view(size * 2, *dkv_all.shape[2:]), 0, group=cp_group(),
                                   kind="cp_reduce_scatter")
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


# -- a2a: heads for tokens --------------------------------------------------------------------------------
def check_a2a_heads(local_heads: int, local_groups: int, size: int) -> None:
    """One line when ``--cp-comm-type a2a`` cannot split this rank's heads over ``size`` CP ranks."""
    if local_groups % size or local_heads % size:
        raise ValueError(f"--cp-comm-type a2a splits attention heads over the {size} context-parallel ranks, but "
                         f"each tensor-parallel rank holds {local_heads} query heads and {local_groups} key/value "
                         f"groups; use a --context-parallel-size dividing {local_groups}, or --cp-comm-type p2p")


def _sequence_order(size: int, local: int, device) -> torch.Tensor:
    """Indices taking [CP ranks' local tokens, in rank order] to sequence order."""
    pieces = torch.arange(size * local, device=device).chunk(size)
    return merge_sequence(list(pieces), dim=0)


def _all_to_all(x: torch.Tensor, split_dim: int, concat_dim: int) -> torch.Tensor:
    """Split ``x`` along ``split_dim`` into CP parts, send part j to CP rank j, concatenate what
    arrives along ``concat_dim`` in rank order."""
    size = cp_size()
    parts = torch.stack(x.chunk(size, dim=split_dim)).contiguous()
    received = torch.empty_like(parts)
    dist.all_to_all_single(received, parts, group=cp_group())
    comm_counter.add("cp_all_to_all", parts.numel() * parts.element_size(), size)
    return torch.cat(received.unbind(0), dim=concat_dim)


class _TokensToHeads(torch.autograd.Function):
    """[b, H, s/CP, d] (my tokens, CP-split order) -> [b, H/CP, s, d] (my heads, sequence order)."""

    @staticmethod
    def forward(ctx, x):
        order = _sequence_order(cp_size(), x.shape[2], x.device)
        ctx.save_for_backward(order)
        return _all_to_all(x, 1, 2).index_select(2, order)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        rank_order = torch.empty_like(grad).index_copy_(2, order, grad)
        return _all_to_all(rank_order, 2, 1)


class _HeadsToTokens(torch.autograd.Function):
    """The inverse of :class:`_TokensToHeads`."""

    @staticmethod
    def forward(ctx, x):
        order = _sequence_order(cp_size(), x.shape[2] // cp_size(), x.device)
        ctx.save_for_backward(order)
        return _all_to_all(torch.empty_like(x).index_copy_(2, order, x), 2, 1)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return _all_to_all(grad, 1, 2).index_select(2, order)


def _heads_attention(q, k, v, documents: Optional[Documents]) -> torch.Tensor:
    check_a2a_heads(q.shape[1], k.shape[1], cp_size())
    q, k, v = (_TokensToHeads.apply(t) for t in (q, k, v))
    seq = q.shape[2]
    out = _Blocks.apply(q, k, v, whole_sequence_pairs(seq, documents))
    return _HeadsToTokens.apply(out)


# -- the entry ------------------------------------------------------------------------------------------
def attention(q, k, v, attend: Attend, dropout: bool, documents: Optional[Documents] = None,
              comm_type: str = "p2p") -> torch.Tensor:
    """Causal (and, with ``documents``, per-document) attention of this rank's queries over the
    whole sequence's keys.  q: [b, a, s/CP, d], k and v: [b, g, s/CP, d] -> [b, a, s/CP, d].

    ``attend`` is the one-rank attention (used alone without CP and documents, and for the
    dropout fallback); ``dropout``: whether attention dropout is on now."""
    if cp_size() == 1 and documents is None:
        return attend(q, k, v, None)
    return _split_attention(q, k, v, attend, dropout, documents, comm_type)


# Host-side block planning, collectives and autograd Functions: run eagerly inside a compiled layer
# (--compile), which then traces what comes before and after.
@torch.compiler.disable
def _split_attention(q, k, v, attend: Attend, dropout: bool, documents: Optional[Documents],
                     comm_type: str) -> torch.Tensor:
    size = cp_size()
    if dropout:
        return masked_attention(q, k, v, attend, documents)
    if size == 1:
        return _Blocks.apply(q, k, v, whole_sequence_pairs(q.shape[2], documents))
    if q.shape[2] % 2:
        raise ValueError(f"context parallelism needs an even number of local tokens, got {q.shape[2]}")
    if comm_type == "p2p":
        return _Ring.apply(q, k, v, documents)
    if comm_type == "all_gather":
        return _GatheredBlocks.apply(q, k, v, documents)
    if comm_type == "a2a":
        return _heads_attention(q, k, v, documents)
    raise ValueError(f"--cp-comm-type {comm_type!r} is not one of {', '.join(CP_COMM_TYPES)}")
