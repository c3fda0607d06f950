"""Autograd pairs that move activations between the ranks of a tensor-parallel (TP) group.

Each pair is named for what its *forward* does and is defined with its backward beside it; the
backward is always the transpose (adjoint) of the forward, which is what makes a TP model's
gradients equal the single-rank model's.  With ``t`` ranks in the group:

    pair                    forward                            backward
    copy_to_tp              identity                           all-reduce
    reduce_from_tp          all-reduce                         identity
    scatter_to_tp           keep my slice of the last dim      all-gather the last dim
    gather_from_tp          all-gather the last dim            keep my slice of the last dim
    scatter_to_sp           keep my slice of dim 0 (tokens)    all-gather dim 0
    gather_from_sp          all-gather dim 0                   keep my slice of dim 0
    all_gather_from_sp      all-gather dim 0                   reduce-scatter dim 0
    reduce_scatter_to_sp    reduce-scatter dim 0               all-gather dim 0

(Megatron-LM's ``mappings.py`` holds the same algebra; Korthikanti et al. 2022, Sec. 4.2.2, for
the sequence-parallel pairs.)  Without a process grid, or with ``t == 1``, every pair is the identity.

Bytes sent are counted in :data:`comm_counter` under the ring-algorithm cost model that the
scaling literature uses: for a collective whose full tensor has ``N`` bytes, each rank sends
``2 (t-1)/t N`` for an all-reduce and ``(t-1)/t N`` for an all-gather or a reduce-scatter.  So an
all-reduce costs exactly one reduce-scatter plus one all-gather, which is why sequence parallelism
moves the same volume as plain TP.  (The sequence-parallel linear layer's backward re-gather of its
input, layers.py, is counted apart as ``all_gather_regather``.)
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from megalite.parallel import state
from megalite.parallel.collectives import all_gather_into, reduce_scatter_into


class CommCounter:
    """Bytes this rank sent (ring cost model) and calls made, per kind of collective."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)

    def add(self, kind: str, full_bytes: int, group_size: int) -> None:
        share = (group_size - 1) / group_size
        # all_reduce = reduce-scatter + all-gather: twice the bytes of either.
        self.bytes[kind] += int(round((2 * share if kind == "all_reduce" else share) * full_bytes))
        self.calls[kind] += 1

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


comm_counter = CommCounter()


# -- the raw collectives (no autograd), each counted ------------------------------------------------
def tp_group():
    """The TP process group, or None when there is no grid (one process: TP size 1)."""
    return state.get_grid().tp_group if state.grid_is_initialized() else None


def tp_size(group=None) -> int:
    """Ranks in ``group`` (default: the TP group); 1 without a grid."""
    group = group if group is not None else tp_group()
    return 1 if group is None else dist.get_world_size(group)


def tp_rank(group=None) -> int:
    """This rank's index in ``group`` (default: the TP group); 0 without a grid."""
    group = group if group is not None else tp_group()
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or ``op``) of ``x`` over the group, in place on a contiguous copy; returns it."""
    size = tp_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    comm_counter.add("all_reduce", x.numel() * x.element_size(), size)
    dist.all_reduce(x, op=op, group=group if group is not None else tp_group())
    return x


def all_gather_along(x: torch.Tensor, dim: int, group=None, kind: str = "all_gather") -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``; counted under ``kind``."""
    size = tp_size(group)
    if size == 1:
        return x
    # The collective gathers along dim 0; move ``dim`` there and back.
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * x.shape[0],) + x.shape[1:], dtype=x.dtype, device=x.device)
    comm_counter.add(kind, out.numel() * out.element_size(), size)
    all_gather_into(out, x, group=group if group is not None else tp_group())
    return out.movedim(0, dim)


def reduce_scatter_along(x: torch.Tensor, dim: int, group=None, kind: str = "reduce_scatter") -> torch.Tensor:
    """Sum ``x`` over the ranks and keep this rank's slice of ``dim``; counted under ``kind``."""
    size = tp_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"reduce-scatter of a tensor of shape {tuple(x.shape)} along dim {dim}: "
                         f"{x.shape[dim]} is not divisible by the group size {size}")
    x = x.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // size,) + x.shape[1:], dtype=x.dtype, device=x.device)
    comm_counter.add(kind, x.numel() * x.element_size(), size)
    reduce_scatter_into(out, x, group=group if group is not None else tp_group())
    return out.movedim(0, dim)


