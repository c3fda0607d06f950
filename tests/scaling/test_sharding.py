"""ZeRO-1/2/3 (--data-parallel-sharding-strategy, a planner flag): what each shards in memory, what
ZeRO-3 sends, and OPT-175B's FSDP layout fitting where the unsharded one does not."""
import pytest

from megalite.config.settings import ModelConfig
from megalite.scaling import communication as comm
from megalite.scaling.hardware import PRESETS, Link
from megalite.scaling.memory import parameter_split, stage_memories
from megalite.scaling.planner import predict_argv

A100 = PRESETS["a100-80gb"]


@pytest.mark.parametrize("sharding, weights, grads, optimizer", [
    ("no_shard", 1, 1, 1), ("optim", 1, 1, 4), ("optim_grads", 1, 4, 4), ("optim_grads_params", 4, 4, 4)])
def test_each_strategy_shards_its_state(sharding, weights, grads, optimizer):
    model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256)
    (stage,) = stage_memories(model, micro_batch=1, tp=1, pp=1, cp=1, dp=4, vpp=None, in_flight=[1],
                              element_size=2, sharding=sharding)
    n = stage.parameters
    working = 2 * parameter_split(model, 1)[0] if weights > 1 else 0      # two gathered layers
    assert stage.weights == pytest.approx(2 * n / weights + 2 * working)
    assert stage.gradients == pytest.approx(4 * n / grads + 4 * working)
    assert stage.optimizer == pytest.approx(12 * n / optimizer)


def test_zero3_sends_three_times_the_parameter_bytes():
    link = Link(100.0, 0.0)
    forward, backward = comm.zero3_times(1e9, 2, 4, link)
    assert forward == pytest.approx(0.75 * 2e9 / 1e11)
    assert backward == pytest.approx(2 * forward)


# OPT-175B (Zhang et al. 2022, Sec. 2.4): 992 A100 80GB, FSDP with Megatron TP 8, fp16, sequence 2048
OPT = ["--num-layers", "96", "--hidden-size", "12288", "--num-attention-heads", "96", "--seq-length", "2048",
       "--max-position-embeddings", "2048", "--vocab-size", "50272", "--fp16", "--tensor-model-parallel-size", "8",
       "--micro-batch-size", "1", "--global-batch-size", "992", "--recompute-granularity", "full",
       "--recompute-method", "uniform", "--attention-backend", "unfused"]


def test_opt_175b_fits_only_sharded():
    plain = predict_argv(OPT, A100, 992)
    assert not plain.fits
    fsdp = predict_argv(OPT + ["--data-parallel-sharding-strategy", "optim_grads_params"], A100, 992)
    assert fsdp.fits and fsdp.memory_gb_per_gpu < 40
    zero1 = predict_argv(OPT + ["--use-distributed-optimizer"], A100, 992)
    assert fsdp.memory_gb_per_gpu < zero1.memory_gb_per_gpu
    # ZeRO-3 pays per micro-batch what ZeRO-1 pays once per step
    assert fsdp.breakdown["exposed_communication"] >= 0 and fsdp.iteration_time_s > 0
