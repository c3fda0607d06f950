"""Shared helpers of the Hugging Face tests: tiny transformers models with PEAKED attention, megalite's
and transformers' logits on the same tokens and positions, in float32.

A random tiny model attends almost uniformly (its scores are ~0.02), so a wrong position encoding
would hardly move its logits; scaling the query and key projections (or, with --qk-layernorm, the
q/k norms) by PEAK makes the scores O(10) and the attention position-sensitive; the MLP's
projections and the embedding are scaled by MLP_GAIN so that the activation works outside its
near-linear range and the logits are O(1).  The RoPE models read positions 397 apart (offsets up to
~6000), where Llama 3's scaling of the long wavelengths changes the angles.
"""
from __future__ import annotations

import json
import os

import torch

from megalite.checkpoint.hf import _read_hf, from_hf
from megalite.model.gpt import GPTModel

PEAK = 6.0
MLP_GAIN = 20.0
VOCAB, SEQ = 100, 16
# float32 round-off between two implementations of the same sums (fused vs separate projections,
# another summation order in the norms): ~1e-6 on O(1) logits.
ATOL = 1e-5
# A conversion that gets one thing wrong moves the peaked logits by more than this (10 x ATOL).
WRONG = 1e-4


def tokens_and_positions(rope: bool, seed: int = 0):
    ids = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    positions = (torch.arange(SEQ) * 397 if rope else torch.arange(SEQ) + 10).expand(2, SEQ)
    return ids[:, :-1].contiguous(), positions.contiguous(), ids[:, 1:].contiguous()


@torch.no_grad()
def peak_hf_attention(model) -> None:
    """Scale the query and key projections (q/k norms where the model has them) by PEAK, the MLP's input
    projection by MLP_GAIN."""
    has_qk_norm = any(name.endswith("q_norm.weight") for name, _ in model.named_parameters())
    for name, param in model.named_parameters():
        if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
            param.mul_(PEAK)
        elif name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")) and not has_qk_norm:
            param.mul_(PEAK)
        elif name.endswith("attn.c_attn.weight"):           # GPT-2's Conv1D: [h, 3h], q and k first
            param[:, :2 * param.shape[0]].mul_(PEAK)
        elif name.endswith("attention.query_key_value.weight"):   # GPT-NeoX: [q | k | v] per head
            heads = model.config.num_attention_heads
            param.view(heads, 3, -1, param.shape[1])[:, :2].mul_(PEAK)
        elif name.endswith(("mlp.c_fc.weight", "mlp.gate_proj.weight", "mlp.c_proj.weight", "mlp.down_proj.weight",
                            "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")):
            param.mul_(MLP_GAIN)   # pre-activations O(1), where the activation's exact shape shows
        elif name.endswith(("wte.weight", "embed_tokens.weight", "lm_head.weight", "embed_in.weight",
                            "embed_out.weight")):
            param.mul_(MLP_GAIN)   # logits O(1) rather than O(0.1)


@torch.no_grad()
def peak_megalite_attention(model: GPTModel) -> None:
    config = model.config
    a, g, d = config.num_attention_heads, config.num_query_groups, config.head_dim
    for layer in model.decoder.layers:
        attention = layer.self_attention
        if attention.q_layernorm is not None:
            attention.q_layernorm.weight.add_(1.0 if config.apply_layernorm_1p else 0.0).mul_(PEAK)
            attention.k_layernorm.weight.add_(1.0 if config.apply_layernorm_1p else 0.0).mul_(PEAK)
            continue
        weight = attention.linear_qkv.weight.view(g, a // g + 2, d, -1)
        weight[:, :a // g + 1].mul_(PEAK)


def save_hf(model, folder: str, legacy_rope: dict = None) -> str:
    """save_pretrained; ``legacy_rope``: rewrite config.json's RoPE as transformers 4 wrote it."""
    model.save_pretrained(folder, safe_serialization=True)
    if legacy_rope is not None:
        path = os.path.join(folder, "config.json")
        config = json.load(open(path))
        config.pop("rope_parameters", None)
        config.update(legacy_rope)
        json.dump(config, open(path, "w"))
    return folder


def import_folder(folder: str):
    """(megalite model with the imported weights, its config)."""
    config, state = from_hf(*_read_hf(folder))
    model = GPTModel(config).eval()
    model.load_state_dict(state, strict=True)
    return model, config


@torch.no_grad()
def megalite_logits_and_loss(model: GPTModel, ids, positions, labels):
    logits = model(ids, positions).float().permute(1, 0, 2)[..., :model.config.vocab_size]
    loss = model(ids, positions, labels=labels).mean().item()
    return logits, loss


@torch.no_grad()
def hf_logits_and_loss(model, ids, positions, labels):
    logits = model(ids, position_ids=positions).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()
    return logits, loss
