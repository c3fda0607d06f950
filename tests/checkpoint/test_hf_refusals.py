"""Import refuses, with one line naming it, every config field that changes the math and that megalite
does not implement, and every tensor of the safetensors file it would not use; export refuses a
model no Hugging Face family holds.  Nothing is converted silently."""
import json
import os

import pytest
import torch

from megalite.checkpoint.hf import main as convert
from megalite.checkpoint.hf_config import export_family
from megalite.config.settings import ModelConfig
from tests.checkpoint.hf_models import import_folder, save_hf
from tests.checkpoint.test_hf_import import LLAMA3, build_hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

MIXTRAL = dict(num_local_experts=4)
QWEN3_MOE = dict(num_experts=4, moe_intermediate_size=16)
# name: (transformers class, config fields, the words the one-line refusal must hold)
REFUSED_FIELDS = {
    "gpt2-relu": ("GPT2", dict(activation_function="relu"), "activation_function='relu'"),
    "gpt2-unscaled": ("GPT2", dict(scale_attn_weights=False), "scale_attn_weights=False"),
    "gpt2-layer-scaled": ("GPT2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    "neox-parallel-residual": ("GPTNeoX", dict(use_parallel_residual=True), "use_parallel_residual=True"),
    "neox-no-bias": ("GPTNeoX", dict(use_parallel_residual=False, attention_bias=False), "attention_bias=False"),
    "neox-relu": ("GPTNeoX", dict(use_parallel_residual=False, hidden_act="relu"), "hidden_act='relu'"),
    "gpt2-cross-attention": ("GPT2", dict(add_cross_attention=True), "add_cross_attention=True"),
    "llama-pretraining-tp": ("Llama", dict(pretraining_tp=2), "pretraining_tp=2"),
    "llama-gelu": ("Llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    "llama-attention-bias-alone": ("Llama", dict(attention_bias=True), "attention_bias=True"),
    "llama-mlp-bias-alone": ("Llama", dict(mlp_bias=True), "mlp_bias=True"),
    "llama-yarn": ("Llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                  "original_max_position_embeddings": 4096}),
                   "rope_parameters.rope_type='yarn'"),
    "llama3-other-low-freq": ("Llama", dict(rope_parameters={**LLAMA3, "low_freq_factor": 2.0}),
                              "rope_parameters.low_freq_factor=2.0"),
    "llama-partial-rotary": ("Llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                            "partial_rotary_factor": 0.5}),
                             "partial_rotary_factor=0.5"),
    "mistral-sliding-window": ("Mistral", dict(sliding_window=64), "sliding_window=64"),
    # Mistral v0.1: a window of 4,096 under 32,768 positions would bite once training runs longer sequences.
    "mistral-window-below-positions": ("Mistral", dict(sliding_window=4096, max_position_embeddings=32768),
                                       "and the model takes sequences of up to 32768 tokens"),
    "qwen2-sliding-window": ("Qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=0),
                             "sliding_window=64"),
    "qwen3-attention-bias": ("Qwen3", dict(head_dim=16, attention_bias=True), "attention_bias=True"),
    "mixtral-router-jitter": ("Mixtral", dict(MIXTRAL, router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    "mixtral-sliding-window": ("Mixtral", dict(MIXTRAL, sliding_window=64), "sliding_window=64"),
    "qwen3-moe-sliding-window": ("Qwen3Moe", dict(QWEN3_MOE, use_sliding_window=True, sliding_window=64),
                                 "sliding_window=64"),
    "qwen2-moe-sliding-window": ("Qwen2Moe", dict(QWEN3_MOE, shared_expert_intermediate_size=16,
                                                 use_sliding_window=True, sliding_window=64, max_window_layers=2),
                                 "sliding_window=64"),
}


def _refusal(folder, capsys) -> str:
    capsys.readouterr()   # what saving the model printed
    assert convert(["--from", "hf", "--load", folder, "--save", folder + "-megalite"]) == 2
    assert not os.path.exists(folder + "-megalite")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case", REFUSED_FIELDS)
def test_a_field_megalite_does_not_implement_is_refused_by_name(tmp_path, capsys, case):
    kind, fields, words = REFUSED_FIELDS[case]
    folder = save_hf(build_hf(kind, fields), str(tmp_path / "hf"))
    assert words in _refusal(folder, capsys)


def test_another_model_type_is_refused(tmp_path, capsys):
    folder = str(tmp_path / "hf")
    transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=32, word_embed_proj_dim=32)).save_pretrained(folder)
    assert "model_type='opt'" in _refusal(folder, capsys)


def test_a_model_other_than_the_causal_language_model_is_refused(tmp_path, capsys):
    folder = save_hf(build_hf("Llama", {}), str(tmp_path / "hf"))
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config["architectures"] = ["LlamaForSequenceClassification"]
    json.dump(config, open(path, "w"))
    assert "architectures='LlamaForSequenceClassification'" in _refusal(folder, capsys)


def _rewrite(folder, change):
    from safetensors.torch import load_file, save_file
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_an_unused_tensor_is_refused_by_name(tmp_path, capsys):
    folder = save_hf(build_hf("Llama", {}), str(tmp_path / "hf"))
    _rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(32)}))
    assert "model.layers.0.self_attn.o_proj.bias" in _refusal(folder, capsys)


