"""The memory model: Korthikanti's activations (activations.py), the schedule's in-flight count in
closed form against the simulator's, model state by hand, and Korthikanti et al. 2022's Table 3 runs."""
import json
from pathlib import Path

import pytest

from megalite.config.settings import ModelConfig
from megalite.parallel.pipeline.orders import build_order
from megalite.parallel.pipeline.simulator import peak_in_flight
from megalite.scaling.activations import activation_bytes_per_layer
from megalite.scaling.cpu_activations import cpu_activation_bytes_per_layer
from megalite.scaling.hardware import PRESETS, from_calibration
from megalite.scaling.memory import activation_bytes, in_flight_formula, parameter_split, stage_memories
from megalite.scaling.planner import predict_argv
from megalite.scaling.predict import predict
from megalite.scaling.published import KORTHIKANTI_TABLE_3, model_flags
from megalite.training.arguments import parse_args

GPT_22B = dict(num_layers=48, hidden_size=6144, num_attention_heads=64, seq_length=2048, vocab_size=51200,
               attention_backend="unfused")


@pytest.mark.parametrize("recompute", [None, "selective", "full"])
@pytest.mark.parametrize("tp, sp", [(1, False), (8, False), (8, True)])
def test_activations_are_korthikantis(recompute, tp, sp):
    model = ModelConfig(**GPT_22B)
    expected = activation_bytes_per_layer(2048, 4, 6144, 64, tp=tp, sequence_parallel=sp, recompute=recompute)
    assert activation_bytes(model, 4, tp=tp, sequence_parallel=sp, recompute=recompute) == expected
    # fp32 activations: every activation at 4 bytes, the 1-byte masks unchanged
    no_dropout = ModelConfig(**GPT_22B, hidden_dropout=0.0, attention_dropout=0.0)
    assert activation_bytes(no_dropout, 1, element_size=4) == activation_bytes_per_layer(
        2048, 1, 6144, 64, element_size=4, dropout=False)


@pytest.mark.parametrize("sp", [False, True])
def test_fused_attention_keeps_no_scores(sp):
    unfused = ModelConfig(**GPT_22B)
    fused = ModelConfig(**dict(GPT_22B, attention_backend="flash"))
    a, s, b, t = 64, 2048, 4, 8
    scores = a * s * s * b / t * (2 + 1 + 2)           # softmax output, dropout mask, dropout output
    lse = 4 * a * s * b / t                            # fp32 log-sum-exp per (head, token)
    assert activation_bytes(unfused, b, tp=t, sequence_parallel=sp) - activation_bytes(
        fused, b, tp=t, sequence_parallel=sp) == scores - lse
    # selective recompute drops the same scores: with fused attention only the log-sum-exp differs
    assert activation_bytes(fused, b, tp=t, sequence_parallel=sp, recompute="selective") == activation_bytes(
        unfused, b, tp=t, sequence_parallel=sp, recompute="selective") + lse


def test_context_parallel_scores_are_queries_by_all_keys():
    model = ModelConfig(**GPT_22B)
    a, s, b, cp = 64, 2048, 1, 4
    per_rank = activation_bytes(model, b, cp=cp)
    # the s/CP tokens' items are 1/CP of the whole; the scores are (s/CP) x s, 1/CP of the whole too
    assert per_rank == pytest.approx(activation_bytes(model, b) / cp)
    fused = ModelConfig(**dict(GPT_22B, attention_backend="flash"))
    assert activation_bytes(model, b, cp=cp) - activation_bytes(fused, b, cp=cp) == (
        a * (s // cp) * s * b * 5 - 4 * a * (s // cp) * b)


@pytest.mark.parametrize("schedule, p, v, m", [
    ("1f1b", 4, 1, 8), ("1f1b", 8, 1, 3), ("gpipe", 4, 1, 6), ("zb-h1", 4, 1, 8),
    ("interleaved", 4, 2, 8), ("interleaved", 4, 3, 12), ("interleaved", 2, 4, 2), ("interleaved", 8, 2, 16),
])
def test_in_flight_formula_agrees_with_the_simulator(schedule, p, v, m):
    simulated = peak_in_flight(build_order(schedule, p, m, v))
    assert [in_flight_formula(schedule, p, v, m, r) for r in range(p)] == simulated


def test_interleaved_first_rank_holds_korthikantis_layers():
    # Korthikanti et al. 2022 Sec. 4.2.3: rank 0 of the interleaved schedule holds L (1 + (p-1)/(p v)) layers
    p, v, layers = 8, 4, 64
    chunks = in_flight_formula("interleaved", p, v, 64, 0)
    assert chunks * layers / (p * v) == pytest.approx(layers * (1 + (p - 1) / (p * v)))


def test_model_state_by_hand():
    model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256)
    per_layer, embedding, final_norm = parameter_split(model, tp=1)
    assert per_layer == 12 * 64 * 64 + 13 * 64 and embedding == (256 + 32) * 64 and final_norm == 2 * 64
    stages = stage_memories(model, micro_batch=1, tp=1, pp=2, cp=1, dp=4, vpp=None, in_flight=[2, 1],
                            element_size=2, zero1=True)
    first = 2 * per_layer + embedding
    assert stages[0].parameters == first
    assert stages[1].parameters == 2 * per_layer + final_norm + 256 * 64   # own copy of the tied output layer
    # bf16 weights 2 B, fp32 grad buffer 4 B, fp32 master + Adam m, v = 12 B sharded over DP 4
    assert (stages[0].weights, stages[0].gradients, stages[0].optimizer) == (2 * first, 4 * first, 3 * first)
    per_micro_batch = activation_bytes(model, 1)
    assert stages[0].activations == 2 * 2 * per_micro_batch + 2 * 32 * 64    # 2 in flight x 2 layers + masks
    assert stages[1].logits == 2 * 4 * 32 * 256


@pytest.mark.parametrize("row", KORTHIKANTI_TABLE_3, ids=lambda r: r.name)
def test_korthikanti_table_3_fits_only_with_their_method(row):
    """The paper trained each with sequence parallelism + selective recompute on 80 GB A100s; without
    either, the activations of the two largest cannot fit (the paper's motivation)."""
    flags = model_flags(row.heads, row.hidden, row.layers, row.tp, row.pp, row.batch, row.micro_batch)
    ran = predict_argv(flags + ["--sequence-parallel", "--recompute-granularity", "selective"],
                       PRESETS["a100-80gb"], row.gpus)
    assert ran.fits, f"{row.name}: {ran.memory_gb_per_gpu:.1f} GiB"
    plain = predict_argv(flags, PRESETS["a100-80gb"], row.gpus)
    assert plain.memory_gb_per_gpu > ran.memory_gb_per_gpu
    if row.name in ("530B", "1T"):
        assert not plain.fits


def test_scores_are_kept_where_the_fused_kernel_cannot_drop_out():
    model = ModelConfig(**dict(GPT_22B, attention_backend="auto"))      # attention dropout 0.1 by default
    assert activation_bytes(model, 1, dropout_fused=False) == activation_bytes(ModelConfig(**GPT_22B), 1)
    assert activation_bytes(model, 1) < activation_bytes(model, 1, dropout_fused=False)


def _cpu_prediction(runtime_mib, *flags):
    """predict() on a CPU calibration (tests/scaling/cpu_calibration.json) with ``runtime_mib`` of baseline."""
    document = json.loads((Path(__file__).parent / "cpu_calibration.json").read_text())
    document["runtime_baseline"] = {"import_mib": None, "step_mib": runtime_mib, "mib": runtime_mib}
    argv = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "1024",
            "--max-position-embeddings", "1024", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--vocab-size", "1024", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--tensor-model-parallel-size", "2", "--sequence-parallel", "--mock-data", *flags]
    model, parallel, optimizer, _data, training = parse_args(argv, world_size=2)
    return model, predict(model, parallel, training, optimizer, from_calibration(document), 2)


