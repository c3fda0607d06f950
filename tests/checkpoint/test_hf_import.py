"""Import: each Hugging Face architecture and variant megalite converts, saved by transformers with
peaked attention (hf_models.py), gives transformers' logits and loss in megalite (float32, 1e-5); and
each test is shown to be sensitive: the conversion a silent mistake would have made (a wrong RoPE
base, no Llama 3 scaling, the other GELU, a dropped bias, ...) moves the logits by more than 1e-3."""
import dataclasses

import pytest
import torch

from tests.checkpoint.hf_models import (
    ATOL,
    SEQ,
    VOCAB,
    WRONG,
    hf_logits_and_loss,
    import_folder,
    megalite_logits_and_loss,
    peak_hf_attention,
    save_hf,
    tokens_and_positions,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LLAMA_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=16384, bos_token_id=0, eos_token_id=0)
GPT2_SHAPE = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
NEOX_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16384, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0,
                  eos_token_id=0)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _zero(name_part):
    def wrong(config, state):
        for name in state:
            if name_part in name:
                state[name] = torch.zeros_like(state[name])
        return config, state
    return wrong


def _config_change(**fields):
    return lambda config, state: (dataclasses.replace(config, **fields), state)


def _untie(config, state):
    state["output_layer.weight"] = state["embedding.word_embeddings.weight"]
    return config, state


# name: (transformers class, config fields, legacy config.json RoPE fields or None, the silent mistake)
VARIANTS = {
    "gpt2": ("GPT2", {}, None, _config_change(openai_gelu=False)),
    "gpt2-exact-gelu": ("GPT2", dict(activation_function="gelu"), None, _config_change(openai_gelu=True)),
    "gpt2-pytorch-tanh": ("GPT2", dict(activation_function="gelu_pytorch_tanh"), None,
                          _config_change(openai_gelu=False)),
    "gpt2-untied": ("GPT2", dict(tie_word_embeddings=False), None, _untie),
    # Upcasting the attention product changes its precision only: in float32 it is the same function.
    "gpt2-reorder-upcast": ("GPT2", dict(reorder_and_upcast_attn=True, n_inner=80), None,
                            _config_change(openai_gelu=False)),
    "neox": ("GPTNeoX", dict(use_parallel_residual=False), None, _config_change(rotary_percent=0.5)),
    "neox-tied-full-rotary-tanh": ("GPTNeoX", dict(use_parallel_residual=False, tie_word_embeddings=True,
                                                   hidden_act="gelu_new", rope_parameters={
                                                       "rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 1.0}),
                                   None, _config_change(openai_gelu=False)),
    "llama": ("Llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), None,
              _config_change(rotary_base=10000.0)),
    "llama-tied": ("Llama", dict(tie_word_embeddings=True), None, _config_change(rotary_base=500000.0)),
    "llama3-scaling": ("Llama", dict(rope_parameters=LLAMA3), None, _config_change(use_rope_scaling=False)),
    "llama3-legacy-json": ("Llama", dict(rope_parameters=LLAMA3),
                           {"rope_theta": 500000.0, "rope_scaling": {
                               **{k: v for k, v in LLAMA3.items() if k not in ("rope_type", "rope_theta")},
                               "type": "llama3"}},
                           _config_change(rotary_base=10000.0)),
    "llama-linear-legacy": ("Llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}),
                            {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
                            _config_change(rotary_seq_len_interpolation_factor=None)),
    "llama-biases": ("Llama", dict(attention_bias=True, mlp_bias=True), None, _zero("linear_qkv.bias")),
    "llama-head-dim": ("Llama", dict(head_dim=16), None, _config_change(rotary_base=500000.0)),
    "mistral": ("Mistral", dict(sliding_window=None, max_position_embeddings=32768), None,
                _config_change(rotary_base=500000.0)),
    "qwen2": ("Qwen2", {}, None, _zero("linear_qkv.bias")),
    "qwen2-tied": ("Qwen2", dict(tie_word_embeddings=True), None, _zero("linear_qkv.bias")),
    "qwen3": ("Qwen3", dict(head_dim=16), None, _config_change(rotary_base=500000.0)),
    "qwen3-tied-llama3": ("Qwen3", dict(head_dim=16, tie_word_embeddings=True, rope_parameters=LLAMA3), None,
                          _config_change(use_rope_scaling=False)),
}


def build_hf(kind: str, fields: dict):
    torch.manual_seed(3)
    shape = {"GPT2": GPT2_SHAPE, "GPTNeoX": NEOX_SHAPE}.get(kind, LLAMA_SHAPE)
    config = getattr(transformers, f"{kind}Config")(**{**shape, **fields})
    model = getattr(transformers, "GPT2LMHeadModel" if kind == "GPT2" else f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():   # make every bias and norm matter (they start at 0 and 1)
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.split(".")[-2].startswith("ln"):
                param.add_(0.1 * torch.randn(param.shape))
    peak_hf_attention(model)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_gives_transformers_logits_and_loss(tmp_path, variant):
    kind, fields, legacy, wrong = VARIANTS[variant]
    hf_model = build_hf(kind, fields)
    folder = save_hf(hf_model, str(tmp_path / "hf"), legacy)
    ours, config = import_folder(folder)
    ids, positions, labels = tokens_and_positions(config.position_embedding_type == "rope")
    theirs, their_loss = hf_logits_and_loss(hf_model, ids, positions, labels)
    logits, loss = megalite_logits_and_loss(ours, ids, positions, labels)
    torch.testing.assert_close(logits, theirs, rtol=0, atol=ATOL)
    assert loss == pytest.approx(their_loss, abs=ATOL)
    # Sensitivity: the conversion with one silent mistake gives other logits.
    from megalite.model.gpt import GPTModel
    bad_config, bad_state = wrong(config, dict(ours.state_dict()))
    bad = GPTModel(bad_config).eval()
    bad.load_state_dict(bad_state, strict=True)
    bad_logits, _ = megalite_logits_and_loss(bad, ids, positions, labels)
    assert (bad_logits - theirs).abs().max().item() > WRONG


def test_peaked_models_are_position_sensitive():
    """Moving the later half of the tokens one position on changes the logits of the imported RoPE and
    learned-position models (offsets changed), while a shift of every position leaves RoPE's alone."""
    for kind, fields, rope in (("Llama", VARIANTS["llama"][1], True), ("GPT2", {}, False)):
        hf_model = build_hf(kind, fields)
        ids, positions, _ = tokens_and_positions(rope)
        moved = positions.clone()
        moved[:, SEQ // 2:] += 1
        with torch.no_grad():
            logits = hf_model(ids, position_ids=positions).logits
            assert (hf_model(ids, position_ids=moved).logits - logits).abs().max() > WRONG
            if rope:
                torch.testing.assert_close(hf_model(ids, position_ids=positions + 5).logits, logits,
                                           rtol=0, atol=1e-4)
