"""Hugging Face ``config.json`` <-> :class:`ModelConfig`: which architecture a model is, and every field
that changes the math either carried over or refused with one line naming it.

Import reads the configuration as transformers resolves it (``AutoConfig``: ``rope_parameters`` and
the legacy ``rope_theta`` / ``rope_scaling`` alike).  Families:

    GPT2LMHeadModel                     learned positions, LayerNorm, GELU, biases; tied or untied
    GPTNeoXForCausalLM                  RoPE on a fraction of each head (--rotary-percent), LayerNorm, GELU,
                                        biases; sequential residuals only (use_parallel_residual false)
    LlamaForCausalLM, MistralForCausalLM RoPE, RMSNorm, SwiGLU, grouped-query attention, any head dim
    Qwen2ForCausalLM                    the same with a bias on Q, K and V (--add-qkv-bias)
    Qwen3ForCausalLM                    the same with per-head RMSNorm of q and k (--qk-layernorm)
    MixtralForCausalLM                  Mistral's layers with experts in every layer (hf_moe.py)
    Qwen2MoeForCausalLM                 Qwen2's layers with experts and a gated shared expert (hf_moe.py)
    Qwen3MoeForCausalLM                 Qwen3's layers with experts in every layer (hf_moe.py)

Export picks the family from the model's settings (``export_family``) and refuses a model none of
them can hold.  The tables of what is carried, refused and ignored are in README.md
("Hugging Face").
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from megalite.checkpoint.hf_moe import (
    MOE_ARCHITECTURES,
    moe_export_family,
    moe_fields_from_hf,
    moe_hf_config,
)
from megalite.config.model_settings import ModelConfig

__all__ = ["ARCHITECTURES", "IMPORT_SEQ_LENGTH_CAP", "config_from_hf", "export_family", "hf_config_dict",
           "as_hf_config", "require_transformers"]

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", **MOE_ARCHITECTURES}
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", *MOE_ARCHITECTURES)
# Families whose configured sliding window applies to every layer (no layer_types).
WINDOWED_EVERYWHERE = ("mistral", "mixtral", "qwen3_moe")
# An imported model trains on min(max_position_embeddings, this) tokens unless --seq-length says otherwise.
IMPORT_SEQ_LENGTH_CAP = 4096
# GELU flavours: transformers' name -> megalite's --openai-gelu (the tanh approximation) or not.
GPT2_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"Hugging Face config {field}={value!r}: {why}; megalite cannot convert this model")


# transformers 5 resolves every RoPE spelling into ``rope_parameters``; older releases leave Llama 3's
# ``rope_scaling`` and GPT-NeoX's ``rotary_pct`` where this module does not read them.
TRANSFORMERS_FLOOR = (5, 0)


def check_transformers_version(version: str) -> None:
    """One line when ``version`` of transformers is below :data:`TRANSFORMERS_FLOOR`."""
    major_minor = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if major_minor < TRANSFORMERS_FLOOR:
        raise ValueError(f"Hugging Face conversion reads configurations as transformers 5 resolves them; this is "
                         f"transformers {version}: pip install 'transformers>=5'")


def require_transformers():
    """The transformers module, refused in one line below :data:`TRANSFORMERS_FLOOR`."""
    from megalite.extras import require
    transformers = require("transformers")
    check_transformers_version(transformers.__version__)
    return transformers


def as_hf_config(hf_config):
    """A transformers config object: ``hf_config`` itself, or the one a config.json dict describes."""
    if isinstance(hf_config, dict):
        return require_transformers().AutoConfig.for_model(**hf_config)
    return hf_config


def config_from_hf(hf_config) -> ModelConfig:
    """The ModelConfig of a transformers config (or a config.json dict); every field that changes the
    math is carried over or refused."""
    hf = as_hf_config(hf_config)
    kind = hf.model_type
    if kind not in ARCHITECTURES:
        raise _refuse("model_type", kind, f"megalite converts {', '.join(ARCHITECTURES)}")
    for name in getattr(hf, "architectures", None) or []:
        if name != ARCHITECTURES[kind]:
            raise _refuse("architectures", name, f"megalite converts {ARCHITECTURES[kind]} (the causal language "
                                                 f"model) of model_type {kind}")
    fields = {"gpt2": _gpt2_fields, "gpt_neox": _neox_fields}.get(kind, _llama_fields)(hf, kind)
    fields.update(vocab_size=hf.vocab_size, hidden_dropout=0.0, attention_dropout=0.0,
                  untie_embeddings_and_output_weights=not bool(getattr(hf, "tie_word_embeddings", True)))
    return ModelConfig(**fields)


def _gelu(field: str, activation: str) -> bool:
    """megalite's --openai-gelu for a transformers activation name, or the refusal of another activation."""
    if activation not in GPT2_ACTIVATIONS:
        raise _refuse(field, activation, f"megalite's GPT MLP runs GELU, exact or tanh ({', '.join(GPT2_ACTIVATIONS)})")
    return GPT2_ACTIVATIONS[activation]


