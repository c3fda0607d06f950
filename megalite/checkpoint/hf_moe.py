"""Mixture-of-experts models in Hugging Face: ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` and
``Qwen3MoeForCausalLM`` <-> megalite's MoE layer (megalite/model/moe/), every MoE field of the configuration
carried or refused by name.

Routing.  Both compute the router's logits ``z = x W^T`` (``mlp.gate.weight [E, h]``, megalite's
``mlp.router.weight``), the softmax over all E experts and its k largest values ``p_i``:

    Mixtral, Qwen3-MoE with norm_topk_prob      p_i / sum of the k p_j = softmax over the k chosen logits,
                                                which is megalite's default router (no --moe-router-pre-softmax)
    Qwen-MoE without norm_topk_prob             p_i as they are = --moe-router-pre-softmax

Qwen2-MoE adds a shared expert (``mlp.shared_expert.*``, a SwiGLU MLP of ``shared_expert_intermediate_size``)
scaled by ``sigmoid(x g)`` with ``g = mlp.shared_expert_gate.weight [1, h]``: megalite's
--moe-shared-expert-intermediate-size with --moe-shared-expert-gate (``mlp.shared_expert.*``,
``mlp.shared_expert_gate``).

Which layers hold experts.  Mixtral: all.  The Qwen models: layer i unless i is in ``mlp_only_layers`` or
i + 1 is no multiple of ``decoder_sparse_step``; the others are dense MLPs of ``intermediate_size``
(megalite's --ffn-hidden-size) -- a --moe-layer-freq list, written back as ``mlp_only_layers``.

Experts.  transformers 5 holds each layer's experts stacked, ``experts.gate_up_proj [E, 2f, h]`` (gate rows,
then up rows) and ``experts.down_proj [E, h, f]``, and saves them (``save_pretrained``, the models on the Hub)
one expert at a time: Mixtral's ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2`` (down),
Qwen-MoE's ``mlp.experts.{e}.gate_proj``, ``up_proj``, ``down_proj``, each ``[out, in]``.  Import reads either;
export writes the per-expert files.  megalite's ``experts.weight1 [E, h, 2f]`` interleaves gate and up per unit
(``(gate_0, up_0, gate_1, ...)``, as its dense SwiGLU) and ``experts.weight2`` is ``[E, f, h]``: both are
``x @ weight``, the transposes of Hugging Face's ``[out, in]``.

The balancing loss's coefficient (``router_aux_loss_coef``) becomes ``--moe-aux-loss-coeff`` and back; it
changes no logit.  The loss it weighs differs: transformers adds one loss over all layers' tokens pooled
(k at an even load, and only with ``output_router_logits``), Megatron-LM and megalite one per layer (1 each at
an even load).  Export writes ``output_router_logits: false``, so transformers' loss is the language model's.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from megalite.config.model_settings import ModelConfig

__all__ = ["MOE_ARCHITECTURES", "moe_fields_from_hf", "moe_export_family", "moe_hf_config",
           "moe_layer_from_hf", "moe_layer_to_hf"]

Tensors = Dict[str, torch.Tensor]
MOE_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                     "qwen3_moe": "Qwen3MoeForCausalLM"}
# Per-expert names as saved: family -> (the MoE block's prefix, gate, up, down).
SAVED_EXPERTS = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
                 "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                 "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"Hugging Face config {field}={value!r}: {why}; megalite cannot convert this model")


def moe_fields_from_hf(hf, kind: str) -> Dict[str, Any]:
    """The MoE fields of ModelConfig for a Mixtral or Qwen3-MoE configuration."""
    jitter = getattr(hf, "router_jitter_noise", 0.0) or 0.0
    if jitter:
        raise _refuse("router_jitter_noise", jitter, "megalite's router reads its input unperturbed")
    experts = hf.num_local_experts if kind == "mixtral" else hf.num_experts
    if not experts:
        raise _refuse("num_experts", experts, "a model without experts is the dense family (qwen2, qwen3)")
    fields = dict(num_experts=experts, moe_router_topk=hf.num_experts_per_tok, moe_layer_freq=1,
                  moe_aux_loss_coeff=float(hf.router_aux_loss_coef or 0.0), moe_router_score_function="softmax")
    if kind == "mixtral":
        fields.update(moe_ffn_hidden_size=hf.intermediate_size, moe_router_pre_softmax=False)
        return fields
    # Experts in layer i unless it is in mlp_only_layers or (i + 1) is no multiple of decoder_sparse_step: a
    # --moe-layer-freq list where any layer is dense.
    pattern = [int(i not in hf.mlp_only_layers and (i + 1) % hf.decoder_sparse_step == 0)
               for i in range(hf.num_hidden_layers)]
    fields["moe_layer_freq"] = 1 if all(pattern) else pattern
    fields.update(moe_ffn_hidden_size=hf.moe_intermediate_size, moe_router_pre_softmax=not hf.norm_topk_prob)
    if kind == "qwen2_moe":
        fields.update(moe_shared_expert_intermediate_size=hf.shared_expert_intermediate_size,
                      moe_shared_expert_gate=True, add_qkv_bias=bool(hf.qkv_bias))
    return fields


def moe_export_family(config: ModelConfig) -> str:
    """``mixtral``, ``qwen2_moe`` or ``qwen3_moe``: the family that holds an MoE ``config`` (already of the
    LLaMA kind), or ValueError naming what none holds."""
    shared = config.moe_shared_expert_intermediate_size is not None
    needs = {"--moe-layer-freq 1 (experts in every layer) without --qk-layernorm or a shared expert (Mixtral has "
             "no dense layers)": moe_family(config) != "mixtral" or not _dense_layers(config),
             "--moe-shared-expert-gate with a shared expert (Qwen2-MoE gates it)":
                 not shared or config.moe_shared_expert_gate,
             "no --qk-layernorm with a shared expert (Qwen2-MoE has no q/k norms)":
                 not (shared and config.qk_layernorm),
             "--disable-bias-linear (their experts have no biases)": not config.add_bias_linear,
             "--moe-router-score-function softmax": config.moe_router_score_function == "softmax",
             "no --moe-router-topk-scaling-factor": config.moe_router_topk_scaling_factor is None,
             "no --moe-router-enable-expert-bias": not config.moe_router_enable_expert_bias,
             "no --moe-expert-capacity-factor (their experts drop no token)": config.moe_expert_capacity_factor is None,
             "no --add-qkv-bias without a shared expert (only Qwen2-MoE has the bias)":
                 shared or not config.add_qkv_bias}
    missing: List[str] = [name for name, ok in needs.items() if not ok]
    if missing:
        raise ValueError(f"this MoE model does not convert to Hugging Face as Mixtral or Qwen-MoE: it needs "
                         f"{', '.join(missing)}")
    family = moe_family(config)
    if family == "mixtral" and config.moe_router_pre_softmax:
        raise ValueError("--moe-router-pre-softmax without --qk-layernorm or a shared expert: Mixtral renormalizes the "
                         "chosen experts' weights, and the Qwen-MoE models, which may not, have q/k norms (Qwen3) or a "
                         "gated shared expert (Qwen2); megalite cannot convert this model")
    return family


def moe_hf_config(config: ModelConfig, family: str) -> Dict[str, Any]:
    """The MoE fields of ``family``'s config.json (the LLaMA fields come from hf_config.py)."""
    common = {"num_experts_per_tok": config.moe_router_topk, "router_aux_loss_coef": config.moe_aux_loss_coeff,
              "output_router_logits": False}
    if family == "mixtral":
        return {**common, "num_local_experts": config.num_experts, "intermediate_size": config.moe_ffn_hidden_size,
                "router_jitter_noise": 0.0, "sliding_window": None}
    qwen = {**common, "num_experts": config.num_experts, "moe_intermediate_size": config.moe_ffn_hidden_size,
            "norm_topk_prob": not config.moe_router_pre_softmax, "decoder_sparse_step": 1,
            "mlp_only_layers": _dense_layers(config),
            "use_sliding_window": False, "sliding_window": None}
    if family == "qwen2_moe":
        return {**qwen, "shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
                "qkv_bias": config.add_qkv_bias}
    return {**qwen, "attention_bias": False}