def split_along(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's slice of ``dim`` (no communication)."""
    size, rank = tp_size(group), tp_rank(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of a tensor of shape {tuple(x.shape)} over {size} TP ranks; "
                         f"{x.shape[dim]} is not divisible by {size}")
    return x.chunk(size, dim)[rank].contiguous()


# -- the autograd pairs -----------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """y = x on every rank  =>  dL/dx = sum_r dL/dy_r (each rank's consumer saw a different slice)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone())


class _ReduceFromTP(torch.autograd.Function):
    """y = sum_r x_r  =>  dL/dx_r = dL/dy (the same on every rank)."""

    @staticmethod
    def forward(ctx, x):
        return all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToTP(torch.autograd.Function):
    """y_r = x[..., slice r]  =>  dL/dx = concat_r dL/dy_r along the last dim."""

    @staticmethod
    def forward(ctx, x):
        return split_along(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, -1)


class _GatherFromTP(torch.autograd.Function):
    """y = concat_r x_r along the last dim  =>  dL/dx_r = dL/dy[..., slice r]."""

    @staticmethod
    def forward(ctx, x):
        return all_gather_along(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, -1)


class _ScatterToSP(torch.autograd.Function):
    """y_r = x[tokens of r]  =>  dL/dx = concat_r dL/dy_r along dim 0."""

    @staticmethod
    def forward(ctx, x):
        return split_along(x, 0)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, 0)


class _GatherFromSP(torch.autograd.Function):
    """y = concat_r x_r along dim 0, consumed identically on every rank  =>  dL/dx_r = dL/dy[tokens of r]."""

    @staticmethod
    def forward(ctx, x):
        return all_gather_along(x, 0)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, 0)


class _AllGatherFromSP(torch.autograd.Function):
    """y = concat_r x_r along dim 0, consumed by a TP-split layer (each rank's dL/dy is partial)
    =>  dL/dx_r = (sum_q dL/dy_q)[tokens of r]: a reduce-scatter (Korthikanti et al. 2022, Fig. 5 "g")."""

    @staticmethod
    def forward(ctx, x):
        return all_gather_along(x, 0)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along(grad, 0)


class _ReduceScatterToSP(torch.autograd.Function):
    """y_r = (sum_q x_q)[tokens of r]  =>  dL/dx_q = concat_r dL/dy_r: an all-gather ("g-bar")."""

    @staticmethod
    def forward(ctx, x):
        return reduce_scatter_along(x, 0)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, 0)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Enter a TP region with a replicated input. x: [..., h] (same on every rank).

    TP size 1: x itself (the pair's backward would copy the gradient only to sum it over one rank)."""
    return _CopyToTP.apply(x) if tp_size() > 1 else x


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """Leave a TP region by summing partial results. x: [..., h] partial -> [..., h] full.

    TP size 1: x itself (the sum over one rank is x; the pair would copy it first)."""
    return _ReduceFromTP.apply(x) if tp_size() > 1 else x


def scatter_to_tp(x: torch.Tensor) -> torch.Tensor:
    """x: [..., h] replicated -> [..., h/tp] this rank's slice."""
    return _ScatterToTP.apply(x)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    """x: [..., h/tp] -> [..., h] concatenated over TP ranks."""
    return _GatherFromTP.apply(x)


def scatter_to_sp(x: torch.Tensor) -> torch.Tensor:
    """x: [s, b, h] replicated -> [s/tp, b, h] this rank's tokens."""
    return _ScatterToSP.apply(x)


def gather_from_sp(x: torch.Tensor) -> torch.Tensor:
    """x: [s/tp, b, h] -> [s, b, h], for a consumer that is replicated over TP."""
    return _GatherFromSP.apply(x)


def all_gather_from_sp(x: torch.Tensor) -> torch.Tensor:
    """x: [s/tp, b, h] -> [s, b, h], for a consumer that is split over TP (a column-parallel layer)."""
    return _AllGatherFromSP.apply(x)


def reduce_scatter_to_sp(x: torch.Tensor) -> torch.Tensor:
    """x: [s, b, h] partial sums -> [s/tp, b, h] this rank's tokens of the sum."""
    return _ReduceScatterToSP.apply(x)
