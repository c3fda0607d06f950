"""The model switches Hugging Face models need, on one process: --add-qkv-bias, --qk-layernorm,
--kv-channels, --use-rope-scaling, --rotary-percent, --apply-layernorm-1p, --padded-vocab-size and the
position-embedding spellings; each changes what it should, and the parameter count follows."""
import math

import pytest
import torch

from megalite.config.settings import ModelConfig
from megalite.model import flops
from megalite.model.gpt import GPTModel
from megalite.model.rotary import apply_rotary, inverse_frequencies, rotary_tables

LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, num_query_groups=2,
             add_bias_linear=False)


def config(**overrides):
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=16,
                  vocab_size=50, make_vocab_size_divisible_by=16, hidden_dropout=0.0, attention_dropout=0.0, seed=5)
    fields.update(overrides)
    return ModelConfig(**fields)


def logits(model, seed=0):
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


FEATURES = {
    "qkv-bias": dict(LLAMA, add_qkv_bias=True),
    "qk-layernorm": dict(LLAMA, qk_layernorm=True),
    "qk-layernorm-gpt": dict(qk_layernorm=True),
    "kv-channels": dict(LLAMA, kv_channels=12),
    "rotary-percent": dict(LLAMA, rotary_percent=0.5),
    "layernorm-1p": dict(apply_layernorm_1p=True),
    "no-position": dict(no_position_embedding=True),
    "padded-vocab": dict(LLAMA, fixed_padded_vocab_size=60, untie_embeddings_and_output_weights=True),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_parameter_count_is_the_models(feature):
    cfg = config(**FEATURES[feature])
    model = GPTModel(cfg)
    assert flops.count_parameters(cfg, tp=1) == sum(p.numel() for p in model.parameters())


def test_qkv_bias_is_on_qkv_alone_even_without_linear_biases():
    model = GPTModel(config(**FEATURES["qkv-bias"]))
    attention = model.decoder.layers[0].self_attention
    assert attention.linear_qkv.bias is not None and attention.linear_proj.bias is None
    assert model.decoder.layers[0].mlp.linear_fc1.bias is None
    before = logits(model)
    with torch.no_grad():
        attention.linear_qkv.bias.add_(0.5)
    assert not torch.allclose(before, logits(model))


def test_qk_layernorm_normalizes_each_heads_query_and_key():
    for fields, shapes in ((FEATURES["qk-layernorm"], [(8,)]), (FEATURES["qk-layernorm-gpt"], [(8,), (8,)])):
        attention = GPTModel(config(**fields)).decoder.layers[0].self_attention
        assert [p.shape for p in attention.q_layernorm.parameters()] == shapes
        assert [p.shape for p in attention.k_layernorm.parameters()] == shapes
    model = GPTModel(config(**FEATURES["qk-layernorm"]))
    before = logits(model)
    with torch.no_grad():   # scaling the query and key projections does not move normalized queries and keys
        qkv = model.decoder.layers[0].self_attention.linear_qkv.weight.view(2, 2 + 2, 8, 32)   # [g, q q k v, d, h]
        qkv[:, :3].mul_(3.0)
    after_scale = logits(model)
    torch.testing.assert_close(before, after_scale, rtol=0, atol=1e-4)
    with torch.no_grad():
        model.decoder.layers[0].self_attention.q_layernorm.weight.mul_(2.0)
    assert not torch.allclose(before, logits(model), atol=1e-3)


def test_kv_channels_sets_the_head_dimension():
    cfg = config(**FEATURES["kv-channels"])
    attention = GPTModel(cfg).decoder.layers[0].self_attention
    assert attention.linear_qkv.weight.shape == ((4 + 2 * 2) * 12, 32)
    assert attention.linear_proj.weight.shape == (32, 4 * 12)
    with pytest.raises(ValueError, match="--kv-channels"):
        config(hidden_size=30, num_attention_heads=4)
    assert config(hidden_size=30, num_attention_heads=4, kv_channels=8).head_dim == 8


def test_llama3_rope_scaling_keeps_short_wavelengths_and_stretches_long_ones():
    base = inverse_frequencies(128, 500000.0)
    scaled = inverse_frequencies(128, 500000.0, llama3_factor=8.0)
    wavelength = 2 * math.pi / base
    assert torch.equal(scaled[wavelength < 8192 / 4], base[wavelength < 8192 / 4])
    torch.testing.assert_close(scaled[wavelength > 8192], base[wavelength > 8192] / 8.0)
    middle = (wavelength >= 2048) & (wavelength <= 8192)
    assert middle.any() and bool(((scaled[middle] < base[middle]) & (scaled[middle] > base[middle] / 8)).all())


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(inverse_frequencies(128, 500000.0, llama3_factor=8.0), theirs, rtol=0, atol=0)


def test_rotary_percent_turns_only_the_first_dimensions():
    cfg = config(**FEATURES["rotary-percent"])   # head dim 8, 4 rotated
    x = torch.randn(6, 2, 3, 8, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(6).repeat(2, 1)
    cos, sin = rotary_tables(positions, 4, cfg.rotary_base)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])
    torch.testing.assert_close(out[..., :4], apply_rotary(x[..., :4].contiguous(), cos, sin))
    assert not torch.allclose(out[1:, ..., :4], x[1:, ..., :4])
    with pytest.raises(ValueError, match="--rotary-percent 0.4"):
        config(**dict(LLAMA, rotary_percent=0.4))     # 3 of 8 dimensions: pairs cannot cover them
    with pytest.raises(ValueError, match="--rotary-percent needs --position-embedding-type rope"):
        config(rotary_percent=0.5)


