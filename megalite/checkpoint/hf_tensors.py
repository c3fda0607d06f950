"""Hugging Face tensors <-> megalite's single-rank state dict, for the families of ``hf_config.py``.

The conventions that differ between the two codebases:

- GPT-2's ``Conv1D`` stores weights as ``[in, out]``; megalite's linear layers as ``[out, in]``.
- megalite fuses Q, K and V (weights and biases) into one tensor laid out per query group,
  ``[q of its a/g heads | k | v]`` (``transformer.SelfAttention``); GPT-2 fuses them as
  ``[all q | all k | all v]``; GPT-NeoX per head, ``[q | k | v]``, which is megalite's layout with one
  head per group; the LLaMA family keeps three.
- megalite's SwiGLU fc1 interleaves rows ``(gate_0, up_0, gate_1, up_1, ...)``; the LLaMA family has
  ``gate_proj`` and ``up_proj``.
- RoPE: both use the "rotate half" pairing ``(x_i, x_{i+d/2})``, so q and k need no permutation.
- --apply-layernorm-1p stores gamma - 1; Hugging Face's norms store gamma.
- megalite pads the vocabulary; Hugging Face does not.

Import takes every tensor it reads from a :class:`TensorSource`; a tensor left over is refused by name.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch

from megalite.checkpoint.hf_moe import moe_layer_from_hf, moe_layer_to_hf
from megalite.config.model_settings import ModelConfig

__all__ = ["TensorSource", "to_hf_tensors", "from_hf_tensors", "IGNORED_BUFFER_SUFFIXES"]

Tensors = Dict[str, torch.Tensor]
# family: (word embedding, final norm, untied output layer), the tensors outside the layers.
ENDS = {"gpt2": ("transformer.wte.weight", "transformer.ln_f", "lm_head.weight"),
        "gpt_neox": ("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm", "embed_out.weight"),
        "llama": ("model.embed_tokens.weight", "model.norm", "lm_head.weight")}
# Buffers some saved models carry that megalite recomputes: GPT-2's causal mask and its fill value, a
# rotary embedding's inverse frequencies.  They hold no weights; anything else left over is refused.
IGNORED_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class TensorSource:
    """A Hugging Face state dict that records which tensors were taken."""

    def __init__(self, tensors: Tensors):
        self.tensors, self.taken = tensors, set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ValueError(f"the Hugging Face state dict has no tensor {name!r}, which this config needs")
        self.taken.add(name)
        return self.tensors[name]

    def check_all_taken(self) -> None:
        left = sorted(name for name in self.tensors if name not in self.taken
                      and not name.endswith(IGNORED_BUFFER_SUFFIXES))
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise ValueError(f"the Hugging Face state dict has tensors this config does not use: {shown}; "
                             f"megalite cannot convert it without dropping them")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Separate Q [a d, ...], K and V [g d, ...] -> megalite's fused [(a + 2g) d, ...], one block per group."""
    a, g, d = config.num_attention_heads, config.num_query_groups, config.head_dim
    rest = tuple(q.shape[1:])
    return torch.cat([q.reshape(g, a // g, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)],
                     1).reshape(-1, *rest)


def split_qkv(fused: torch.Tensor, config: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`fuse_qkv`."""
    a, g, d = config.num_attention_heads, config.num_query_groups, config.head_dim
    rest = tuple(fused.shape[1:])
    blocks = fused.reshape(g, a // g + 2, d, *rest)
    return (blocks[:, :a // g].reshape(a * d, *rest), blocks[:, a // g].reshape(g * d, *rest),
            blocks[:, a // g + 1].reshape(g * d, *rest))


def _llama_norm_names(config: ModelConfig):
    """(Hugging Face, megalite) names of a LLaMA-family layer's norms."""
    names = [("input_layernorm", "input_norm"), ("post_attention_layernorm", "pre_mlp_norm")]
    if config.qk_layernorm:
        names += [("self_attn.q_norm", "self_attention.q_layernorm"),
                  ("self_attn.k_norm", "self_attention.k_layernorm")]
    return names


def _norm_to_hf(weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    return weight + 1 if config.apply_layernorm_1p else weight


# -- export -----------------------------------------------------------------------------------------
def to_hf_tensors(state: Tensors, config: ModelConfig, family: str) -> Tensors:
    """The Hugging Face state dict of ``family`` equal to megalite's single-rank ``state``; a tied output
    layer is left out (transformers ties ``lm_head`` to the embedding itself)."""
    out: Tensors = {}
    for i in range(config.num_layers):
        layer = {name[len(f"decoder.layers.{i}."):]: tensor for name, tensor in state.items()
                 if name.startswith(f"decoder.layers.{i}.")}
        to_hf_layer = {"gpt2": _gpt2_layer_to_hf, "gpt_neox": _neox_layer_to_hf}.get(family, _llama_layer_to_hf)
        out.update(to_hf_layer(layer, config, i))
    words, norm, output = ENDS.get(family, ENDS["llama"])
    out[words] = state["embedding.word_embeddings.weight"][:config.vocab_size]
    out[norm + ".weight"] = _norm_to_hf(state["final_norm.weight"], config)
    if "final_norm.bias" in state:
        out[norm + ".bias"] = state["final_norm.bias"]
    if family == "gpt2":
        out["transformer.wpe.weight"] = state["embedding.position_embeddings.weight"]
    if config.untie_embeddings_and_output_weights:
        out[output] = state["output_layer.weight"][:config.vocab_size]
    return {name: tensor.float().contiguous().clone() for name, tensor in out.items()}


def _gpt2_layer_to_hf(layer: Tensors, config: ModelConfig, i: int) -> Tensors:
    p, out = f"transformer.h.{i}.", {}
    out[p + "attn.c_attn.weight"] = torch.cat(split_qkv(layer["self_attention.linear_qkv.weight"], config)).t()
    out[p + "attn.c_attn.bias"] = torch.cat(split_qkv(layer["self_attention.linear_qkv.bias"], config))
    for hf, ours in (("attn.c_proj", "self_attention.linear_proj"), ("mlp.c_fc", "mlp.linear_fc1"),
                     ("mlp.c_proj", "mlp.linear_fc2")):
        out[p + hf + ".weight"], out[p + hf + ".bias"] = layer[ours + ".weight"].t(), layer[ours + ".bias"]
    for hf, ours in (("ln_1", "input_norm"), ("ln_2", "pre_mlp_norm")):
        out[p + hf + ".weight"] = _norm_to_hf(layer[ours + ".weight"], config)
        out[p + hf + ".bias"] = layer[ours + ".bias"]
    return out


# GPT-NeoX's names of a layer's linear layers and norms (its fused QKV is megalite's, one head per group).
NEOX_NAMES = (("attention.query_key_value", "self_attention.linear_qkv"),
              ("attention.dense", "self_attention.linear_proj"),
              ("mlp.dense_h_to_4h", "mlp.linear_fc1"), ("mlp.dense_4h_to_h", "mlp.linear_fc2"))
NEOX_NORMS = (("input_layernorm", "input_norm"), ("post_attention_layernorm", "pre_mlp_norm"))


def _neox_layer_to_hf(layer: Tensors, config: ModelConfig, i: int) -> Tensors:
    p, out = f"gpt_neox.layers.{i}.", {}
    for hf, ours in NEOX_NAMES:
        out[p + hf + ".weight"], out[p + hf + ".bias"] = layer[ours + ".weight"], layer[ours + ".bias"]
    for hf, ours in NEOX_NORMS:
        out[p + hf + ".weight"] = _norm_to_hf(layer[ours + ".weight"], config)
        out[p + hf + ".bias"] = layer[ours + ".bias"]
    return out


def _llama_layer_to_hf(layer: Tensors, config: ModelConfig, i: int) -> Tensors:
    p, out = f"model.layers.{i}.", {}
    for kind in ("weight", "bias"):
        if f"self_attention.linear_qkv.{kind}" in layer:
            q, k, v = split_qkv(layer[f"self_attention.linear_qkv.{kind}"], config)
            out.update({p + f"self_attn.{x}_proj.{kind}": t for x, t in zip("qkv", (q, k, v))})
        if f"mlp.linear_fc1.{kind}" in layer:
            fc1 = layer[f"mlp.linear_fc1.{kind}"]
            out[p + f"mlp.gate_proj.{kind}"], out[p + f"mlp.up_proj.{kind}"] = fc1[0::2], fc1[1::2]
        for hf, ours in (("self_attn.o_proj", "self_attention.linear_proj"), ("mlp.down_proj", "mlp.linear_fc2")):
            if f"{ours}.{kind}" in layer:
                out[p + f"{hf}.{kind}"] = layer[f"{ours}.{kind}"]
    names = _llama_norm_names(config)
    for hf, ours in names:
        out[p + hf + ".weight"] = _norm_to_hf(layer[ours + ".weight"], config)
    if config.is_moe_layer(i):
        out.update(moe_layer_to_hf(layer, config, i))
    return out


# -- import -----------------------------------------------------------------------------------------
def from_hf_tensors(source: TensorSource, config: ModelConfig, family: str) -> Tensors:
    """megalite's single-rank state dict from a Hugging Face one; every tensor taken (or refused by name)."""
    ours: Tensors = {}
    for i in range(config.num_layers):
        from_hf_layer = {"gpt2": _gpt2_layer_from_hf, "gpt_neox": _neox_layer_from_hf}.get(family, _llama_layer_from_hf)
        layer = from_hf_layer(source, config, i)
        ours.update({f"decoder.layers.{i}.{name}": tensor for name, tensor in layer.items()})
    padding = config.padded_vocab_size(1) - config.vocab_size   # the rows of a TP=1 model

    def padded(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows.new_zeros(padding, rows.shape[1])])
    words_name, norm, output = ENDS.get(family, ENDS["llama"])
    words = source.take(words_name)
    ours["final_norm.weight"] = source.take(norm + ".weight")
    if config.normalization == "LayerNorm":
        ours["final_norm.bias"] = source.take(norm + ".bias")
    if family == "gpt2":
        ours["embedding.position_embeddings.weight"] = source.take("transformer.wpe.weight")
    ours["embedding.word_embeddings.weight"] = padded(words)
    if config.untie_embeddings_and_output_weights:
        ours["output_layer.weight"] = padded(source.take(output))
    else:
        if output in source and not torch.equal(source.take(output), words):
            raise ValueError(f"the Hugging Face config ties the output layer to the embedding (tie_word_embeddings) "
                             f"but {output} differs from it; megalite cannot convert it without dropping one")
        ours["output_layer.weight"] = ours["embedding.word_embeddings.weight"]
    source.check_all_taken()
    return {name: tensor.float().contiguous() for name, tensor in ours.items()}


def _gpt2_layer_from_hf(source: TensorSource, config: ModelConfig, i: int) -> Tensors:
    p, h, ours = f"transformer.h.{i}.", config.hidden_size, {}
    q, k, v = source.take(p + "attn.c_attn.weight").t().split(h)
    ours["self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, config)
    ours["self_attention.linear_qkv.bias"] = fuse_qkv(*source.take(p + "attn.c_attn.bias").split(h), config)
    for hf, name in (("attn.c_proj", "self_attention.linear_proj"), ("mlp.c_fc", "mlp.linear_fc1"),
                     ("mlp.c_proj", "mlp.linear_fc2")):
        ours[name + ".weight"] = source.take(p + hf + ".weight").t()
        ours[name + ".bias"] = source.take(p + hf + ".bias")
    for hf, name in (("ln_1", "input_norm"), ("ln_2", "pre_mlp_norm")):
        ours[name + ".weight"], ours[name + ".bias"] = source.take(p + hf + ".weight"), source.take(p + hf + ".bias")
    return ours


def _neox_layer_from_hf(source: TensorSource, config: ModelConfig, i: int) -> Tensors:
    p = f"gpt_neox.layers.{i}."
    return {f"{ours}.{kind}": source.take(f"{p}{hf}.{kind}") for hf, ours in NEOX_NAMES + NEOX_NORMS
            for kind in ("weight", "bias")}


def _llama_layer_from_hf(source: TensorSource, config: ModelConfig, i: int) -> Tensors:
    p, ours = f"model.layers.{i}.", {}
    kinds: Iterable[str] = ("weight", "bias") if config.add_bias_linear or config.add_qkv_bias else ("weight",)
    for kind in kinds:
        q, k, v = (source.take(p + f"self_attn.{x}_proj.{kind}") for x in "qkv")
        ours[f"self_attention.linear_qkv.{kind}"] = fuse_qkv(q, k, v, config)
    for kind in ("weight", "bias") if config.add_bias_linear else ("weight",):
        ours[f"self_attention.linear_proj.{kind}"] = source.take(p + f"self_attn.o_proj.{kind}")
        if config.is_moe_layer(i):
            continue
        gate, up = source.take(p + f"mlp.gate_proj.{kind}"), source.take(p + f"mlp.up_proj.{kind}")
        ours[f"mlp.linear_fc1.{kind}"] = torch.stack([gate, up], 1).reshape(-1, *gate.shape[1:])
        ours[f"mlp.linear_fc2.{kind}"] = source.take(p + f"mlp.down_proj.{kind}")
    if config.is_moe_layer(i):
        ours.update(moe_layer_from_hf(source, config, i))
    names = _llama_norm_names(config)
    for hf, name in names:
        ours[name + ".weight"] = source.take(p + hf + ".weight")
    return ours
