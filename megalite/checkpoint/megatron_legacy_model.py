"""The state dict of Megatron-LM's GPT model before megatron-core (``--use-legacy-models``): the layout
that older Megatron-LM releases wrote and that transformers' ``convert_megatron_gpt2_checkpoint.py``
reads (docs/megatron.md).  Tensors and their TP shards are megatron-core's (the fused QKV per query
group, SwiGLU's [gate_r; up_r], the same split dims); only the names and the nesting differ::

    model["language_model"]["embedding"]["word_embeddings"]["weight"]
    model["language_model"]["embedding"]["position_embeddings"]["weight"]
    model["language_model"]["encoder"]["layers.N.self_attention.query_key_value.weight"], ...,
                                      ["final_layernorm.weight"]
    model["language_model"]["output_layer"]["weight"]             (untied output layer)
    model["word_embeddings_for_head"]["weight"]                    (tied, on the last of several stages)

The layer-norm names are those the legacy model saved before it renamed them to ``input_norm`` /
``post_attention_norm`` / ``final_norm``: the names transformers' converter recognizes.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["to_legacy_model", "from_legacy_model", "is_legacy_model"]

Tensors = Dict[str, torch.Tensor]
# megatron-core local-spec name inside decoder.layers.N -> the legacy model's name inside layers.N
_LAYER_NAMES = (("self_attention.linear_qkv.", "self_attention.query_key_value."),
                ("self_attention.linear_proj.", "self_attention.dense."),
                ("pre_mlp_layernorm.", "post_attention_layernorm."),
                ("input_layernorm.", "input_layernorm."),
                ("mlp.linear_fc1.", "mlp.dense_h_to_4h."),
                ("mlp.linear_fc2.", "mlp.dense_4h_to_h."))
_EMBEDDINGS = ("word_embeddings", "position_embeddings")
_LAYERS, _FINAL = "decoder.layers.", "decoder.final_layernorm."


def is_legacy_model(model: dict) -> bool:
    return "language_model" in model


def to_legacy_model(model: Tensors, tied: bool) -> dict:
    """One rank's megatron-core (local spec) state dict in the legacy model's nested layout; ``tied``: the
    output layer shares the word embedding (a last stage's ``output_layer.weight`` is then its copy)."""
    language_model: dict = {}
    encoder: Dict[str, torch.Tensor] = {}
    out: dict = {"language_model": language_model}
    for name, tensor in model.items():
        if name.endswith("_extra_state"):
            continue                                       # the legacy model keeps no extra state
        if name.startswith(_LAYERS):
            encoder["layers." + _legacy_layer_name(name[len(_LAYERS):])] = tensor
        elif name.startswith(_FINAL):
            encoder["final_layernorm." + name[len(_FINAL):]] = tensor
        elif name.startswith("embedding."):
            table, leaf = name[len("embedding."):].split(".")
            language_model.setdefault("embedding", {}).setdefault(table, {})[leaf] = tensor
        elif name == "output_layer.weight" and tied:
            out["word_embeddings_for_head"] = {"weight": tensor}
        elif name == "output_layer.weight":
            language_model["output_layer"] = {"weight": tensor}
        else:
            raise ValueError(f"{name}: the legacy Megatron GPT model has no place for it")
    if encoder:
        language_model["encoder"] = encoder
    return out


def _legacy_layer_name(rest: str) -> str:
    layer, _, inner = rest.partition(".")
    for core, legacy in _LAYER_NAMES:
        if inner.startswith(core):
            return f"{layer}.{legacy}{inner[len(core):]}"
    raise ValueError(f"decoder.layers.{rest}: the legacy Megatron GPT model has no such tensor (q/k layer norms, "
                     f"Transformer Engine names and experts are megatron-core's only)")


def from_legacy_model(model: dict, tied: bool) -> Tensors:
    """One rank's legacy nested state dict with megatron-core's local-spec names (the tied output copy,
    ``word_embeddings_for_head``, as ``output_layer.weight``)."""
    language_model = model["language_model"]
    out: Tensors = {}
    for table in _EMBEDDINGS:
        for leaf, tensor in language_model.get("embedding", {}).get(table, {}).items():
            out[f"embedding.{table}.{leaf}"] = tensor
    encoder = language_model.get("encoder", language_model.get("transformer", {}))
    for name, tensor in encoder.items():
        if name.startswith("final_layernorm.") or name.startswith("final_norm."):
            out[_FINAL + name.split(".", 1)[1]] = tensor
        elif name.startswith("layers."):
            layer, _, inner = name[len("layers."):].partition(".")
            inner = inner.replace("input_norm.", "input_layernorm.").replace("post_attention_norm.",
                                                                             "post_attention_layernorm.")
            for core, legacy in _LAYER_NAMES:
                if inner.startswith(legacy):
                    inner = core + inner[len(legacy):]
                    break
            out[f"{_LAYERS}{layer}.{inner}"] = tensor
    if "output_layer" in language_model:
        out["output_layer.weight"] = language_model["output_layer"]["weight"]
    elif tied and "word_embeddings_for_head" in model:
        out["output_layer.weight"] = model["word_embeddings_for_head"]["weight"]
    return out