def test_cpu_memory_is_the_runtime_baseline_plus_the_cpu_kernels_activations():
    model, plain = _cpu_prediction(300.0)
    _model, without = _cpu_prediction(0.0)
    assert (plain.memory_gb_per_gpu - without.memory_gb_per_gpu) * 1024 == pytest.approx(300.0)
    cpu_layer = cpu_activation_bytes_per_layer(1024, 2, 256, 8, element_size=4, tp=2, sequence_parallel=True,
                                               hidden_dropout=False, attention_dropout=False)
    assert plain.activation_bytes_per_layer == cpu_layer          # not Korthikanti's GPU count
    model, dropout = _cpu_prediction(300.0, "--attention-dropout", "0.1")   # the math kernel: fp32 scores
    cpu_layer = cpu_activation_bytes_per_layer(1024, 2, 256, 8, element_size=4, tp=2, sequence_parallel=True,
                                               hidden_dropout=False, attention_dropout=True)
    assert dropout.activation_bytes_per_layer == cpu_layer
    gpu_layer = activation_bytes(model, 2, tp=2, sequence_parallel=True, element_size=4, dropout_fused=False)
    assert gpu_layer < 0.8 * cpu_layer
    # no scores are kept without attention dropout: selective recompute saves (nearly) nothing on a CPU
    _model, selective = _cpu_prediction(300.0, "--recompute-granularity", "selective")
    assert selective.memory_gb_per_gpu == pytest.approx(plain.memory_gb_per_gpu, rel=0.01)
    assert selective.memory_gb_per_gpu < plain.memory_gb_per_gpu
    # the GPU presets keep their accounting and no runtime baseline
    assert PRESETS["h100-sxm"].runtime_bytes == 0 and not PRESETS["h100-sxm"].cpu_activations


@pytest.mark.parametrize("sp", [False, True])
def test_cpu_last_rank_keeps_the_final_norm_and_output_layer_inputs(sp):
    """On CPU kernels the last rank's activations: L layers of the CPU inventory, plus the final norm's
    input (sbh, /t with SP) and the output layer's gathered input (sbh), per micro-batch in flight."""
    s, b, h, a, tp, layers = 128, 2, 64, 4, 2, 4
    model = ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=a, seq_length=s, hidden_dropout=0.0,
                        attention_dropout=0.0)
    common = dict(micro_batch=b, tp=tp, pp=1, cp=1, dp=1, vpp=None, in_flight=[1], element_size=4, sequence_parallel=sp)
    cpu = stage_memories(model, cpu_kernels=True, **common)[0]
    layer = cpu_activation_bytes_per_layer(s, b, h, a, element_size=4, tp=tp, sequence_parallel=sp,
                                           hidden_dropout=False, attention_dropout=False)
    assert cpu.activations == layers * layer + 4 * s * b * h * (1 + 1 / (tp if sp else 1))
    gpu = stage_memories(model, **common)[0]
    assert gpu.activations == layers * activation_bytes(model, b, tp=tp, sequence_parallel=sp, element_size=4)
