"""Export: every model megalite can build that a Hugging Face family holds (tied ones included) loads in
transformers and gives megalite's logits (float32, 1e-5, peaked attention), and comes back through
import as the same tensors."""
import json
import os

import pytest
import torch

from megalite.checkpoint.hf import to_hf
from megalite.config.settings import ModelConfig
from megalite.model.gpt import GPTModel
from tests.checkpoint.hf_models import (
    ATOL,
    MLP_GAIN,
    VOCAB,
    WRONG,
    hf_logits_and_loss,
    import_folder,
    megalite_logits_and_loss,
    peak_megalite_attention,
    tokens_and_positions,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
             num_query_groups=2, rotary_base=500000.0)
# name: (ModelConfig fields, the Hugging Face architecture it must export as)
VARIANTS = {
    "gpt2": (dict(openai_gelu=True), "GPT2LMHeadModel"),
    "gpt2-exact-gelu-untied": (dict(untie_embeddings_and_output_weights=True), "GPT2LMHeadModel"),
    "gpt2-layernorm-1p": (dict(apply_layernorm_1p=True, openai_gelu=True), "GPT2LMHeadModel"),
    "gpt2-padded-vocab": (dict(fixed_padded_vocab_size=112), "GPT2LMHeadModel"),
    "neox": (dict(position_embedding_type="rope", rotary_percent=0.5, untie_embeddings_and_output_weights=True),
             "GPTNeoXForCausalLM"),
    "neox-tied-1p-llama3": (dict(position_embedding_type="rope", openai_gelu=True, apply_layernorm_1p=True,
                                 use_rope_scaling=True, rotary_base=500000.0), "GPTNeoXForCausalLM"),
    "llama-untied": (dict(LLAMA, untie_embeddings_and_output_weights=True), "LlamaForCausalLM"),
    "llama-tied": (dict(LLAMA), "LlamaForCausalLM"),
    "llama-biases": (dict(LLAMA, add_bias_linear=True), "LlamaForCausalLM"),
    "llama-kv-channels": (dict(LLAMA, kv_channels=16), "LlamaForCausalLM"),
    "llama3-scaling": (dict(LLAMA, use_rope_scaling=True, rope_scaling_factor=8.0), "LlamaForCausalLM"),
    "llama-linear-interpolation": (dict(LLAMA, rotary_seq_len_interpolation_factor=4.0), "LlamaForCausalLM"),
    "llama-rmsnorm-1p": (dict(LLAMA, apply_layernorm_1p=True), "LlamaForCausalLM"),
    "qwen2": (dict(LLAMA, add_qkv_bias=True, untie_embeddings_and_output_weights=True), "Qwen2ForCausalLM"),
    "qwen2-tied": (dict(LLAMA, add_qkv_bias=True), "Qwen2ForCausalLM"),
    "qwen3": (dict(LLAMA, qk_layernorm=True, kv_channels=16), "Qwen3ForCausalLM"),
    "qwen3-untied-llama3": (dict(LLAMA, qk_layernorm=True, kv_channels=16, use_rope_scaling=True,
                                 untie_embeddings_and_output_weights=True), "Qwen3ForCausalLM"),
}


def build_megalite(fields) -> GPTModel:
    config = ModelConfig(**{**dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                                   seq_length=16, max_position_embeddings=32, vocab_size=VOCAB,
                                   make_vocab_size_divisible_by=64, hidden_dropout=0.0, attention_dropout=0.0,
                                   seed=9), **fields})
    model = GPTModel(config).eval()
    with torch.no_grad():   # every bias and norm away from 0 / 1; MLP and logits O(1) (hf_models.py)
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
            elif "mlp" in name or "word_embeddings" in name or "output_layer" in name:
                param.mul_(MLP_GAIN)
    peak_megalite_attention(model)
    return model


def export(model: GPTModel, folder: str) -> str:
    from safetensors.torch import save_file
    hf_config, tensors = to_hf(dict(model.state_dict()), model.config)
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    json.dump(hf_config, open(os.path.join(folder, "config.json"), "w"))
    return folder


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_gives_megalite_logits_in_transformers_and_imports_back(tmp_path, variant):
    fields, architecture = VARIANTS[variant]
    ours = build_megalite(fields)
    folder = export(ours, str(tmp_path / "hf"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(theirs).__name__ == architecture
    ids, positions, labels = tokens_and_positions(ours.config.position_embedding_type == "rope")
    their_logits, their_loss = hf_logits_and_loss(theirs, ids, positions, labels)
    logits, loss = megalite_logits_and_loss(ours, ids, positions, labels)
    torch.testing.assert_close(their_logits, logits, rtol=0, atol=ATOL)
    assert their_loss == pytest.approx(loss, abs=ATOL)
    tied = not ours.config.untie_embeddings_and_output_weights
    assert theirs.config.tie_word_embeddings == tied
    if tied:   # transformers holds one tensor for both
        assert theirs.get_output_embeddings().weight.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()
    # Back through import: the same function (1p weights come back as plain gamma, padding as zeros).
    again, _ = import_folder(folder)
    torch.testing.assert_close(megalite_logits_and_loss(again, ids, positions, labels)[0], logits, rtol=0, atol=ATOL)


def test_export_is_sensitive_to_the_rope_base(tmp_path):
    ours = build_megalite(VARIANTS["llama-untied"][0])
    folder = export(ours, str(tmp_path / "hf"))
    config = json.load(open(os.path.join(folder, "config.json")))
    config["rope_parameters"]["rope_theta"] = 10000.0
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, positions, labels = tokens_and_positions(True)
    wrong, _ = hf_logits_and_loss(theirs, ids, positions, labels)
    assert (wrong - megalite_logits_and_loss(ours, ids, positions, labels)[0]).abs().max() > WRONG


def test_tied_export_saves_one_embedding_without_shared_memory(tmp_path):
    from safetensors.torch import load_file
    folder = export(build_megalite(VARIANTS["llama-tied"][0]), str(tmp_path / "hf"))
    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert "lm_head.weight" not in saved and saved["model.embed_tokens.weight"].shape == (VOCAB, 32)