def test_a_tied_model_whose_lm_head_differs_from_the_embedding_is_refused(tmp_path, capsys):
    folder = save_hf(build_hf("Llama", dict(tie_word_embeddings=True)), str(tmp_path / "hf"))
    _rewrite(folder, lambda t: t.update({"lm_head.weight": torch.ones(100, 32)}))
    assert "lm_head.weight differs" in _refusal(folder, capsys)
    # ... while an lm_head equal to the embedding is taken.
    _rewrite(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    import_folder(folder)


def test_a_missing_tensor_is_named(tmp_path, capsys):
    folder = save_hf(build_hf("Qwen2", {}), str(tmp_path / "hf"))
    _rewrite(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    assert "model.layers.1.self_attn.k_proj.bias" in _refusal(folder, capsys)


def test_gpt2s_causal_mask_buffers_are_the_only_tensors_ignored(tmp_path):
    folder = save_hf(build_hf("GPT2", {}), str(tmp_path / "hf"))
    _rewrite(folder, lambda t: t.update({"transformer.h.0.attn.bias": torch.ones(1, 1, 32, 32).tril(),
                                         "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}))
    import_folder(folder)


def _model(**fields):
    base = dict(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=100, seq_length=16)
    return ModelConfig(**{**base, **fields})


LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False)
MOE = dict(LLAMA, num_experts=4)
REFUSED_EXPORTS = {
    "gpt-gqa": (dict(num_query_groups=2), "one key/value group per head"),
    "gpt-kv-channels": (dict(kv_channels=16), "head dim = hidden / heads"),
    "gpt-qk-layernorm": (dict(qk_layernorm=True), "no --qk-layernorm"),
    "gpt-rmsnorm": (dict(normalization="RMSNorm"), "--normalization LayerNorm"),
    "rope-layernorm-swiglu": (dict(LLAMA, normalization="LayerNorm"), "--normalization RMSNorm"),
    "rope-rmsnorm-gelu": (dict(LLAMA, swiglu=False), "--swiglu"),
    "neox-gqa": (dict(position_embedding_type="rope", num_query_groups=2), "one key/value group per head"),
    "neox-no-bias": (dict(position_embedding_type="rope", add_bias_linear=False), "linear biases"),
    "rotary-percent": (dict(LLAMA, rotary_percent=0.5), "--rotary-percent 1"),
    "two-rope-scalings": (dict(LLAMA, use_rope_scaling=True, rotary_seq_len_interpolation_factor=2.0),
                          "not both --use-rope-scaling"),
    "qk-norm-with-qkv-bias": (dict(LLAMA, qk_layernorm=True, add_qkv_bias=True), "no --add-qkv-bias"),
    "no-positions": (dict(position_embedding_type="none"), "--position-embedding-type none"),
    "moe-learned-positions": (dict(add_bias_linear=False, num_experts=4), "Mixtral and Qwen3-MoE have RoPE"),
    "moe-every-other-layer": (dict(MOE, num_layers=2, moe_layer_freq=2), "--moe-layer-freq 1"),
    "moe-layer-list": (dict(MOE, num_layers=3, moe_layer_freq="[1,1,0]"), "--moe-layer-freq 1"),
    "moe-ungated-shared-expert": (dict(MOE, moe_shared_expert_intermediate_size=16),
                                  "--moe-shared-expert-gate with a shared expert"),
    "moe-shared-expert-and-qk-norm": (dict(MOE, moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True,
                                           qk_layernorm=True), "no --qk-layernorm with a shared expert"),
    "moe-sigmoid": (dict(MOE, moe_router_score_function="sigmoid"), "--moe-router-score-function softmax"),
    "moe-topk-scaling": (dict(MOE, moe_router_topk_scaling_factor=2.0), "no --moe-router-topk-scaling-factor"),
    "moe-expert-bias": (dict(MOE, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
                        "no --moe-router-enable-expert-bias"),
    "moe-token-dropping": (dict(MOE, moe_expert_capacity_factor=1.0), "no --moe-expert-capacity-factor"),
    "moe-qkv-bias": (dict(MOE, add_qkv_bias=True), "no --add-qkv-bias without a shared expert"),
    "moe-expert-biases": (dict(MOE, add_bias_linear=True), "it needs --disable-bias-linear"),
    "moe-pre-softmax-without-qk-norm": (dict(MOE, moe_router_pre_softmax=True),
                                        "--moe-router-pre-softmax without --qk-layernorm"),
}


@pytest.mark.parametrize("case", REFUSED_EXPORTS)
def test_export_refuses_a_model_no_family_holds(case):
    fields, words = REFUSED_EXPORTS[case]
    with pytest.raises(ValueError, match=words.replace("+", r"\+")) as refused:
        export_family(_model(**fields))
    assert "\n" not in str(refused.value)


def test_legacy_config_json_fields_are_read_as_transformers_resolves_them(tmp_path):
    """A config.json that only a dict reading would get wrong: rope_theta outside rope_parameters."""
    folder = save_hf(build_hf("Llama", {}), str(tmp_path / "hf"), {"rope_theta": 123456.0})
    assert "rope_parameters" not in json.load(open(os.path.join(folder, "config.json")))
    assert import_folder(folder)[1].rotary_base == 123456.0


def test_transformers_older_than_5_is_refused_in_one_line():
    """Older releases leave Llama 3's rope_scaling and GPT-NeoX's rotary_pct outside rope_parameters,
    which the import reads: converting with them would drop the scaling silently."""
    from megalite.checkpoint import hf_config
    with pytest.raises(ValueError, match=r"this is transformers 4\.57\.1: pip install 'transformers>=5'"):
        hf_config.check_transformers_version("4.57.1")
    hf_config.check_transformers_version("5.0.0")
    hf_config.check_transformers_version(transformers.__version__)    # the one installed here


def test_a_layer_list_of_experts_everywhere_exports_as_every_layer():
    assert export_family(_model(**MOE, num_layers=2, moe_layer_freq="[1]*2")) == export_family(_model(**MOE))
