"""megalite's model as megatron-core names it: the tensor names and the TP split of each tensor
(docs/megatron.md).

The hub of every Megatron conversion is the *global megatron-core state*: megatron-core's names at
TP=1 in one pipeline stage (layers numbered 0..L-1), the vocabulary padded for the TP size that will
hold it.  Two renamings and one reordering separate it from megalite's single-rank state dict:

- the norms: megalite's ``input_norm`` / ``pre_mlp_norm`` / ``final_norm`` are megatron-core's
  ``input_layernorm`` / ``pre_mlp_layernorm`` / ``decoder.final_layernorm`` under the local layer spec
  (``get_gpt_layer_local_spec``); under the Transformer Engine spec the two layer norms are fused into
  the linear that follows them, ``self_attention.linear_qkv.layer_norm_weight`` and
  ``mlp.linear_fc1.layer_norm_weight`` (with ``_bias`` for LayerNorm);
- SwiGLU's fc1: megalite interleaves rows ``(gate_0, up_0, gate_1, up_1, ...)`` so that any TP split
  keeps pairs together; megatron-core stacks ``[gate; up]`` *per TP rank*, so its global (TP=1) tensor is
  ``[gate; up]`` and rank r of t holds ``[gate_r; up_r]``;
- everything else (the fused QKV laid out per query group, ``linear_proj``, ``linear_fc2``, the
  embeddings, ``output_layer``, q/k layernorms) has the same name and layout.

An MoE layer's experts, router and shared expert are megatron_experts.py's; its ``pre_mlp_norm`` is
``pre_mlp_layernorm`` under either spec (megatron-core fuses the norm only into a dense MLP's fc1), its
shared expert splits over TP as a dense MLP does, and its experts are whole on every TP rank (expert TP 1).
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch

from megalite.checkpoint.megatron_experts import (
    experts_from_megatron,
    experts_to_megatron,
    from_gate_up,
    is_expert_tensor,
    shared_from_megatron,
    shared_to_megatron,
    to_gate_up,
)
from megalite.config.settings import ModelConfig

__all__ = ["SPECS", "to_megatron", "from_megatron", "partition_dim", "split_for_tp", "join_from_tp"]

Tensors = Dict[str, torch.Tensor]
SPECS = ("local", "te")              # megatron-core's layer specs: local modules, or Transformer Engine's

# (megalite name, local spec name, Transformer Engine spec name) inside decoder.layers.N
_NORMS = (("input_norm.", "input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
          ("pre_mlp_norm.", "pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
           "mlp.linear_fc1.bias", "mlp.shared_experts.linear_fc1.weight")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight", "mlp.shared_experts.linear_fc2.weight")
_FC1 = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "shared_expert.linear_fc1.weight",
        "shared_expert.linear_fc1.bias", "shared_experts.linear_fc1.weight")
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


def _fc1(name: str) -> bool:
    """Whether ``name`` (megalite's or megatron-core's) is a dense or shared-expert fc1 (SwiGLU's gate and up)."""
    return name.endswith(_FC1)


def to_megatron(state: Tensors, config: ModelConfig, spec: str = "local",
                padded_vocab: Optional[int] = None, experts: str = "sequential") -> Tensors:
    """The global megatron-core state of megalite's single-rank ``state``, the vocabulary rows padded
    with zeros (or cut) to ``padded_vocab``, the experts in layout ``experts`` (megatron_experts.py)."""
    if spec not in SPECS:
        raise ValueError(f"layer spec {spec!r}: choose one of {', '.join(SPECS)}")
    out: Tensors = {}
    for name, tensor in state.items():
        if name == "output_layer.weight" and not config.untie_embeddings_and_output_weights:
            continue                                    # tied: megatron-core holds one copy
        if is_expert_tensor(name):
            out.update(experts_to_megatron(name, tensor, config.swiglu, experts))
            continue
        if config.swiglu and _fc1(name):
            tensor = to_gate_up(tensor)
        if name in _VOCAB and padded_vocab is not None:
            tensor = _rows(tensor, padded_vocab)
        if name.endswith("mlp.router.weight") and config.add_bias_linear:    # megatron-core's router bias
            out[_megatron_name(name, spec, config)[:-len("weight")] + "bias"] = tensor.new_zeros(tensor.shape[0])
        out[_megatron_name(shared_to_megatron(name), spec, config)] = tensor
    return out


def from_megatron(state: Tensors, config: ModelConfig) -> Tensors:
    """megalite's single-rank state dict (vocabulary padded for TP=1) of a global megatron-core state
    under either layer spec; Transformer Engine's ``_extra_state`` entries carry nothing and are dropped."""
    out: Tensors = {}
    for name, tensor in experts_from_megatron(state, config.swiglu).items():
        if name.endswith("_extra_state"):
            continue
        ours = shared_from_megatron(_megalite_name(name), tensor)
        if ours is None:                                # the router's bias, zero
            continue
        if config.swiglu and _fc1(ours):
            tensor = from_gate_up(tensor)
        if ours in _VOCAB:
            tensor = _rows(tensor, config.padded_vocab_size(1))
        out[ours] = tensor
    if not config.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = out["embedding.word_embeddings.weight"]
    return out


def _rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The vocabulary rows cut or padded with zero rows to ``rows`` (only padding rows are ever cut)."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _megatron_name(name: str, spec: str, config: ModelConfig) -> str:
    if name.startswith("final_norm."):
        return "decoder.final_layernorm." + name[len("final_norm."):]
    match = _LAYER.match(name)
    if match:
        layer, rest = match.groups()
        for ours, local, te in _NORMS:
            if rest.startswith(ours):
                apart = ours == "pre_mlp_norm." and config.is_moe_layer(int(layer))   # no dense fc1 to fuse into
                rest = (local if spec == "local" or apart else te) + rest[len(ours):]
        return f"decoder.layers.{layer}.{rest}"
    return name


def _megalite_name(name: str) -> str:
    if name.startswith("decoder.final_layernorm."):
        return "final_norm." + name[len("decoder.final_layernorm."):]
    match = _LAYER.match(name)
    if match:
        layer, rest = match.groups()
        for ours, local, te in _NORMS:
            for theirs in (local, te):
                if rest.startswith(theirs):
                    rest = ours + rest[len(theirs):]
        return f"decoder.layers.{layer}.{rest}"
    return name


def partition_dim(name: str) -> Optional[int]:
    """The dimension TP splits of a megatron-core tensor (0: column-parallel and vocabulary rows,
    1: row-parallel), None when every TP rank holds all of it (norms, position embeddings, the
    row-parallel biases)."""
    if name in _VOCAB or name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def split_for_tp(name: str, tensor: torch.Tensor, tp: int, swiglu: bool) -> list:
    """The ``tp`` shards of a global tensor, as megatron-core's ranks hold them."""
    dim = partition_dim(name)
    if dim is None:
        return [tensor] * tp
    if swiglu and _fc1(name):                           # rank r holds [gate_r; up_r]
        gates, ups = (half.chunk(tp) for half in tensor.chunk(2))
        return [torch.cat([gate, up]) for gate, up in zip(gates, ups)]
    return list(tensor.chunk(tp, dim))


def join_from_tp(name: str, shards: list, swiglu: bool) -> torch.Tensor:
    """The global tensor of megatron-core's ``shards`` (inverse of :func:`split_for_tp`)."""
    dim = partition_dim(name)
    if dim is None:
        return shards[0]
    if swiglu and _fc1(name):
        halves = [shard.chunk(2) for shard in shards]
        return torch.cat([half[0] for half in halves] + [half[1] for half in halves])
    return torch.cat(shards, dim)
