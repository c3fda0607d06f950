"""The ``args`` namespace a Megatron-LM checkpoint carries: what Megatron-LM's loaders
(``load_args_from_checkpoint``, ``tools/checkpoint``) rebuild the model from, written from a ModelConfig
and read back into one.  Every field that changes the model either maps to a ModelConfig field or is
refused by name when it holds a value megalite cannot hold (docs/megatron.md)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from megalite.config.moe_settings import MoEFields
from megalite.config.settings import ModelConfig

__all__ = ["CHECKPOINT_VERSION", "megatron_args", "config_from_args"]

CHECKPOINT_VERSION = 3.0         # Megatron-LM's checkpoint_version for megatron-core models

# Megatron-LM fields whose value megalite cannot reproduce: (field, the value megalite has).
_FIXED = (("rotary_interleaved", False), ("squared_relu", False),
          ("virtual_pipeline_model_parallel_size", None), ("decoder_first_pipeline_num_layers", None),
          ("decoder_last_pipeline_num_layers", None), ("multi_latent_attention", False), ("mtp_num_layers", None),
          ("moe_router_num_groups", None), ("moe_router_group_topk", None), ("moe_apply_probs_on_input", False),
          ("moe_latent_size", None), ("moe_use_legacy_grouped_gemm", False))
# The MoE flags, Megatron-LM's names and meanings (config/moe_settings.py): carried both ways as they are.
_MOE_FIELDS = tuple(field.name for field in dataclasses.fields(MoEFields))


def _moe_args(config: ModelConfig, ep: int, grouped: bool) -> dict:
    """The MoE fields of ``args``: experts split over ``ep`` ranks, whole on each (expert TP 1), in
    TEGroupedMLP's layout when ``grouped`` (--moe-grouped-gemm), else SequentialMLP's."""
    if config.num_experts is None:
        return dict(num_experts=None, expert_model_parallel_size=1)
    return {**{name: getattr(config, name) for name in _MOE_FIELDS}, "moe_grouped_gemm": grouped,
            "expert_model_parallel_size": ep, "expert_tensor_parallel_size": 1, "moe_use_legacy_grouped_gemm": False}


def _moe_fields(args: Any) -> dict:
    """ModelConfig's MoE fields of ``args`` (none for a dense model); experts split over TP refused."""
    if not _get(args, "num_experts"):
        return {}
    etp = _get(args, "expert_tensor_parallel_size") or _get(args, "tensor_model_parallel_size", 1)
    if etp > 1:
        raise ValueError(f"Megatron-LM's --expert-tensor-parallel-size {etp}: experts split over TP ranks are "
                         f"not converted; reshard it with Megatron-LM's tools/checkpoint to expert TP 1")
    if _get(args, "moe_grouped_gemm") and _get(args, "transformer_impl") == "local":
        raise ValueError("Megatron-LM's --moe-grouped-gemm with --transformer-impl local holds the legacy GroupedMLP "
                         "layout, which is not converted; save it with the Transformer Engine spec or without "
                         "--moe-grouped-gemm")
    balancing = _get(args, "moe_router_load_balancing_type")
    if isinstance(balancing, (list, tuple)):        # Megatron-LM keeps a list only when it names several
        raise ValueError(f"Megatron-LM's --moe-router-load-balancing-type {' '.join(balancing)}: megalite computes "
                         f"one balancing loss per layer; this checkpoint cannot be converted")
    fields = {name: _get(args, name) for name in _MOE_FIELDS if _get(args, name) is not None}
    if fields.get("moe_token_dispatcher_type") not in ("allgather", "alltoall"):    # flex: how tokens travel,
        fields.pop("moe_token_dispatcher_type", None)                               # not the model's math
    return fields