def _gpt2_fields(hf, kind: str) -> Dict[str, Any]:
    openai_gelu = _gelu("activation_function", hf.activation_function)
    if not getattr(hf, "scale_attn_weights", True):
        raise _refuse("scale_attn_weights", False, "megalite always divides attention scores by sqrt(head dim)")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        raise _refuse("scale_attn_by_inverse_layer_idx", True, "megalite has no per-layer attention scale")
    if getattr(hf, "add_cross_attention", False):
        raise _refuse("add_cross_attention", True, "megalite's layers have no cross-attention")
    h = hf.n_embd
    return dict(num_layers=hf.n_layer, hidden_size=h, num_attention_heads=hf.n_head,
                ffn_hidden_size=hf.n_inner or 4 * h, seq_length=min(hf.n_positions, IMPORT_SEQ_LENGTH_CAP),
                max_position_embeddings=hf.n_positions, norm_epsilon=hf.layer_norm_epsilon, openai_gelu=openai_gelu)


def _neox_fields(hf, kind: str) -> Dict[str, Any]:
    openai_gelu = _gelu("hidden_act", hf.hidden_act)
    if hf.use_parallel_residual:
        raise _refuse("use_parallel_residual", True, "megalite's layer adds attention, then the MLP on the sum")
    if not hf.attention_bias:
        raise _refuse("attention_bias", False, "GPT-NeoX's MLP keeps its biases, and megalite has biases on every "
                                               "linear layer or on none")
    positions = hf.max_position_embeddings
    fields = dict(num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
                  num_attention_heads=hf.num_attention_heads, ffn_hidden_size=hf.intermediate_size,
                  seq_length=min(positions, IMPORT_SEQ_LENGTH_CAP), max_position_embeddings=positions,
                  norm_epsilon=hf.layer_norm_eps, position_embedding_type="rope", openai_gelu=openai_gelu)
    fields.update(_rope_fields(hf, partial_rotary=True))
    return fields

def _llama_fields(hf, kind: str) -> Dict[str, Any]:
    if hf.hidden_act not in ("silu", "swish"):
        raise _refuse("hidden_act", hf.hidden_act, "megalite's gated MLP is SwiGLU (silu)")
    h, a = hf.hidden_size, hf.num_attention_heads
    seq = min(hf.max_position_embeddings, IMPORT_SEQ_LENGTH_CAP)
    _check_sliding_window(hf, kind, seq)
    fields = dict(num_layers=hf.num_hidden_layers, hidden_size=h, num_attention_heads=a,
                  num_query_groups=getattr(hf, "num_key_value_heads", None) or a,
                  kv_channels=getattr(hf, "head_dim", None) or h // a, ffn_hidden_size=hf.intermediate_size,
                  seq_length=seq, max_position_embeddings=hf.max_position_embeddings, norm_epsilon=hf.rms_norm_eps,
                  normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False)
    attention_bias, mlp_bias = bool(getattr(hf, "attention_bias", False)), bool(getattr(hf, "mlp_bias", False))
    if kind in ("qwen2", "qwen2_moe"):
        fields["add_qkv_bias"] = True   # Qwen2-MoE's qkv_bias may take it back (hf_moe.py)
    elif attention_bias and mlp_bias:
        fields["add_bias_linear"] = True
    elif attention_bias or mlp_bias:
        name = "attention_bias" if attention_bias else "mlp_bias"
        raise _refuse(name, True, "megalite puts biases on every linear layer (attention_bias and mlp_bias "
                                  "together) or on Q, K and V alone (Qwen2), not on one of the two")
    fields["qk_layernorm"] = kind in ("qwen3", "qwen3_moe")
    if getattr(hf, "pretraining_tp", 1) not in (None, 1):
        raise _refuse("pretraining_tp", hf.pretraining_tp, "megalite computes the projections unsplit")
    fields.update(_rope_fields(hf))
    if kind in MOE_ARCHITECTURES:
        fields.update(moe_fields_from_hf(hf, kind))
    return fields