def _dense_layers(config: ModelConfig) -> List[int]:
    return [i for i in range(config.num_layers) if not config.is_moe_layer(i)]


def moe_family(config: ModelConfig) -> str:
    """The family an MoE model's tensors are named after: Qwen3-MoE has q/k norms, Qwen2-MoE a shared expert,
    Mixtral neither."""
    if config.qk_layernorm:
        return "qwen3_moe"
    return "qwen2_moe" if config.moe_shared_expert_intermediate_size is not None else "mixtral"


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [E, f, h] -> megalite's weight1 [E, h, 2f] with columns (gate_0, up_0, gate_1, ...)."""
    return torch.stack([gate, up], 2).flatten(1, 2).transpose(1, 2)


def moe_layer_from_hf(source, config: ModelConfig, i: int) -> Tensors:
    """megalite's ``mlp.*`` tensors of MoE layer ``i`` from a TensorSource, stacked or per-expert."""
    family = moe_family(config)
    block, gate_name, up_name, down_name = SAVED_EXPERTS[family]
    p = f"model.layers.{i}."
    stacked = f"{p}mlp.experts.gate_up_proj" in source
    block = "mlp" if stacked else block
    ours = {"mlp.router.weight": source.take(f"{p}{block}.gate.weight")}
    if stacked:
        gate, up = source.take(f"{p}mlp.experts.gate_up_proj").chunk(2, dim=1)
        down = source.take(f"{p}mlp.experts.down_proj")
    else:
        experts = range(config.num_experts)
        gate, up, down = (torch.stack([source.take(f"{p}{block}.experts.{e}.{name}.weight") for e in experts])
                          for name in (gate_name, up_name, down_name))
    ours["mlp.experts.weight1"] = _interleave(gate, up)
    ours["mlp.experts.weight2"] = down.transpose(1, 2)
    if family == "qwen2_moe":
        gate, up = (source.take(f"{p}mlp.shared_expert.{name}.weight") for name in ("gate_proj", "up_proj"))
        ours["mlp.shared_expert.linear_fc1.weight"] = torch.stack([gate, up], 1).flatten(0, 1)
        ours["mlp.shared_expert.linear_fc2.weight"] = source.take(f"{p}mlp.shared_expert.down_proj.weight")
        ours["mlp.shared_expert_gate"] = source.take(f"{p}mlp.shared_expert_gate.weight")
    return ours


