"""Parameter and FLOP counts against hand-computed numbers."""
import pytest

from megalite.config.settings import ModelConfig
from megalite.model import flops


def test_flops_hand_computed_gpt():
    # L=2, h=64, a=4 heads (g=4), f=256, s=32, V=256 (already a multiple of 128), batch 8.
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256)
    s, h, L, V, f, B = 32, 64, 2, 256, 256, 8
    # Forward per token per layer: QKV 2h*3h, scores+values 4sh, projection 2h^2, MLP 4hf.
    forward_per_token = L * (2 * h * 3 * h + 4 * s * h + 2 * h * h + 4 * h * f) + 2 * h * V
    expected = 3 * B * s * forward_per_token          # backward = 2 x forward
    assert expected == 12 * B * s * L * h * h * (1 + 1 + s / h + f / h + V / (2 * L * h))
    assert flops.flops_per_iteration(cfg, B, tp=1) == pytest.approx(expected, rel=1e-12)
    assert expected == 188_743_680   # 768 x 245,760 FLOPs per token forward


def test_flops_gqa_and_swiglu():
    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=128,
                      seq_length=16, vocab_size=100, make_vocab_size_divisible_by=64, swiglu=True)
    s, h, V, f = 16, 64, 128, 128
    kv = 2 * 2 * 8    # 2 (k and v) x groups x head_dim
    forward_per_token = 2 * h * (h + kv) + 4 * s * h + 2 * h * h + 2 * 3 * h * f + 2 * h * V
    assert flops.flops_per_iteration(cfg, 1, tp=1) == pytest.approx(3 * s * forward_per_token, rel=1e-12)


def test_parameter_count_hand_computed():
    cfg = ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=32, seq_length=4,
                      vocab_size=10, make_vocab_size_divisible_by=16)
    embedding = 16 * 8 + 4 * 8                                   # padded vocab 16, 4 positions
    layer = (8 * 24 + 24) + (8 * 8 + 8) + (8 * 32 + 32) + (32 * 8 + 8) + 2 * 16
    assert flops.count_parameters(cfg, tp=1) == embedding + 2 * layer + 16   # final LayerNorm; output tied
    untied = ModelConfig(**{**cfg.__dict__, "untie_embeddings_and_output_weights": True})
    assert flops.count_parameters(untied, tp=1) == flops.count_parameters(cfg, tp=1) + 16 * 8
    # Over TP 2 the vocabulary is padded to a multiple of 16 x 2: 32 rows.
    assert flops.count_parameters(cfg, tp=2) == flops.count_parameters(cfg, tp=1) + 16 * 8


def test_mfu_and_peaks():
    assert flops.mfu(50.0, 200.0) == 0.25
    assert flops.default_peak_tflops(False) > 0


# Narayanan et al. 2021, Table 1: (published parameters in billions, heads, hidden, layers); GPT with
# vocabulary 51,200 and sequence 2,048.
NARAYANAN_TABLE_1 = [(1.7, 24, 2304, 24), (3.6, 32, 3072, 30), (7.5, 32, 4096, 36), (18.4, 48, 6144, 40),
                     (39.1, 64, 8192, 48), (76.1, 80, 10240, 60), (145.6, 96, 12288, 80), (310.1, 128, 16384, 96),
                     (529.6, 128, 20480, 105), (1008.0, 160, 25600, 128)]


@pytest.mark.parametrize("published, a, h, layers", NARAYANAN_TABLE_1, ids=lambda v: str(v))
def test_papers_parameter_and_flop_counts(published, a, h, layers):
    V, s, batch = 51200, 2048, 512
    cfg = ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=a, seq_length=s, vocab_size=V)
    eq2 = 12 * layers * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * layers * h))   # Narayanan Eq. 2
    assert flops.count_parameters(cfg, tp=1) == pytest.approx(eq2 + 2 * h, rel=1e-12)      # + the final LayerNorm
    assert flops.count_parameters(cfg, tp=1) / 1e9 == pytest.approx(published, rel=0.03)   # the table's rounding
    # Model FLOPs, Korthikanti et al. 2022 Eq. 7 (Narayanan's Eq. 3 without the recomputed forward).
    eq7 = 72 * batch * s * layers * h * h * (1 + s / (6 * h) + V / (12 * layers * h))
    assert flops.flops_per_iteration(cfg, batch, tp=1) == pytest.approx(eq7, rel=1e-12)


def test_moe_flops_count_the_experts_a_token_visits():
    # 3 layers, MoE in layers 0 and 2 (--moe-layer-freq 2): top-2 of 8 SwiGLU experts of width 48, shared 32.
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, seq_length=16,
                      vocab_size=128, swiglu=True, add_bias_linear=False, num_experts=8, moe_ffn_hidden_size=48,
                      moe_router_topk=2, moe_layer_freq=2, moe_shared_expert_intermediate_size=32)
    s, h, V = 16, 64, 128
    attention = 2 * h * 3 * h + 4 * s * h + 2 * h * h
    dense_mlp, moe_mlp = 2 * 3 * h * 256, 2 * 3 * h * (2 * 48 + 32)
    forward_per_token = 3 * attention + dense_mlp + 2 * moe_mlp + 2 * h * V
    assert flops.flops_per_iteration(cfg, 1, tp=1) == pytest.approx(3 * s * forward_per_token, rel=1e-12)


@pytest.mark.parametrize("extra", [dict(), dict(swiglu=True, moe_layer_freq=2, moe_shared_expert_intermediate_size=24),
                                   dict(add_bias_linear=True, swiglu=True, moe_layer_freq="[0,1,1]")])
def test_moe_parameter_count_matches_the_model(extra):
    from megalite.model.gpt import GPTModel
    cfg = ModelConfig(**{**dict(num_layers=3, hidden_size=16, num_attention_heads=2, vocab_size=64,
                                add_bias_linear=False, num_experts=4, moe_ffn_hidden_size=12), **extra})
    assert flops.count_parameters(cfg, tp=1) == sum(p.numel() for p in GPTModel(cfg).parameters())


def test_palm_count_is_6n_plus_dense_attention():
    # PaLM's Appendix B: 6N + 12 L H Q T a token, N every parameter.  Against Megatron's count it charges
    # the embedding lookup (V h) and the norms as matmuls, and the same full-sequence attention.
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=160,
                      seq_length=32, vocab_size=100, make_vocab_size_divisible_by=64, swiglu=True,
                      normalization="RMSNorm", add_bias_linear=False, position_embedding_type="rope",
                      untie_embeddings_and_output_weights=True)
    L, h, s, V, B = 3, 64, 32, 128, 5
    n = flops.count_parameters(cfg, tp=1)
    assert flops.palm_flops_per_iteration(cfg, B, tp=1) == B * s * (6 * n + 12 * L * 8 * 8 * s)
    norms = 2 * L * h + h
    difference = flops.palm_flops_per_iteration(cfg, B, tp=1) - flops.flops_per_iteration(cfg, B, tp=1)
    assert difference == pytest.approx(6 * B * s * (V * h + norms), rel=1e-12)


def test_palm_count_refuses_experts():
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=128,
                      num_experts=4, moe_ffn_hidden_size=64)
    with pytest.raises(ValueError, match="--num-experts 4"):
        flops.palm_flops_per_iteration(cfg, 1, tp=1)
