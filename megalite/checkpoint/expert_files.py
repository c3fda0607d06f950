"""The experts' files of a checkpoint saved under expert parallelism (EP > 1).

Under EP the ranks of one TP x CP x DP group hold different experts: EP rank r holds experts
``[r E/EP, (r+1) E/EP)`` of every MoE layer's stacked weights (parallel/state.py), the same ones as the
other ranks of its expert-data-parallel group.  At expert TP 1 experts are not split over TP, so each EP
rank's experts are saved once per pipeline stage, by the first rank of its expert-DP group (the stage's r-th
rank, whose TP coordinate is r mod TP); under expert TP = TP each (EP rank, ffn slice) is, by the first rank of
its expert-DP group, whose TP coordinate is its expert-TP one (the fc2 biases, whole on every expert-TP rank and
kept equal, are indexed from each).  That rank saves them in its
``model_optim_rng.pt`` when it writes one (DP rank 0 of CP rank 0: EP rank 0, and at expert TP 1 under TP every
EP rank r < TP), otherwise (and, without ZeRO-1, with their Adam moments and fp32
masters) in its (TP, PP) folder beside that file::

    mp_rank_{tp:02d}_{pp:03d}/experts_ep{r:03d}.pt    {"model" or "model{i}": {local name: this EP rank's
                                                       stacked expert weights},
                                                       "optimizer": {"pieces": {piece number: moments,
                                                       master}}}   (the optimizer only without ZeRO-1)

Only that copy is named in the tensor index; the ``model_optim_rng.pt`` of a TP folder written by another
rank holds the same experts again, for a resume at the saved layout, which reads its own folder's files:
with TP dividing EP or EP dividing TP (config/moe_settings.py refuses the rest), an EP rank's experts lie in
its own folder, in its model file when ``ep_rank == tp_rank mod EP``, otherwise in its experts file.
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

__all__ = ["experts_file", "writes_experts", "indexes_model_experts", "reads_experts", "experts_state",
           "describe_experts", "merge_experts"]


def experts_file(ep_rank: int) -> str:
    return f"experts_ep{ep_rank:03d}.pt"


def writes_experts(grid) -> bool:
    """Whether this rank writes its EP rank's experts file: the first rank of its expert-DP group, when it
    writes no ``model_optim_rng.pt`` (module docstring)."""
    return grid.ep_size > 1 and grid.ranks["edp"][0] == grid.rank and not _writes_model_file(grid)


def indexes_model_experts(grid) -> bool:
    """Whether the experts in this rank's ``model_optim_rng.pt`` are the ones named in the tensor index."""
    return grid.ep_size == 1 or grid.ranks["edp"][0] == grid.rank


def reads_experts(grid) -> Optional[str]:
    """The experts file a rank loads at the saved layout: None where its folder's model file holds its
    EP rank's experts (EP rank ``(tp_rank // ETP) mod EP``, written by the stage's rank ``tp_rank``; under expert
    TP = TP always EP rank 0, of this rank's ffn slice) and without EP."""
    if grid.ep_size == 1 or grid.ep_rank == (grid.tp_rank // getattr(grid, "etp_size", 1)) % grid.ep_size:
        return None
    return experts_file(grid.ep_rank)


def _writes_model_file(grid) -> bool:
    return grid.dp_rank == 0 and grid.cp_rank == 0


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

