"""GEMM rates (roofline, quantization, calibration table) and hardware FLOPs with recompute."""
import dataclasses

import pytest

from megalite.config.settings import ModelConfig
from megalite.model.flops import flops_per_iteration
from megalite.scaling.compute import (
    Gemm,
    attention_core_times,
    attention_rates,
    backward_gemms,
    elementwise_seconds,
    gemm_rate,
    gemm_seconds,
    hardware_flops_per_iteration,
    layer_gemms,
    layer_times,
    logits_times,
    quantization,
)
from megalite.scaling.hardware import PRESETS

A100 = PRESETS["a100-80gb"]


def test_large_gemm_runs_at_the_efficient_peak():
    # 27 x 27 tiles of 256 x 128 ... choose a shape that fills whole waves: 108 SMs x 4 waves
    gemm = Gemm("big", 256 * 12, 128 * 36, 8192)     # 12 x 36 = 432 tiles = 4 full waves
    assert quantization(gemm.m, gemm.n, 1, 108) == 1.0
    assert gemm_rate(gemm, A100, "bfloat16") == pytest.approx(312 * 0.8 * A100.sustained_fraction)


def test_the_sustained_fraction_scales_tensor_core_work_only():
    # GEMMs (compute-bound) and fused attention run at the fraction; memory-bound GEMMs and elementwise work
    # keep the HBM rate; a calibration's measured table is not scaled.
    whole = dataclasses.replace(A100, sustained_fraction=1.0)
    half = dataclasses.replace(A100, sustained_fraction=0.5)
    big, thin = Gemm("big", 256 * 12, 128 * 36, 8192), Gemm("thin", 8192, 8192, 16)
    assert gemm_rate(big, half, "bfloat16") == pytest.approx(0.5 * gemm_rate(big, whole, "bfloat16"))
    assert gemm_rate(thin, half, "bfloat16") == gemm_rate(thin, whole, "bfloat16")      # memory-bound (k = 16)
    model = ModelConfig(num_layers=2, hidden_size=1024, num_attention_heads=16, seq_length=4096, hidden_dropout=0.0,
                        attention_dropout=0.0, attention_backend="flash")
    core_whole = attention_core_times(model, 2, whole, "bfloat16")
    assert attention_core_times(model, 2, half, "bfloat16") == pytest.approx(tuple(2 * t for t in core_whole))
    assert elementwise_seconds("norm", 2 ** 20, half, "bfloat16") == elementwise_seconds("norm", 2 ** 20, whole,
                                                                                          "bfloat16")
    table = ((1024, 1024, 1024, "bfloat16", 100.0, "nn"),)
    measured = Gemm("m", 1024, 1024, 1024)
    assert gemm_rate(measured, dataclasses.replace(half, matmul=table), "bfloat16") == 100.0


def test_wave_quantization_and_memory_bound():
    assert quantization(256, 128 * 109, 1, 108) == pytest.approx(109 / 216)   # one tile into a second wave
    skinny = Gemm("skinny", 8192, 8192, 16)          # k = 16: intensity ~ 16 FLOP/B, memory-bound
    intensity = 2 * 8192 * 8192 * 16 / (2 * (8192 * 16 * 2 + 8192 * 8192))
    assert gemm_rate(skinny, A100, "bfloat16") == pytest.approx(intensity * 2039 * 0.9 / 1e3)


def test_calibration_table_is_interpolated():
    hw = dataclasses.replace(A100, matmul=((1024, 1024, 1024, "float32", 1.0, "nn"),
                                           (4096, 4096, 4096, "float32", 3.0, "nn")))
    assert gemm_rate(Gemm("a", 1024, 1024, 1024), hw, "float32") == 1.0
    middle = gemm_rate(Gemm("b", 2048, 2048, 2048), hw, "float32")
    assert middle == pytest.approx(2.0)               # equidistant in log space
    roofline = 312 * 0.8 * A100.sustained_fraction * quantization(1024, 1024, 1, 108)
    assert gemm_rate(Gemm("c", 1024, 1024, 1024), hw, "bfloat16") == pytest.approx(roofline)   # no bf16 rows