def megatron_args(config: ModelConfig, *, tp: int, pp: int, iteration: int, spec: str, ckpt_format: str,
                  dtype: torch.dtype, legacy_models: bool = False, tokenizer_type: str = "NullTokenizer",
                  ep: int = 1, grouped: bool = False) -> argparse.Namespace:
    """Megatron-LM's ``args`` for ``config`` saved at ``tp`` x ``pp`` (x ``ep`` for the experts) under layer
    ``spec`` (or as the model before megatron-core, ``legacy_models``)."""
    rope = config.position_embedding_type == "rope"
    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_query_groups,
        group_query_attention=config.num_query_groups != config.num_attention_heads, kv_channels=config.head_dim,
        seq_length=config.seq_length, max_position_embeddings=config.max_position_embeddings,
        vocab_size=config.vocab_size, padded_vocab_size=config.padded_vocab_size(tp),
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        normalization=config.normalization, norm_epsilon=config.norm_epsilon,
        swiglu=config.swiglu, openai_gelu=config.openai_gelu, squared_relu=False,
        position_embedding_type=config.position_embedding_type, add_position_embedding=not rope,
        use_rotary_position_embeddings=rope, rotary_base=int(config.rotary_base) if rope else 10000,
        rotary_percent=config.rotary_percent, rotary_interleaved=False, use_rope_scaling=config.use_rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor,
        rotary_seq_len_interpolation_factor=config.rotary_seq_len_interpolation_factor,
        untie_embeddings_and_output_weights=config.untie_embeddings_and_output_weights,
        add_bias_linear=config.add_bias_linear, add_qkv_bias=config.add_bias_linear or config.add_qkv_bias,
        apply_layernorm_1p=config.apply_layernorm_1p, qk_layernorm=config.qk_layernorm,
        apply_query_key_layer_scaling=False, hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout, init_method_std=config.init_method_std, seed=config.seed,
        **_moe_args(config, ep, grouped), fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        transformer_impl="local" if spec == "local" else "transformer_engine", use_legacy_models=legacy_models,
        bias_gelu_fusion=False,
        ckpt_format=ckpt_format, iteration=iteration, consumed_train_samples=0, consumed_valid_samples=0,
        tokenizer_type=tokenizer_type, bert_binary_head=False, spec=None)


def _get(args: Any, name: str, default=None):
    return getattr(args, name, default)


def config_from_args(args: Any) -> ModelConfig:
    """The ModelConfig of a Megatron-LM checkpoint's ``args``; a model megalite cannot hold is one
    ValueError naming the field."""
    if args is None:
        raise ValueError("the checkpoint holds no 'args' namespace; it was not saved by Megatron-LM's "
                         "save_checkpoint (save the model with its args, as Megatron-LM does)")
    for name, ours in _FIXED:
        value = _get(args, name, ours)
        if value != ours and (value or ours not in (False, None)):     # 0 / False / None: the feature is off
            raise ValueError(f"Megatron-LM's --{name.replace('_', '-')} {value} is not supported by megalite "
                             f"(it holds {ours}); this checkpoint cannot be converted")
    heads, hidden = args.num_attention_heads, args.hidden_size
    bias = bool(_get(args, "add_bias_linear", True))
    qkv_bias = bool(_get(args, "add_qkv_bias", bias))
    if bias and not qkv_bias:
        raise ValueError("Megatron-LM's --add-qkv-bias False with --add-bias-linear: megalite's QKV has a bias "
                         "whenever every linear has one; this checkpoint cannot be converted")
    if _get(args, "position_embedding_type", "learned_absolute") not in ("learned_absolute", "rope"):
        raise ValueError(f"Megatron-LM's --position-embedding-type {args.position_embedding_type}: megalite "
                         f"holds learned_absolute or rope")
    groups = _get(args, "num_query_groups") if _get(args, "group_query_attention", False) else None
    padded = _get(args, "padded_vocab_size")
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups or heads,
        ffn_hidden_size=_get(args, "ffn_hidden_size") or 4 * hidden, seq_length=args.seq_length,
        max_position_embeddings=_get(args, "max_position_embeddings") or args.seq_length,
        vocab_size=_get(args, "vocab_size") or padded,
        make_vocab_size_divisible_by=_get(args, "make_vocab_size_divisible_by", 128),
        hidden_dropout=_get(args, "hidden_dropout", 0.1), attention_dropout=_get(args, "attention_dropout", 0.1),
        normalization=_get(args, "normalization", "LayerNorm"), norm_epsilon=_get(args, "norm_epsilon", 1e-5),
        swiglu=bool(_get(args, "swiglu", False)), openai_gelu=bool(_get(args, "openai_gelu", False)),
        position_embedding_type=_get(args, "position_embedding_type", "learned_absolute"),
        rotary_base=float(_get(args, "rotary_base", 10000)), rotary_percent=float(_get(args, "rotary_percent", 1.0)),
        use_rope_scaling=bool(_get(args, "use_rope_scaling", False)),
        rope_scaling_factor=float(_get(args, "rope_scaling_factor", 8.0)),
        rotary_seq_len_interpolation_factor=_get(args, "rotary_seq_len_interpolation_factor"),
        kv_channels=_get(args, "kv_channels") or hidden // heads, qk_layernorm=bool(_get(args, "qk_layernorm", False)),
        add_qkv_bias=qkv_bias and not bias, apply_layernorm_1p=bool(_get(args, "apply_layernorm_1p", False)),
        untie_embeddings_and_output_weights=bool(_get(args, "untie_embeddings_and_output_weights", False)),
        add_bias_linear=bias, init_method_std=_get(args, "init_method_std", 0.02), seed=_get(args, "seed", 1234),
        **_moe_fields(args))
