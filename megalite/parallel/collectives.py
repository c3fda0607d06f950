"""The two tensor collectives whose names changed across torch releases, behind one name each.

torch 2.13 renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to ``all_gather_single``
/ ``reduce_scatter_single`` and deprecated the old names; the old names are all that older
releases have (down to the floor declared in pyproject.toml).  Everything in megalite calls these
two functions, never the torch names directly.

    all_gather_into(out, x, group)        out = cat over ranks of x (along dim 0)
    reduce_scatter_into(out, x, group)    out = this rank's dim-0 slice of sum over ranks of x
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_into", "reduce_scatter_into"]

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group=None, async_op: bool = False):
    """``out: [world * n, ...]`` gets every rank's ``x: [n, ...]`` in rank order."""
    return _all_gather(out, x, group=group, async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group=None, async_op: bool = False):
    """``out: [n, ...]`` gets this rank's slice of the sum over ranks of ``x: [world * n, ...]``."""
    return _reduce_scatter(out, x, group=group, async_op=async_op)