def test_a_linear_layer_reads_each_product_in_its_layout():
    rates = {"nn": 1.0, "nt": 2.0, "tn": 4.0}
    hw = dataclasses.replace(A100, matmul=tuple((1024, 1024, 1024, "float32", rate, layout)
                                                for layout, rate in rates.items()))
    model = ModelConfig(num_layers=2, hidden_size=1024, num_attention_heads=8, seq_length=256)
    qkv = layer_gemms(model, 4, 1)[0]
    assert qkv.layout == "nt" and gemm_rate(qkv, hw, "float32") == 2.0                  # x @ W^T
    dgrad, wgrad = backward_gemms(qkv)
    assert (dgrad.layout, wgrad.layout) == ("nn", "tn")                                  # g @ W, x^T @ g
    assert gemm_rate(dgrad, hw, "float32") == 1.0 and gemm_rate(wgrad, hw, "float32") == 4.0
    only_nn = dataclasses.replace(hw, matmul=hw.matmul[:1])                              # an older file
    assert gemm_rate(qkv, only_nn, "float32") == 1.0


def test_hardware_flops_are_narayanan_eq_3_with_full_recompute():
    B, s, L, h, V = 512, 2048, 24, 2304, 51200
    model = ModelConfig(num_layers=L, hidden_size=h, num_attention_heads=24, seq_length=s, vocab_size=V)
    eq3 = 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    assert hardware_flops_per_iteration(model, B, "full", tp=1) == pytest.approx(eq3, rel=1e-12)
    assert hardware_flops_per_iteration(model, B, None, tp=1) == flops_per_iteration(model, B, tp=1)
    assert hardware_flops_per_iteration(model, B, "selective", tp=1) == pytest.approx(
        flops_per_iteration(model, B, tp=1) + 4 * B * s * s * L * h)


def test_recompute_adds_to_backward_only():
    model = ModelConfig(num_layers=2, hidden_size=1024, num_attention_heads=16, seq_length=1024)
    plain = layer_times(model, 2, A100, "bfloat16")
    full = layer_times(model, 2, A100, "bfloat16", recompute="full")
    selective = layer_times(model, 2, A100, "bfloat16", recompute="selective")
    assert full.forward == plain.forward and full.backward_input == pytest.approx(plain.backward_input + plain.forward)
    assert plain.backward_input < selective.backward_input < full.backward_input
    assert plain.backward_weight == full.backward_weight > 0


def test_elementwise_table_is_interpolated_in_log_bytes_and_clamped():
    hw = dataclasses.replace(A100, elementwise=(("norm", "float32", 1 << 10, 1.0, 0.5),
                                                ("norm", "float32", 1 << 12, 3.0, 1.5)))
    assert elementwise_seconds("norm", 1 << 10, hw, "float32") == pytest.approx((1024 / 1e9, 2 * 1024 / 0.5e9))
    forward, backward = elementwise_seconds("norm", 1 << 11, hw, "float32")      # log-midpoint: 2 and 1 GB/s
    assert (forward, backward) == pytest.approx((2048 / 2e9, 2 * 2048 / 1e9))
    assert elementwise_seconds("norm", 1 << 20, hw, "float32")[0] == pytest.approx((1 << 20) / 3e9)   # clamped
    bandwidth = A100.hbm_gbs * 1e9 * A100.memory_efficiency                    # no row for the op: bandwidth
    assert elementwise_seconds("activation", 1e6, hw, "float32") == pytest.approx((1e6 / bandwidth, 2e6 / bandwidth))


def test_layer_uses_the_measured_tables():
    model = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8, seq_length=256, hidden_dropout=0.0,
                        attention_dropout=0.0, attention_backend="unfused")
    cpu = dataclasses.replace(A100, matmul=((1024, 1024, 1024, "float32", 0.2, "nn"),))
    plain = layer_times(model, 4, cpu, "float32")
    core = [g for g in layer_gemms(model, 4, 1) if g.attention_core]
    flops = sum(g.flops for g in core)                                         # 4 (b a) s^2 d
    assert flops == 4 * 4 * 8 * 256 * 256 * 32
    table = dataclasses.replace(cpu, attention=((32, 256, 32, "float32", 0.05, 0.02),))
    assert attention_rates(table, "float32", 32, 256, 32) == (0.05, 0.02)
    measured = layer_times(model, 4, table, "float32")
    e, scores = 4, 8 * 256 * 256 * 4
    modelled_core = sum(gemm_seconds(g, cpu, "float32") for g in core) + 2 * e * scores / (A100.hbm_gbs * 0.9e9)
    assert measured.forward == pytest.approx(plain.forward - modelled_core + flops / 0.05e12)
    assert measured.backward_weight == plain.backward_weight
    dropout = dataclasses.replace(model, attention_dropout=0.1)                # the table is of the dropout-free kernel
    assert layer_times(dropout, 4, table, "float32") == layer_times(dropout, 4, cpu, "float32")
    loss = dataclasses.replace(cpu, elementwise=(("cross_entropy", "float32", 1, 1.0, 1.0),))
    logits_bytes = 4 * 256 * model.padded_vocab_size(1) * 12
    assert logits_times(model, 4, loss, "float32").forward == pytest.approx(
        gemm_seconds(Gemm("logits", 1024, model.padded_vocab_size(1), 256), cpu, "float32") + logits_bytes / 1e9)


