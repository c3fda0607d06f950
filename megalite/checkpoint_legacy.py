"""The tensor index of a checkpoint saved before tensor indexes existed, derived from its files.

Each ``mp_rank_TT_PPP/model_optim_rng.pt`` holds what the index needs for the model: the layout and
the TP rank, every chunk's state dict, each parameter's partition dim and each chunk's global layer
numbers (``checkpoint.save_checkpoint``).  The DP size is the number of RNG files per CP rank.

The optimizer state of a run without ZeRO-1 (``optimizer`` inside the same file) is a list of whole
parameters in :class:`~megalite.optim.optimizer.MegaliteOptimizer`'s order: every chunk's
parameters in registration order (the partition-dim table's order; a tied embedding once), the
matrices first, then the 1-D parameters.  ZeRO-1 shards cannot be described from the files (their
ranges depend on the bucket layout of the run that wrote them), so such a checkpoint reshards its
weights only, and says how to bring the optimizer along.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

import torch

from megalite.checkpoint_index import global_name, logical_box
from megalite.checkpoint_manifest import verify_file

__all__ = ["legacy_layout", "legacy_index"]

_RNG = re.compile(r"^rng_dp(\d{3})_cp000\.pt$")
_OPTIMIZER_SHARD = re.compile(r"^optimizer_dp\d{3}_cp\d{3}\.pt$")


def _chunk_keys(state: dict) -> List[str]:
    return sorted((k for k in state if re.fullmatch(r"model\d*", k)), key=lambda k: int(k[5:] or 0))


def _shards(iteration_folder: str) -> List[str]:
    shards = sorted(d for d in os.listdir(iteration_folder) if d.startswith("mp_rank_"))
    if not shards:
        raise ValueError(f"{iteration_folder} holds no mp_rank_* folder; it is not a megalite checkpoint")
    return shards


def legacy_layout(iteration_folder: str, manifest: Optional[dict]) -> dict:
    """The layout that wrote the checkpoint (``checkpoint.saved_layout``'s keys), from its first shard."""
    first_shard = _shards(iteration_folder)[0]
    relative = os.path.join(first_shard, "model_optim_rng.pt")
    layout = torch.load(verify_file(iteration_folder, relative, manifest), map_location="cpu", weights_only=True,
                        mmap=True)["layout"]
    names = os.listdir(os.path.join(iteration_folder, first_shard))
    return {"tp": layout["tp"], "pp": layout["pp"], "vpp": layout.get("vpp", 1), "cp": layout.get("cp", 1),
            "dp": len([n for n in names if _RNG.match(n)]), "zero1": any(_OPTIMIZER_SHARD.match(n) for n in names)}


def legacy_index(iteration_folder: str, manifest: Optional[dict], layout: dict) -> dict:
    """The index ``checkpoint.save_checkpoint`` would have written (checkpoint_index.py), from the files
    and their ``legacy_layout``."""
    slices, optimizer, first = [], None, None
    for shard in _shards(iteration_folder):
        relative = os.path.join(shard, "model_optim_rng.pt")
        state = torch.load(verify_file(iteration_folder, relative, manifest), map_location="cpu", weights_only=True,
                           mmap=True)
        first = first or state
        shard_layout = state["layout"]     # this file's TP rank
        tied = not state["settings"].get("model", {}).get("untie_embeddings_and_output_weights", False)
        params = []   # (global name, local shape, partition dim), the optimizer's order
        for index, key in enumerate(_chunk_keys(state)):
            dims = state["partition_dims"][index]
            numbers = (state.get("layer_numbers") or [None] * (index + 1))[index]
            if numbers is None:
                raise ValueError(f"{relative} names no global layer numbers; it predates resharding, load it at "
                                 f"its own layout")
            for name, tensor in state[key].items():
                tied_copy = tied and name.endswith(("word_embeddings.weight", "output_layer.weight"))
                dim = dims.get(name, 0 if tied_copy else None)    # PP=1: the tied output is not listed
                logical = global_name(name, numbers, tied_copy)
                slices.append(dict(name=logical, kind="param", **logical_box(tensor, dim, shard_layout["tp_rank"],
                                                                             shard_layout["tp"]),
                                   start=0, end=tensor.numel(), file=relative, where=[key, name]))
                if name in dims:
                    params.append((logical, tensor, dim))
        if "optimizer" in state:
            optimizer = {k: v for k, v in state["optimizer"].items() if k != "pieces"}
            ordered = [p for p in params if p[1].dim() > 1] + [p for p in params if p[1].dim() <= 1]
            pieces = state["optimizer"]["pieces"]
            if len(pieces) != len(ordered):
                raise ValueError(f"{relative}: {len(pieces)} optimizer pieces for {len(ordered)} parameters; it "
                                 f"cannot be resharded, load it at its own layout")
            for i, ((logical, tensor, dim), piece) in enumerate(zip(ordered, pieces)):
                for kind in ("exp_avg", "exp_avg_sq", "master"):
                    if kind in piece:
                        slices.append(dict(name=logical, kind=kind, **logical_box(tensor, dim, shard_layout["tp_rank"],
                                                                                  shard_layout["tp"]),
                                           start=0, end=tensor.numel(), file=relative,
                                           where=["optimizer", "pieces", i, kind]))
    return {"format": 0, "iteration": first["iteration"], "consumed_samples": first["consumed_samples"],
            "layout": layout, "scheduler": first.get("scheduler"), "optimizer": optimizer, "slices": slices,
            "no_optimizer_because": ("its ZeRO-1 shards were saved before tensor indexes; load it at its own "
                                     "layout and save again to reshard them") if layout["zero1"] else None}