def test_layernorm_1p_stores_gamma_minus_one():
    for norm in ("LayerNorm", "RMSNorm"):
        plain, one_p = GPTModel(config(normalization=norm)), GPTModel(config(normalization=norm,
                                                                             apply_layernorm_1p=True))
        assert torch.equal(one_p.final_norm.weight, torch.zeros(32))
        torch.testing.assert_close(logits(one_p), logits(plain), rtol=0, atol=0)
        with torch.no_grad():
            one_p.final_norm.weight.fill_(1.0)   # gamma 2
            plain.final_norm.weight.fill_(2.0)
        torch.testing.assert_close(logits(one_p), logits(plain), rtol=0, atol=0)


def test_padded_vocab_size_is_taken_as_given_and_checked():
    cfg = config(**FEATURES["padded-vocab"])
    assert cfg.padded_vocab_size(1) == cfg.padded_vocab_size(2) == 60
    assert logits(GPTModel(cfg)).shape[-1] == 60
    with pytest.raises(ValueError, match="--padded-vocab-size 62 is not divisible by --tensor-model-parallel-size 4"):
        config(fixed_padded_vocab_size=62).check_tensor_parallel(4)
    config(fixed_padded_vocab_size=64).check_tensor_parallel(4)
    with pytest.raises(ValueError, match="--padded-vocab-size 40 is below the vocabulary size 50"):
        config(fixed_padded_vocab_size=40)


def test_position_embedding_spellings():
    assert config(use_rotary_position_embeddings=True).position_embedding_type == "rope"
    none = config(no_position_embedding=True)
    assert none.position_embedding_type == "none" and not none.no_position_embedding
    assert GPTModel(none).embedding.position_embeddings is None
    # Megatron's Llama/Qwen configurations give both: RoPE, no learned table.
    assert config(no_position_embedding=True, position_embedding_type="rope").position_embedding_type == "rope"
    assert config(no_position_embedding=True, use_rotary_position_embeddings=True).position_embedding_type == "rope"
    with pytest.raises(ValueError, match="--use-rotary-position-embeddings contradicts --position-embedding-type none"):
        config(use_rotary_position_embeddings=True, position_embedding_type="none")
    # Without positions one layer's last output does not depend on the order of the tokens before it.
    ids = torch.randint(0, 50, (1, 16), generator=torch.Generator().manual_seed(2))
    shuffled = torch.cat([ids[:, :15].flip(1), ids[:, 15:]], dim=1)
    for cfg, same in ((config(num_layers=1, no_position_embedding=True), True), (config(num_layers=1), False)):
        model = GPTModel(cfg)
        with torch.no_grad():
            last, last_shuffled = model(ids)[-1], model(shuffled)[-1]
        assert torch.allclose(last, last_shuffled, atol=1e-5) == same


def test_megatron_flags_reach_the_fields():
    from megalite.training.arguments import parse_args
    model = parse_args(["--mock-data", "--add-qkv-bias", "--qk-layernorm", "--kv-channels", "16",
                        "--use-rotary-position-embeddings", "--rotary-percent", "0.5", "--use-rope-scaling",
                        "--rope-scaling-factor", "32", "--apply-layernorm-1p", "--padded-vocab-size", "512",
                        "--normalization", "RMSNorm"])[0]
    assert (model.add_qkv_bias, model.qk_layernorm, model.kv_channels, model.position_embedding_type,
            model.rotary_percent, model.use_rope_scaling, model.rope_scaling_factor, model.apply_layernorm_1p,
            model.padded_vocab_size(1)) == (True, True, 16, "rope", 0.5, True, 32.0, True, 512)


def test_the_performance_models_gemms_have_the_models_shapes_with_kv_channels():
    from megalite.scaling.compute import layer_gemms
    cfg = config(**FEATURES["kv-channels"])
    attention = GPTModel(cfg).decoder.layers[0].self_attention
    gemms = {gemm.name: gemm for gemm in layer_gemms(cfg, micro_batch=1, tp=1)}
    assert (gemms["qkv"].n, gemms["qkv"].k) == tuple(attention.linear_qkv.weight.shape)
    assert (gemms["proj"].n, gemms["proj"].k) == tuple(attention.linear_proj.weight.shape)