def _check_sliding_window(hf, kind: str, seq: int) -> None:
    window = getattr(hf, "sliding_window", None)
    if window is None:
        return
    layer_types = getattr(hf, "layer_types", None)
    if kind in WINDOWED_EVERYWHERE or (layer_types and "sliding_attention" in layer_types):
        longest = max(seq, getattr(hf, "max_position_embeddings", None) or seq)
        if window < longest:
            raise _refuse("sliding_window", window, f"megalite's attention reads the whole sequence (no sliding "
                                                    f"window), and the model takes sequences of up to {longest} "
                                                    f"tokens")


def _rope_fields(hf, partial_rotary: bool = False) -> Dict[str, Any]:
    """--rotary-base, --rotary-percent (``partial_rotary``: the architecture reads it) and the scaling of
    transformers' resolved ``rope_parameters``."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    fields: Dict[str, Any] = {"rotary_base": float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))}
    if partial_rotary and partial is not None:
        fields["rotary_percent"] = float(partial)
    elif partial not in (None, 1.0):
        raise _refuse("partial_rotary_factor", partial, "this architecture rotates the whole head in transformers")
    if kind == "linear":
        fields["rotary_seq_len_interpolation_factor"] = float(rope["factor"])
    elif kind == "llama3":
        for key, expected in LLAMA3_DEFAULTS.items():
            if float(rope.get(key, expected)) != expected:
                raise _refuse(f"rope_parameters.{key}", rope[key],
                              f"megalite's Llama 3 scaling fixes it at {expected:g}")
        fields.update(use_rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
    elif kind != "default":
        raise _refuse("rope_parameters.rope_type", kind, "megalite implements default, linear and llama3 RoPE")
    return fields


# -- export -----------------------------------------------------------------------------------------
def export_family(config: ModelConfig) -> str:
    """The Hugging Face family that holds ``config`` exactly, or ValueError naming what none holds."""
    if config.num_experts is not None and config.position_embedding_type != "rope":
        raise ValueError(f"--num-experts {config.num_experts} with --position-embedding-type "
                         f"{config.position_embedding_type}: Mixtral and Qwen3-MoE have RoPE; megalite cannot "
                         f"convert this model")
    if config.position_embedding_type == "learned_absolute":
        gpt2 = {"--normalization LayerNorm": config.normalization == "LayerNorm", "no --swiglu": not config.swiglu,
                "linear biases": config.add_bias_linear, "no --qk-layernorm": not config.qk_layernorm,
                "one key/value group per head (no grouped-query attention)":
                    config.num_query_groups == config.num_attention_heads,
                "head dim = hidden / heads (no --kv-channels)":
                    config.head_dim * config.num_attention_heads == config.hidden_size}
        return _family_or_refuse("gpt2", gpt2, "GPT2LMHeadModel")
    one_rope_scaling = {"not both --use-rope-scaling and --rotary-seq-len-interpolation-factor":
                        not (config.use_rope_scaling and config.rotary_seq_len_interpolation_factor)}
    if config.position_embedding_type == "rope" and config.normalization == "LayerNorm" and not config.swiglu:
        neox = {"linear biases": config.add_bias_linear, "no --qk-layernorm": not config.qk_layernorm,
                "one key/value group per head (no grouped-query attention)":
                    config.num_query_groups == config.num_attention_heads,
                "head dim = hidden / heads (no --kv-channels)":
                    config.head_dim * config.num_attention_heads == config.hidden_size, **one_rope_scaling}
        return _family_or_refuse("gpt_neox", neox, "GPTNeoXForCausalLM")
    if config.position_embedding_type == "rope":
        llama = {"--normalization RMSNorm": config.normalization == "RMSNorm", "--swiglu": config.swiglu,
                 "--rotary-percent 1": config.rotary_percent == 1.0, **one_rope_scaling}
        _family_or_refuse("llama", llama, "a LLaMA-family model")
        if config.num_experts is not None:
            return moe_export_family(config)
        if config.qk_layernorm:
            return _family_or_refuse("qwen3", {"no linear biases": not config.add_bias_linear,
                                               "no --add-qkv-bias": not config.add_qkv_bias}, "Qwen3ForCausalLM")
        if config.add_qkv_bias and not config.add_bias_linear:
            return "qwen2"
        return "llama"
    raise ValueError(f"--position-embedding-type {config.position_embedding_type}: no Hugging Face family megalite "
                     f"exports has it (GPT-2: learned_absolute; GPT-NeoX, LLaMA, Qwen: rope)")


def _family_or_refuse(family: str, needs: Dict[str, bool], what: str) -> str:
    missing: List[str] = [name for name, ok in needs.items() if not ok]
    if missing:
        raise ValueError(f"this model does not convert to Hugging Face as {what}: it needs {', '.join(missing)}")
    return family


def hf_config_dict(config: ModelConfig, family: Optional[str] = None) -> Dict[str, Any]:
    """The config.json of ``config`` as the Hugging Face ``family`` (default :func:`export_family`)."""
    family = family or export_family(config)
    h, a, v = config.hidden_size, config.num_attention_heads, config.vocab_size
    tied = not config.untie_embeddings_and_output_weights
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": v,
              "tie_word_embeddings": tied, "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": None}
    if family == "gpt2":
        return {**common, "n_embd": h, "n_layer": config.num_layers, "n_head": a, "n_inner": config.ffn_hidden_size,
                "n_positions": config.max_position_embeddings, "layer_norm_epsilon": config.norm_epsilon,
                "activation_function": "gelu_new" if config.openai_gelu else "gelu",
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    rope: Dict[str, Any] = {"rope_type": "default", "rope_theta": config.rotary_base}
    if config.use_rope_scaling:
        rope.update(rope_type="llama3", factor=config.rope_scaling_factor, **LLAMA3_DEFAULTS)
    elif config.rotary_seq_len_interpolation_factor:
        rope.update(rope_type="linear", factor=config.rotary_seq_len_interpolation_factor)
    if family == "gpt_neox":
        return {**common, "hidden_size": h, "num_attention_heads": a, "num_hidden_layers": config.num_layers,
                "intermediate_size": config.ffn_hidden_size, "max_position_embeddings": config.max_position_embeddings,
                "layer_norm_eps": config.norm_epsilon, "hidden_act": "gelu_new" if config.openai_gelu else "gelu",
                "rope_parameters": {**rope, "partial_rotary_factor": config.rotary_percent},
                "use_parallel_residual": False, "attention_bias": True, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    out = {**common, "hidden_size": h, "intermediate_size": config.ffn_hidden_size,
           "num_hidden_layers": config.num_layers, "num_attention_heads": a,
           "num_key_value_heads": config.num_query_groups, "head_dim": config.head_dim,
           "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_epsilon,
           "rope_parameters": rope, "hidden_act": "silu", "attention_dropout": 0.0}
    if family == "llama":
        out.update(attention_bias=config.add_bias_linear, mlp_bias=config.add_bias_linear)
    if family == "qwen3":
        out["attention_bias"] = False
    if family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    if family in MOE_ARCHITECTURES:
        out.update(moe_hf_config(config, family))
    return out
