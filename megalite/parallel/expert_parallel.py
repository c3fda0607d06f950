"""Expert parallelism's communication: the experts of a layer are split over the EP group (E / EP per rank,
megalite/parallel/state.py), so each token's rows travel to the ranks that hold its experts and back.

The alltoall dispatcher.  Rows leave a rank grouped by global expert (megalite/model/moe/experts.py's
permutation), so the rows for EP rank r are one contiguous block.  First the counts go (``[EP, E/EP]``, one
all-to-all of E integers), so every rank knows how many rows it sends to and receives from each peer; then
the rows go with those split sizes, and come back after the experts with the sizes swapped.  Received rows
are ordered by source rank, then local expert; :func:`dispatch` regroups them by local expert for the
grouped GEMM and :func:`combine` undoes that before the return trip.  The all-to-all's backward is the
all-to-all with the split sizes swapped.  gloo serves ``all_to_all_single`` with split sizes on the CPU.

The allgather dispatcher.  Every rank gathers the whole EP group's tokens, routing weights and choices
(:func:`gather_tokens`; equal shapes, every rank has the same micro-batch), runs its own experts on the rows
chosen for them, and the partial outputs -- zero for the rows of other ranks' experts -- are summed back to
the ranks that own the tokens (:func:`reduce_scatter_tokens`).  More traffic than alltoall (every token to
every rank), no count exchange.  Backward: the all-gather's is a reduce-scatter, and the other way round.

Counted in megalite/parallel/mappings.py's ``comm_counter``: the allgather dispatcher's collectives under
``ep_all_gather`` / ``ep_reduce_scatter`` (its ring cost model); the alltoall dispatcher's row exchanges, forward
and backward, under ``ep_all_to_all`` and the count exchange under ``ep_all_to_all_counts``, each as the bytes
that leave this rank (the rows for the other ranks; the block a rank keeps is not sent); expert TP's exchanges
under ``etp_all_gather`` (the counts) and ``etp_all_to_all`` (the rows and the partial outputs), the same way.

Expert tensor parallelism (ETP > 1, parallel/state.py's etp group: the TP group).  Each rank holds an ffn slice
of its experts: fc1's columns (with SwiGLU whole (gate, up) units) and fc2's rows, as a dense MLP is split over
TP.  alltoall: after the EP all-to-all every rank of the etp group needs the rows of the whole group
(:func:`gather_for_expert_tp`: the counts ``[ETP, E/EP]`` are gathered first, then each rank's rows go to every
rank with those split sizes -- gloo gathers no unequal sizes -- and are regrouped by local expert); each rank's
experts give partial sums of fc2's output for all of them, and :func:`reduce_scatter_from_expert_tp` sends each
row's partials back to the rank it came from, which sums them (in etp rank order).  Backward: the partials'
gradient is the output's, sent back; each rank's input gradient is the sum of every etp rank's partial one.
allgather: the tokens are gathered over the tp_ep group (expert TP x EP), and the reduce-scatter over it sums
both the other EP ranks' experts and the other ffn slices.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

from megalite.parallel import state
from megalite.parallel.mappings import all_gather_along, comm_counter, reduce_scatter_along

__all__ = ["ep_size", "ep_rank", "ep_group", "etp_size", "etp_rank", "etp_group", "allgather_group", "all_to_all",
           "dispatch", "combine", "gather_for_expert_tp", "reduce_scatter_from_expert_tp", "gather_tokens",
           "reduce_scatter_tokens"]


def ep_group():
    """The expert-parallel group, or None (EP 1 or no grid)."""
    return state.get_grid().ep_group if state.grid_is_initialized() else None


def ep_size() -> int:
    return state.get_grid().ep_size if state.grid_is_initialized() else 1


def ep_rank() -> int:
    return state.get_grid().ep_rank if state.grid_is_initialized() else 0


def etp_size() -> int:
    """Ranks each expert's ffn is split over (expert tensor parallelism; 1 without a grid)."""
    return state.get_grid().etp_size if state.grid_is_initialized() else 1


def etp_rank() -> int:
    return state.get_grid().etp_rank if state.grid_is_initialized() else 0


def etp_group():
    """The expert-tensor-parallel group, or None (ETP 1 or no grid)."""
    return state.get_grid().etp_group if state.grid_is_initialized() else None


def allgather_group():
    """The allgather dispatcher's group: expert TP x EP (the EP group at ETP 1), or None (both 1)."""
    if not state.grid_is_initialized():
        return None
    grid = state.get_grid()
    return grid.tp_ep_group if grid.etp_size > 1 else grid.ep_group


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits: List[int], input_splits: List[int], group, kind: str):
        ctx.splits, ctx.group, ctx.kind = (output_splits, input_splits), group, kind
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        _count(kind, x, input_splits, group)
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        back = _AllToAll.apply(grad.contiguous(), input_splits, output_splits, ctx.group, ctx.kind)
        return back, None, None, None, None


