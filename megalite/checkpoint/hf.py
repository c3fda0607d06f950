"""Hugging Face in and out: megalite checkpoints as ``config.json`` + ``model.safetensors`` that
``transformers.AutoModelForCausalLM.from_pretrained`` loads, and back.

    megalite-convert --to hf --load CKPT --save HF_DIR       (any TP x PP layout)
    megalite-convert --from hf --load HF_DIR --save CKPT     (a TP=1, PP=1 checkpoint)

(``tools/convert_checkpoint.py`` and ``python -m megalite.checkpoint.hf`` are the same command.)

Two families: GPT-2 (``GPT2LMHeadModel``: learned positions, LayerNorm, GELU, tied output) and
LLaMA (``LlamaForCausalLM``: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied).  The
conventions that differ between the two codebases:

- GPT-2's ``Conv1D`` stores weights as ``[in, out]``; megalite's linear layers as ``[out, in]``.
- megalite fuses Q, K and V into one weight laid out per query group, ``[q of its a/g heads | k | v]``
  (``transformer.SelfAttention``); GPT-2 fuses them as ``[all q | all k | all v]``; LLaMA keeps three.
- megalite's SwiGLU fc1 interleaves rows ``(gate_0, up_0, gate_1, up_1, ...)``; LLaMA has
  ``gate_proj`` and ``up_proj``.
- RoPE: both use the "rotate half" pairing ``(x_i, x_{i+d/2})``, so q and k need no permutation.
- GPT-2's activation is the tanh approximation of GELU (megalite's ``--openai-gelu``).
- megalite pads the vocabulary (``--make-vocab-size-divisible-by``); Hugging Face does not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, Tuple

import torch

from megalite.config.settings import ModelConfig

__all__ = ["to_hf", "from_hf", "export_checkpoint", "import_checkpoint", "main"]

Tensors = Dict[str, torch.Tensor]


def _gpt2(config: ModelConfig) -> bool:
    return config.position_embedding_type == "learned_absolute"


def _check_convertible(config: ModelConfig) -> None:
    gpt2 = (config.position_embedding_type, config.normalization, config.swiglu, config.add_bias_linear,
            config.untie_embeddings_and_output_weights) == ("learned_absolute", "LayerNorm", False, True, False)
    llama = (config.position_embedding_type, config.normalization, config.swiglu,
             config.add_bias_linear) == ("rope", "RMSNorm", True, False)
    if not (gpt2 or llama):
        raise ValueError("only GPT-2 (learned positions, LayerNorm, GELU, biases, tied output) and LLaMA-style "
                         "(RoPE, RMSNorm, SwiGLU, no biases) models convert to Hugging Face")


def to_hf(state: Tensors, config: ModelConfig) -> Tuple[dict, Tensors]:
    """(config.json dict, state dict) of the Hugging Face model equal to megalite's single-rank ``state``."""
    _check_convertible(config)
    h, a, g, d, v = (config.hidden_size, config.num_attention_heads, config.num_query_groups, config.head_dim,
                     config.vocab_size)
    out: Tensors = {}

    def layer(i, name):
        return state[f"decoder.layers.{i}.{name}"]

    for i in range(config.num_layers):
        qkv = layer(i, "self_attention.linear_qkv.weight").view(g, a // g + 2, d, h)
        q, k, val = qkv[:, :a // g].reshape(a * d, h), qkv[:, a // g].reshape(g * d, h), qkv[:, -1].reshape(g * d, h)
        fc1 = layer(i, "mlp.linear_fc1.weight")
        if _gpt2(config):
            p = f"transformer.h.{i}."
            bias = layer(i, "self_attention.linear_qkv.bias").view(g, a // g + 2, d)
            out[p + "attn.c_attn.weight"] = torch.cat([q, k, val]).t()
            out[p + "attn.c_attn.bias"] = torch.cat([bias[:, 0].reshape(-1), bias[:, 1].reshape(-1),
                                                     bias[:, 2].reshape(-1)])
            out[p + "attn.c_proj.weight"] = layer(i, "self_attention.linear_proj.weight").t()
            out[p + "attn.c_proj.bias"] = layer(i, "self_attention.linear_proj.bias")
            out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = fc1.t(), layer(i, "mlp.linear_fc1.bias")
            out[p + "mlp.c_proj.weight"] = layer(i, "mlp.linear_fc2.weight").t()
            out[p + "mlp.c_proj.bias"] = layer(i, "mlp.linear_fc2.bias")
            for hf, ours in (("ln_1", "input_norm"), ("ln_2", "pre_mlp_norm")):
                out[p + hf + ".weight"], out[p + hf + ".bias"] = layer(i, ours + ".weight"), layer(i, ours + ".bias")
        else:
            p = f"model.layers.{i}."
            out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = q, k
            out[p + "self_attn.v_proj.weight"] = val
            out[p + "self_attn.o_proj.weight"] = layer(i, "self_attention.linear_proj.weight")
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = fc1[0::2], fc1[1::2]
            out[p + "mlp.down_proj.weight"] = layer(i, "mlp.linear_fc2.weight")
            out[p + "input_layernorm.weight"] = layer(i, "input_norm.weight")
            out[p + "post_attention_layernorm.weight"] = layer(i, "pre_mlp_norm.weight")
    words = state["embedding.word_embeddings.weight"][:v]
    if _gpt2(config):
        out["transformer.wte.weight"] = words
        out["transformer.wpe.weight"] = state["embedding.position_embeddings.weight"]
        out["transformer.ln_f.weight"] = state["final_norm.weight"]
        out["transformer.ln_f.bias"] = state["final_norm.bias"]
        hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": v, "n_embd": h,
                     "n_layer": config.num_layers, "n_head": a, "n_inner": config.ffn_hidden_size,
                     "n_positions": config.max_position_embeddings, "layer_norm_epsilon": config.norm_epsilon,
                     "activation_function": "gelu_new" if config.openai_gelu else "gelu",
                     "tie_word_embeddings": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    else:
        out["model.embed_tokens.weight"], out["model.norm.weight"] = words, state["final_norm.weight"]
        out["lm_head.weight"] = (state["output_layer.weight"] if config.untie_embeddings_and_output_weights
                                 else state["embedding.word_embeddings.weight"])[:v]
        hf_config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": v, "hidden_size": h,
                     "intermediate_size": config.ffn_hidden_size, "num_hidden_layers": config.num_layers,
                     "num_attention_heads": a, "num_key_value_heads": g, "head_dim": d,
                     "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_epsilon,
                     "rope_theta": config.rotary_base, "hidden_act": "silu", "attention_bias": False,
                     "mlp_bias": False, "tie_word_embeddings": not config.untie_embeddings_and_output_weights}
    hf_config["torch_dtype"] = "float32"
    return hf_config, {name: tensor.contiguous().float() for name, tensor in out.items()}


def from_hf(hf_config: dict, hf: Tensors) -> Tuple[ModelConfig, Tensors]:
    """megalite's (ModelConfig, single-rank state dict) equal to a GPT-2 or LLaMA Hugging Face model."""
    kind = hf_config.get("model_type")
    config = _config_from_hf(kind, hf_config)
    ours: Tensors = {}
    for i in range(config.num_layers):
        ours.update(_layer_from_hf(kind, config, hf, i))
    ours.update(_ends_from_hf(kind, config, hf))
    return config, {name: tensor.float().contiguous() for name, tensor in ours.items()}


def _config_from_hf(kind: str, hf_config: dict) -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json`` of ``model_type`` ``kind``."""
    if kind == "gpt2":
        h, a = hf_config["n_embd"], hf_config["n_head"]
        return ModelConfig(num_layers=hf_config["n_layer"], hidden_size=h, num_attention_heads=a,
                           ffn_hidden_size=hf_config.get("n_inner") or 4 * h,
                           seq_length=hf_config["n_positions"], max_position_embeddings=hf_config["n_positions"],
                           vocab_size=hf_config["vocab_size"], norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-5),
                           openai_gelu=hf_config.get("activation_function", "gelu_new") != "gelu",
                           hidden_dropout=0.0, attention_dropout=0.0)
    if kind == "llama":
        h, a = hf_config["hidden_size"], hf_config["num_attention_heads"]
        config = ModelConfig(num_layers=hf_config["num_hidden_layers"], hidden_size=h, num_attention_heads=a,
                             num_query_groups=hf_config.get("num_key_value_heads") or a,
                             ffn_hidden_size=hf_config["intermediate_size"],
                             seq_length=min(hf_config["max_position_embeddings"], 4096),
                             max_position_embeddings=hf_config["max_position_embeddings"],
                             vocab_size=hf_config["vocab_size"], norm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
                             normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                             rotary_base=float(hf_config.get("rope_theta", 10000.0)), add_bias_linear=False,
                             untie_embeddings_and_output_weights=not hf_config.get("tie_word_embeddings", False),
                             hidden_dropout=0.0, attention_dropout=0.0)
        if hf_config.get("head_dim", h // a) != h // a:
            raise ValueError(f"head_dim {hf_config['head_dim']} is not hidden_size / num_attention_heads; "
                             f"megalite cannot hold this model")
        return config
    raise ValueError(f"model_type {kind!r}: only gpt2 and llama convert from Hugging Face")


def _layer_from_hf(kind: str, config: ModelConfig, hf: Tensors, i: int) -> Tensors:
    """megalite's tensors of transformer layer ``i``: the family's own, then Q, K and V fused per query group."""
    h, a, g, d = config.hidden_size, config.num_attention_heads, config.num_query_groups, config.head_dim
    (q_, k_, v_), layer = (_gpt2_layer_from_hf if kind == "gpt2" else _llama_layer_from_hf)(config, hf, i)
    p = f"decoder.layers.{i}."
    ours = {p + name: tensor for name, tensor in layer.items()}
    ours[p + "self_attention.linear_qkv.weight"] = torch.cat(
        [q_.view(g, a // g, d, h), k_.view(g, 1, d, h), v_.view(g, 1, d, h)], 1).reshape(-1, h)
    return ours


def _gpt2_layer_from_hf(config: ModelConfig, hf: Tensors, i: int) -> Tuple[tuple, Tensors]:
    """((Q, K, V) weights as [out, in], the layer's other tensors by megalite's name) of GPT-2 block ``i``."""
    h, a, d = config.hidden_size, config.num_attention_heads, config.head_dim
    q = f"transformer.h.{i}."
    qkv = hf[q + "attn.c_attn.weight"].t().split(h)
    qb, kb, vb = hf[q + "attn.c_attn.bias"].split(h)
    ours: Tensors = {}
    ours["self_attention.linear_qkv.bias"] = torch.stack([qb.view(a, d), kb.view(a, d), vb.view(a, d)], 1).reshape(-1)
    ours["self_attention.linear_proj.weight"] = hf[q + "attn.c_proj.weight"].t()
    ours["self_attention.linear_proj.bias"] = hf[q + "attn.c_proj.bias"]
    ours["mlp.linear_fc1.weight"], ours["mlp.linear_fc1.bias"] = hf[q + "mlp.c_fc.weight"].t(), hf[q + "mlp.c_fc.bias"]
    ours["mlp.linear_fc2.weight"] = hf[q + "mlp.c_proj.weight"].t()
    ours["mlp.linear_fc2.bias"] = hf[q + "mlp.c_proj.bias"]
    for hf_name, name in (("ln_1", "input_norm"), ("ln_2", "pre_mlp_norm")):
        ours[name + ".weight"] = hf[q + hf_name + ".weight"]
        ours[name + ".bias"] = hf[q + hf_name + ".bias"]
    return qkv, ours


def _llama_layer_from_hf(config: ModelConfig, hf: Tensors, i: int) -> Tuple[tuple, Tensors]:
    """((Q, K, V) weights, the layer's other tensors by megalite's name) of LLaMA layer ``i``; the SwiGLU
    fc1 interleaves gate and up rows."""
    q = f"model.layers.{i}."
    qkv = tuple(hf[q + f"self_attn.{x}_proj.weight"] for x in ("q", "k", "v"))
    ours: Tensors = {}
    ours["self_attention.linear_proj.weight"] = hf[q + "self_attn.o_proj.weight"]
    ours["mlp.linear_fc1.weight"] = torch.stack([hf[q + "mlp.gate_proj.weight"], hf[q + "mlp.up_proj.weight"]],
                                                1).reshape(-1, config.hidden_size)
    ours["mlp.linear_fc2.weight"] = hf[q + "mlp.down_proj.weight"]
    ours["input_norm.weight"] = hf[q + "input_layernorm.weight"]
    ours["pre_mlp_norm.weight"] = hf[q + "post_attention_layernorm.weight"]
    return qkv, ours


def _ends_from_hf(kind: str, config: ModelConfig, hf: Tensors) -> Tensors:
    """The embeddings, final norm and output layer, the vocabulary padded with zero rows to megalite's size."""
    padding = config.padded_vocab_size(1) - config.vocab_size   # the rows of a TP=1 model

    def padded(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows.new_zeros(padding, rows.shape[1])])
    ours: Tensors = {}
    if kind == "gpt2":
        ours["embedding.word_embeddings.weight"] = padded(hf["transformer.wte.weight"])
        ours["embedding.position_embeddings.weight"] = hf["transformer.wpe.weight"]
        ours["final_norm.weight"], ours["final_norm.bias"] = hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"]
        ours["output_layer.weight"] = ours["embedding.word_embeddings.weight"]
    else:
        ours["embedding.word_embeddings.weight"] = padded(hf["model.embed_tokens.weight"])
        ours["final_norm.weight"] = hf["model.norm.weight"]
        ours["output_layer.weight"] = padded(hf.get("lm_head.weight", hf["model.embed_tokens.weight"]))
    return ours


def export_checkpoint(load: str, save: str) -> str:
    """Write ``config.json`` + ``model.safetensors`` of the newest iteration of a megalite checkpoint."""
    from safetensors.torch import save_file

    from megalite.checkpoint.merge import merge_checkpoint
    state, settings = merge_checkpoint(load)
    config = ModelConfig.from_saved(settings["model"])
    hf_config, tensors = to_hf(state, config)
    os.makedirs(save, exist_ok=True)
    with open(os.path.join(save, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(tensors, os.path.join(save, "model.safetensors"), metadata={"format": "pt"})
    return save


def _read_hf(folder: str) -> Tuple[dict, Tensors]:
    from safetensors.torch import load_file
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors file (only safetensors checkpoints are read)")
    tensors: Tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(folder, name)))
    return hf_config, tensors


def import_checkpoint(load: str, save: str) -> str:
    """Write a TP=1, PP=1 megalite checkpoint (weights and model settings) of a Hugging Face folder."""
    import torch.distributed as dist

    from megalite.checkpoint.manifest import new_run_id
    from megalite.checkpoint.save_load import save_checkpoint
    from megalite.model.gpt import GPTModel
    from megalite.parallel import state as grid_state
    from megalite.parallel.launch import init_distributed

    config, tensors = from_hf(*_read_hf(load))
    started = not dist.is_initialized()
    init_distributed()
    grid = grid_state.initialize_grid()
    try:
        model = GPTModel(config)
        model.load_state_dict(tensors, strict=True)
        settings = {"model": dataclasses.asdict(config), "data": {"mock_data": True}}
        save_checkpoint(save, 0, [model], None, None, grid, consumed_samples=0, run_id=new_run_id(),
                        settings=settings, layer_numbers=[list(range(config.num_layers))])
    finally:
        grid_state.destroy_grid()
        if started:
            dist.destroy_process_group()
    return save


def main(argv=None, prog: str = "megalite-convert") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"], help="export a megalite checkpoint to Hugging Face")
    direction.add_argument("--from", dest="source", choices=["hf"], help="import a Hugging Face model")
    parser.add_argument("--load", required=True, help="the folder to read")
    parser.add_argument("--save", required=True, help="the folder to write")
    args = parser.parse_args(argv)
    try:
        written = export_checkpoint(args.load, args.save) if args.to else import_checkpoint(args.load, args.save)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m megalite.checkpoint.hf"))
