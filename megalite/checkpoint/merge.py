"""One process's view of a checkpoint of any TP x PP x EP x ZeRO-1 layout: the full (TP=1, one-stage) state
dict, for generation and Hugging Face export.

The files are read through reader.py (the manifest required, each file verified before it is read),
and the tensors are assembled from the iteration's tensor index with the same element arithmetic
that resharding uses (index.py): each logical parameter is one target slice covering the whole TP=1
tensor, filled from the saved slices, whatever layout wrote them.  The vocabulary rows beyond a TP=1
model's padding are dropped, as a reshard to one rank would.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import torch

from megalite.checkpoint.index import VOCAB_ROWS, WORD_EMBEDDING, Slice, fill_slice
from megalite.checkpoint.manifest import CheckpointError
from megalite.checkpoint.paths import TENSOR_INDEX
from megalite.checkpoint.reader import CheckpointReader, SliceValues
from megalite.config.settings import ModelConfig
from megalite.model.gpt import GPTModel

__all__ = ["merge_checkpoint", "load_model"]

OUTPUT_LAYER = "output_layer.weight"


def merge_checkpoint(root: str, iteration: Optional[int] = None):
    """The full model's state dict and the run's settings, from every shard of a checkpoint."""
    reader = CheckpointReader(root, iteration)
    index = reader.load(TENSOR_INDEX)
    params = defaultdict(list)
    for part in map(Slice.from_saved, index["slices"]):
        if part.kind == "param":
            params[part.name].append(part)
    if not params:
        raise ValueError(f"{reader.folder}: its tensor index lists no model parameters; it was not saved by "
                         f"megalite-train")
    read = SliceValues(lambda relative: reader.load(relative, mmap=True))
    # The settings are in a model_optim_rng.pt (an experts file of EP > 1 holds only expert tensors).
    first = next((part.file for parts in params.values() for part in parts if part.file.endswith("model_optim_rng.pt")),
                 params[next(iter(params))][0].file)
    settings = read.open(first).get("settings") or {}
    if not isinstance(settings.get("model"), dict):
        raise CheckpointError(f"{reader.path(first)} holds no model settings; it was not saved by megalite-train")
    try:
        rows = ModelConfig.from_saved(settings["model"]).padded_vocab_size(1)
    except TypeError as error:      # a field this megalite does not know
        raise CheckpointError(f"{reader.path(first)}: its model settings do not fit this megalite ({error})") from None

    merged = {}
    for name, sources in sorted(params.items()):
        shape = list(sources[0].shape)
        if name in VOCAB_ROWS:
            shape[0] = rows
        target = Slice(name=name, kind="param", shape=shape, dim=None, offset=0, local_shape=shape, start=0,
                       end=math.prod(shape))
        out = torch.empty(target.end, dtype=read(sources[0]).dtype)
        fill_slice(out, target, sources, read)
        merged[name] = out.view(shape)
    if not ModelConfig.from_saved(settings["model"]).untie_embeddings_and_output_weights:
        merged[OUTPUT_LAYER] = merged[WORD_EMBEDDING]   # the tied copy: one logical tensor in the index
    return merged, settings


def load_model(root: str, iteration: Optional[int] = None, device: str = "cpu"):
    """(model, settings): a TP=1, one-stage GPTModel holding the checkpoint's weights, in eval mode."""
    state, settings = merge_checkpoint(root, iteration)
    config = ModelConfig.from_saved(settings["model"], checkpoint_activations=False, recompute_granularity=None,
                                    recompute_method=None, recompute_num_layers=None)
    model = GPTModel(config, pre_process=True, post_process=True, layer_numbers=list(range(config.num_layers)))
    # The last stage's copy of a tied embedding duplicates the first stage's word embedding.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {root} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), settings