def _count(kind: str, x: torch.Tensor, input_splits: List[int], group) -> None:
    """The bytes of ``x``'s rows that go to the other ranks of ``group`` (module docstring)."""
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
    comm_counter.bytes[kind] += (sum(input_splits) - input_splits[dist.get_rank(group)]) * row_bytes
    comm_counter.calls[kind] += 1


def all_to_all(x: torch.Tensor, output_splits: List[int], input_splits: List[int], group,
               kind: str = "ep_all_to_all") -> torch.Tensor:
    """Rows of ``x`` in blocks of ``input_splits`` to each rank of ``group``; returns the blocks received
    (``output_splits`` rows from each rank, in rank order); differentiable; counted under ``kind``."""
    return _AllToAll.apply(x, output_splits, input_splits, group, kind)


def dispatch(rows: torch.Tensor, counts: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor, tuple]:
    """rows [N, h] grouped by global expert with ``counts`` [E] -> (this rank's rows grouped by local expert,
    their counts [E / EP], what :func:`combine` needs to send the results back)."""
    size = dist.get_world_size(group)
    local_experts = counts.numel() // size
    sent_counts = counts.reshape(size, local_experts)
    received_counts = torch.empty_like(sent_counts)
    _count("ep_all_to_all_counts", sent_counts, [1] * size, group)
    dist.all_to_all_single(received_counts, sent_counts.contiguous(), group=group)      # [source, local expert]
    input_splits, output_splits = sent_counts.sum(dim=1).tolist(), received_counts.sum(dim=1).tolist()
    received = all_to_all(rows, output_splits, input_splits, group)
    order = _by_local_expert(received_counts)
    return received.index_select(0, order), received_counts.sum(dim=0), (order, input_splits, output_splits)


def _by_local_expert(received_counts: torch.Tensor) -> torch.Tensor:
    """received_counts [source, local expert] of rows ordered by source, then expert -> the order that
    groups them by local expert (each expert's rows by source)."""
    sources, local_experts = received_counts.shape
    owner = torch.arange(local_experts, device=received_counts.device).repeat(sources)     # per (source, expert)
    return torch.argsort(torch.repeat_interleave(owner, received_counts.reshape(-1)), stable=True)


def combine(results: torch.Tensor, plan: tuple, group, kind: str = "ep_all_to_all") -> torch.Tensor:
    """The experts' results (in :func:`dispatch`'s order) back to the ranks and order the rows came from."""
    order, input_splits, output_splits = plan
    by_source = results.index_select(0, torch.argsort(order))
    return all_to_all(by_source, input_splits, output_splits, group, kind)


def gather_for_expert_tp(rows: torch.Tensor, counts: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor, tuple]:
    """rows [N, h] grouped by local expert with ``counts`` [E / EP] -> (every etp rank's rows grouped by local
    expert, their counts [E / EP], what :func:`reduce_scatter_from_expert_tp` needs); the counts go first."""
    size = dist.get_world_size(group)
    received_counts = all_gather_along(counts.unsqueeze(0), 0, group, kind="etp_all_gather")   # [source, expert]
    input_splits, output_splits = [rows.shape[0]] * size, received_counts.sum(dim=1).tolist()
    received = all_to_all(rows.repeat(size, 1), output_splits, input_splits, group, kind="etp_all_to_all")
    order = _by_local_expert(received_counts)
    return received.index_select(0, order), received_counts.sum(dim=0), (order, input_splits, output_splits)


def reduce_scatter_from_expert_tp(partials: torch.Tensor, plan: tuple, group) -> torch.Tensor:
    """Each etp rank's partial fc2 outputs [sum of N, h] (:func:`gather_for_expert_tp`'s order) -> this rank's
    N rows, the partials of its rows summed over the etp group in rank order."""
    _, input_splits, _ = plan                                                       # [N] x ETP
    returned = combine(partials, plan, group, kind="etp_all_to_all")               # [ETP N, h], by etp rank
    return returned.unflatten(0, (len(input_splits), input_splits[0])).sum(dim=0)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_along(x, 0, group, kind="ep_all_gather")

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along(grad, 0, ctx.group, kind="ep_reduce_scatter"), None


class _ReduceScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_along(x, 0, group, kind="ep_reduce_scatter")

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, 0, ctx.group, kind="ep_all_gather"), None


def gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """Every EP rank's ``x`` [T, ...] concatenated in rank order, [EP T, ...]; differentiable for floats."""
    if not x.is_floating_point():
        return all_gather_along(x, 0, group, kind="ep_all_gather")
    return _GatherTokens.apply(x, group)


def reduce_scatter_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """[EP T, ...] summed over the EP ranks, this rank's T rows kept; differentiable."""
    return _ReduceScatterTokens.apply(x, group)
