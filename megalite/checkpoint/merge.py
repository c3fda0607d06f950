"""One process's view of a checkpoint of any TP x PP layout: the full (TP=1, one-stage) state dict,
for generation and Hugging Face export.

Tensor-parallel shards are concatenated along each parameter's partition dimension (stored in the
checkpoint): initialization and training keep every shard the exact slice of the full weight, so
the concatenation is the TP=1 parameter.  Pipeline stages hold disjoint layers, each under its
global layer number.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

import torch

from megalite.checkpoint import save_load as checkpoint
from megalite.checkpoint.index import VOCAB_ROWS
from megalite.config.settings import ModelConfig
from megalite.model.gpt import GPTModel

__all__ = ["merge_checkpoint", "load_model"]

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def _globalize(name: str, layer_numbers: Optional[List[int]]) -> str:
    """Rename a chunk-local layer index to its global number (a no-op when the model names layers globally)."""
    if layer_numbers is None:
        return name
    match = _LAYER.search(name)
    if match is None:
        return name
    local = int(match.group(2))
    if local >= len(layer_numbers) or layer_numbers == list(range(len(layer_numbers))):
        return name
    return name[:match.start(2)] + str(layer_numbers[local]) + name[match.end(2):]


def merge_checkpoint(root: str, iteration: Optional[int] = None):
    """The full model's state dict and the run's settings, from every (tp, pp) shard of a checkpoint."""
    iteration = checkpoint.read_latest_iteration(root) if iteration is None else iteration
    if iteration is None:
        raise FileNotFoundError(f"no {checkpoint.TRACKER_FILE} under {root}; train with --save {root} first")
    folder = checkpoint.iteration_dir(root, iteration)
    shards = sorted(d for d in os.listdir(folder) if d.startswith("mp_rank_"))
    by_name: Dict[str, Dict[int, torch.Tensor]] = {}
    dims: Dict[str, Optional[int]] = {}
    settings = None
    for shard in shards:
        tp_rank = int(shard.split("_")[2])
        state = torch.load(os.path.join(folder, shard, "model_optim_rng.pt"), map_location="cpu", weights_only=True)
        settings = state["settings"]
        chunk_keys = sorted((k for k in state if re.fullmatch(r"model\d*", k)), key=lambda k: int(k[5:] or 0))
        for index, key in enumerate(chunk_keys):
            layer_numbers = state["layer_numbers"][index] if state.get("layer_numbers") else None
            partition = state["partition_dims"][index]
            for name, tensor in state[key].items():
                full_name = _globalize(name, layer_numbers)
                by_name.setdefault(full_name, {})[tp_rank] = tensor
                dims[full_name] = partition.get(name)
    merged = {}
    for name, parts in by_name.items():
        ordered = [parts[r] for r in sorted(parts)]
        dim = dims.get(name)
        merged[name] = torch.cat(ordered, dim=dim) if dim is not None and len(ordered) > 1 else ordered[0]
    # The vocabulary is padded to a multiple of make_vocab_size_divisible_by x TP, so a TP=2 run has
    # more (all-zero) padding rows than the one-rank model: keep the rows a TP=1 model has.
    rows = ModelConfig.from_saved(settings["model"]).padded_vocab_size(1)
    for name, tensor in merged.items():
        if name.endswith(VOCAB_ROWS) and tensor.shape[0] != rows:
            merged[name] = tensor[:rows].clone()
    return merged, settings


def load_model(root: str, iteration: Optional[int] = None, device: str = "cpu"):
    """(model, settings): a TP=1, one-stage GPTModel holding the checkpoint's weights, in eval mode."""
    state, settings = merge_checkpoint(root, iteration)
    config = ModelConfig.from_saved(settings["model"], recompute_granularity=None, recompute_method=None,
                                    recompute_num_layers=None)
    model = GPTModel(config, pre_process=True, post_process=True, layer_numbers=list(range(config.num_layers)))
    # The last stage's copy of a tied embedding duplicates the first stage's word embedding.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {root} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), settings