def moe_layer_to_hf(layer: Tensors, config: ModelConfig, i: int) -> Tensors:
    """The saved (per-expert) Hugging Face tensors of MoE layer ``i`` from megalite's layer tensors."""
    block, gate_name, up_name, down_name = SAVED_EXPERTS[moe_family(config)]
    p = f"model.layers.{i}.{block}."
    weight1 = layer["mlp.experts.weight1"].transpose(1, 2)          # [E, 2f, h], rows interleaved
    out = {p + "gate.weight": layer["mlp.router.weight"]}
    for e in range(config.num_experts):
        out[f"{p}experts.{e}.{gate_name}.weight"] = weight1[e, 0::2]
        out[f"{p}experts.{e}.{up_name}.weight"] = weight1[e, 1::2]
        out[f"{p}experts.{e}.{down_name}.weight"] = layer["mlp.experts.weight2"][e].t()
    if "mlp.shared_expert_gate" in layer:   # Qwen2-MoE
        fc1 = layer["mlp.shared_expert.linear_fc1.weight"]
        out[p + "shared_expert.gate_proj.weight"], out[p + "shared_expert.up_proj.weight"] = fc1[0::2], fc1[1::2]
        out[p + "shared_expert.down_proj.weight"] = layer["mlp.shared_expert.linear_fc2.weight"]
        out[p + "shared_expert_gate.weight"] = layer["mlp.shared_expert_gate"]
    return out
