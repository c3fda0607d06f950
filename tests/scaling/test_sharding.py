"""ZeRO-1/2/3 (--data-parallel-sharding-strategy, read by the trainer and the planner): what each shards in memory, what
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


def test_the_trainers_fsdp_switches_set_the_planners_strategy():
    """--use-megatron-fsdp and --use-torch-fsdp2 are trainer flags (ZeRO-3 by default): the planner reads them."""
    fsdp = predict_argv(OPT + ["--data-parallel-sharding-strategy", "optim_grads_params"], A100, 992)
    for switch in ("--use-megatron-fsdp", "--use-torch-fsdp2"):
        predicted = predict_argv(OPT + [switch], A100, 992)
        assert predicted.layout["sharding"] == "optim_grads_params"
        assert predicted.memory_gb_per_gpu == pytest.approx(fsdp.memory_gb_per_gpu)
    zero2 = predict_argv(OPT + ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads"], A100, 992)
    assert zero2.layout["sharding"] == "optim_grads"


# Parameters that dominate: ~6.4B parameters (16 bytes each unsharded) on 8 GPUs of 40 GB.
BIG = ["--num-layers", "8", "--hidden-size", "8192", "--num-attention-heads", "64", "--seq-length", "1024",
       "--max-position-embeddings", "1024", "--vocab-size", "32000", "--bf16", "--global-batch-size", "64"]


def test_search_shards_only_the_layouts_that_need_it():
    from megalite.scaling.planner import SHARDING_FLAG, search, with_flags
    hardware = PRESETS["a100-40gb"]
    candidates = search(BIG, hardware, 8)
    sharded = [c for c in candidates if not c.reason and c.flags.get(SHARDING_FLAG)]
    assert sharded, "some layout fits only with a sharded strategy"
    assert {c.flags[SHARDING_FLAG] for c in sharded} <= {"optim", "optim_grads", "optim_grads_params"}
    for candidate in sharded[:3]:   # each needed it: without it, the same layout does not fit
        plain = predict_argv(with_flags(BIG, {**candidate.flags, SHARDING_FLAG: None}), hardware, 8)
        assert not plain.fits, candidate.description
        assert candidate.flags[SHARDING_FLAG] in candidate.description
    # A strategy given on the command line is the run's: the search does not change it.
    given = search(BIG + [SHARDING_FLAG, "optim"], hardware, 8)
    assert not any(c.flags.get(SHARDING_FLAG) for c in given)
