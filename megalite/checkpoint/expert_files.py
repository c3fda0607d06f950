"""The experts' files of a checkpoint saved under expert parallelism (EP > 1).

Under EP the ranks of one TP x CP x DP group hold different experts: EP rank r holds experts
``[r E/EP, (r+1) E/EP)`` of every MoE layer's stacked weights (parallel/state.py), the same ones as the
other ranks of its expert-data-parallel group.  ``model_optim_rng.pt`` is written by DP rank 0 of CP rank 0,
which is EP rank 0, so it holds EP rank 0's experts; every other EP rank's experts (and, without ZeRO-1,
their Adam moments and fp32 masters) are written beside it, in Megatron's (TP, PP) folder, by the first rank
of that EP rank's expert-data-parallel group::

    mp_rank_{tp:02d}_{pp:03d}/experts_ep{r:03d}.pt    {"model" or "model{i}": {local name: this EP rank's
                                                       stacked expert weights},
                                                       "optimizer": {"pieces": {piece number: moments,
                                                       master}}}   (the optimizer only without ZeRO-1)

Under ZeRO-1 every rank's optimizer file already holds its own pieces, expert ones included (sharded over
the expert-DP group).  The tensor index (index.py) names each of these tensors as a box of the global
``[E, ...]`` stack along dim 0, so a checkpoint of any EP loads at any other (reshard.py); at the saved layout
:func:`merge_experts` lays the file over ``model_optim_rng.pt``'s state before it is loaded.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from megalite.checkpoint.index import Place, Slice, describe_model, describe_optimizer, is_expert_shard
from megalite.parallel.data_parallel import unwrap_model

__all__ = ["experts_file", "writes_experts", "reads_experts", "experts_state", "describe_experts", "merge_experts"]


def experts_file(ep_rank: int) -> str:
    return f"experts_ep{ep_rank:03d}.pt"


def writes_experts(grid) -> bool:
    """Whether this rank writes its EP rank's experts file: EP rank > 0, first rank of its expert-DP group."""
    return grid.ep_size > 1 and grid.ep_rank > 0 and grid.ranks["edp"][0] == grid.rank


def reads_experts(grid) -> Optional[str]:
    """The experts file a rank loads at the saved layout (None for EP rank 0 and without EP)."""
    return experts_file(grid.ep_rank) if grid.ep_size > 1 and grid.ep_rank > 0 else None


def _key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def experts_state(model_chunks: Sequence[torch.nn.Module], optimizer, place: Place, sharded_optimizer) -> dict:
    """What this rank's experts file holds (the module docstring)."""
    state = {}
    for i, chunk in enumerate(model_chunks):
        state[_key(i, len(model_chunks))] = {
            name: tensor.detach().clone().cpu()       # a view of a DP buffer would save the whole buffer
            for name, tensor in unwrap_model(chunk).state_dict(keep_vars=True).items()
            if is_expert_shard(tensor, place)}
    if optimizer is not None and not sharded_optimizer:
        saved = optimizer.state_dict()["pieces"]
        state["optimizer"] = {"pieces": {i: saved[i] for i, piece in enumerate(optimizer.all_pieces())
                                         if is_expert_shard(piece.param, place)}}
    return state


def describe_experts(model_chunks, optimizer, names, layer_numbers, place: Place, file: str,
                     sharded_optimizer) -> List[Slice]:
    """The slices of the tensors :func:`experts_state` wrote into ``file``."""
    expert = lambda tensor: is_expert_shard(tensor, place)   # noqa: E731
    slices = describe_model(model_chunks, layer_numbers, place, file, keep=expert)
    if optimizer is not None and not sharded_optimizer:
        slices += describe_optimizer(optimizer, names, place, file, root=["optimizer"], keep=expert)
    return slices


def merge_experts(state: dict, experts: dict, num_chunks: int) -> None:
    """Lay an experts file over a loaded ``model_optim_rng.pt`` state: this EP rank's experts replace EP rank
    0's, in the chunks and (saved without ZeRO-1) in the optimizer's pieces."""
    for i in range(num_chunks):
        state[_key(i, num_chunks)].update(experts[_key(i, num_chunks)])
    if "optimizer" in state and "optimizer" in experts:
        for i, piece in experts["optimizer"]["pieces"].items():
            state["optimizer"]["pieces"][i] = piece

