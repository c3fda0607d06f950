"""What the rest of megalite needs to know about a parameter, set once where the parameter is made.

A tensor-parallel model's parameters are not interchangeable: some are slices of a larger tensor,
some are replicated but see only a sequence shard, one may be a second copy of the word embedding.
Gradient reduction (``grads.py``), the grid-wide norm (``optim/clip_grads.py``), ZeRO-1's buckets
(``data_parallel.py``), initialization (``layers.py``) and checkpoints all ask the same questions,
so the answers live in one frozen :class:`ParamInfo` per parameter, read through :func:`param_info`.
A parameter nobody described (a plain ``nn.Linear`` in a test) is full, replicated and unshared.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

__all__ = ["Init", "ParamInfo", "param_info", "set_param_info", "mark_shared_embedding", "local_shape",
           "keep_local_shape"]

_ATTRIBUTE = "_megalite_param_info"
_SHAPE = "_megalite_local_shape"


@dataclass(frozen=True)
class Init:
    """How the FULL (unpartitioned) tensor of a parameter is drawn.

    ``kind``: "normal" (mean 0, ``std``), "zeros" or "ones".  ``real_rows``: rows from this index on
    are vocabulary padding, left at zero, so the real rows do not depend on how much padding TP adds.
    """

    kind: str
    std: float = 0.0
    real_rows: Optional[int] = None

    def full_tensor(self, shape, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "zeros":
            return torch.zeros(shape)
        if self.kind == "ones":
            return torch.ones(shape)
        rows = shape[0] if self.real_rows is None else self.real_rows
        full = torch.zeros(shape)
        full[:rows] = torch.randn((rows,) + tuple(shape[1:]), generator=generator) * self.std
        return full


@dataclass(frozen=True)
class ParamInfo:
    """A parameter's place in the parallel model.

    ``partition_dim``: the dim split over TP ranks (None: replicated over TP).
    ``sequence_parallel``: replicated over TP but fed ``s/t`` tokens under sequence parallelism, so
    its gradient is a partial sum over the TP group (Korthikanti et al. 2022, Sec. 4.2.2); also set,
    with or without SP, on the per-head query/key norms (--qk-layernorm), which see only this rank's heads.
    ``shared_embedding``: one of the two copies of the tied word embedding (first and last pipeline
    stage); their gradients are summed over the embedding group.
    ``init``: how the full tensor is drawn (None: nobody initializes it from the seed).
    ``expert_parallel``: the experts' stacked weights, dim 0 split over the expert-parallel group (each rank
    holds E / EP experts; megalite/parallel/state.py); gradients reduced over the expert-data-parallel group.
    With ``partition_dim`` too (expert tensor parallelism, ETP = TP) that dim, the ffn, is split over the
    expert-TP group: each rank holds f / ETP of every one of its experts.
    """

    partition_dim: Optional[int] = None
    sequence_parallel: bool = False
    shared_embedding: bool = False
    init: Optional[Init] = None
    expert_parallel: bool = False

    @property
    def tensor_parallel(self) -> bool:
        return self.partition_dim is not None


_UNDESCRIBED = ParamInfo()


def param_info(param: torch.Tensor) -> ParamInfo:
    """The parameter's :class:`ParamInfo` (full, replicated and unshared if none was set)."""
    return getattr(param, _ATTRIBUTE, _UNDESCRIBED)


def set_param_info(param: nn.Parameter, info: ParamInfo) -> nn.Parameter:
    setattr(param, _ATTRIBUTE, info)
    return param


def mark_shared_embedding(param: nn.Parameter) -> None:
    """Record that ``param`` is a copy of the tied word embedding (see :class:`ParamInfo`)."""
    set_param_info(param, replace(param_info(param), shared_embedding=True))


def keep_local_shape(param: nn.Parameter) -> None:
    """Remember the parameter's shape before ZeRO-3 drops it to an empty tensor (parallel/grad_buffer.py)."""
    setattr(param, _SHAPE, param.shape)


def local_shape(param: torch.Tensor) -> torch.Size:
    """This rank's shape of the parameter (its TP shard), also while ZeRO-3 holds it dropped."""
    return getattr(param, _SHAPE, param.shape)