def test_fused_attention_is_priced_from_its_causal_flops():
    kwargs = dict(num_layers=2, hidden_size=1024, num_attention_heads=16, seq_length=4096, hidden_dropout=0.0,
                  attention_dropout=0.0)
    fused = ModelConfig(**kwargs, attention_backend="flash")
    unfused = ModelConfig(**kwargs, attention_backend="unfused")
    b, t, cp = 2, 2, 2
    core_flops = 4 * (b * 16 // t) * (4096 // cp) * 4096 * 64           # the scores and context products
    forward, backward = attention_core_times(fused, b, A100, "bfloat16", tp=t, cp=cp)
    rate = 312e12 * A100.attention_efficiency * A100.sustained_fraction
    assert forward == pytest.approx(0.5 * core_flops / rate)             # the causal half skipped
    assert backward == pytest.approx(2.5 * forward)                      # five products against two
    # the layer's other work is the same either way; the unfused core costs more (full s x s, score bytes)
    gap = layer_times(unfused, b, A100, "bfloat16", tp=t, cp=cp).forward - layer_times(
        fused, b, A100, "bfloat16", tp=t, cp=cp).forward
    assert gap == pytest.approx(attention_core_times(unfused, b, A100, "bfloat16", tp=t, cp=cp)[0] - forward)
    assert gap > 0


def test_cross_entropy_moves_the_bytes_of_each_pass_without_a_table():
    model = ModelConfig(num_layers=2, hidden_size=1024, num_attention_heads=16, seq_length=1024, vocab_size=32000)
    logits = 2 * 1024 * 32000                       # tokens x vocabulary (32000 is a multiple of 128)
    bandwidth = A100.hbm_gbs * 1e9 * A100.memory_efficiency
    no_loss = dataclasses.replace(A100, hbm_gbs=1e12)   # the loss's passes take ~nothing at this bandwidth
    plain, fast = logits_times(model, 2, A100, "bfloat16"), logits_times(model, 2, no_loss, "bfloat16")
    # forward: fp32 copy 2+4, max 4, subtract 8, exp 8, sum 4, divide 8; backward: clone 8, scale 8, cast 4+2
    assert plain.forward - fast.forward == pytest.approx(38 * logits / bandwidth, rel=1e-6)
    assert plain.backward_input - fast.backward_input == pytest.approx(22 * logits / bandwidth, rel=1e-6)
    # a measured rate is read on its own count, (e + 8) bytes per logit
    table = dataclasses.replace(A100, elementwise=(("cross_entropy", "bfloat16", 1 << 20, 100.0, 50.0),))
    measured = logits_times(model, 2, table, "bfloat16")
    assert measured.forward - fast.forward == pytest.approx(10 * logits / 100e9, rel=1e-3)


def test_attention_dropout_runs_unfused_where_the_fused_kernel_cannot_drop_out():
    kwargs = dict(num_layers=2, hidden_size=1024, num_attention_heads=16, seq_length=2048, attention_dropout=0.1)
    model = ModelConfig(**kwargs)                                  # --attention-backend auto
    cpu_like = dataclasses.replace(A100, fused_attention_dropout=False)
    unfused = ModelConfig(**kwargs, attention_backend="unfused")
    assert attention_core_times(model, 2, cpu_like, "bfloat16") == attention_core_times(unfused, 2, cpu_like,
                                                                                        "bfloat16")
    assert attention_core_times(model, 2, A100, "bfloat16") < attention_core_times(unfused, 2, A100, "bfloat16")
