"""predict() on its own: the pieces add up, and each switch moves what it should."""
import dataclasses

import pytest

from megalite.scaling import communication as comm
from megalite.scaling.compute import layer_times, logits_times
from megalite.scaling.hardware import PRESETS, Link
from megalite.scaling.predict import layout_of, memory_per_stage, predict
from megalite.training.arguments import parse_args

H100 = PRESETS["h100-sxm"]
MODEL = ["--mock-data", "--num-layers", "16", "--hidden-size", "4096", "--num-attention-heads", "32",
         "--seq-length", "2048", "--max-position-embeddings", "2048", "--vocab-size", "50257", "--bf16"]


def prediction(*flags, world=16, hardware=H100):
    model, parallel, optimizer, _data, training = parse_args(MODEL + list(flags), world_size=world)
    return predict(model, parallel, training, optimizer, hardware, world)


def test_one_device_is_its_passes_plus_the_optimizer():
    p = prediction("--micro-batch-size", "2", "--global-batch-size", "8", world=1)
    model, *_ = parse_args(MODEL, world_size=1)
    layer, logits = layer_times(model, 2, H100, "bfloat16"), logits_times(model, 2, H100, "bfloat16")
    per_micro_batch = 16 * (layer.forward + layer.backward_input + layer.backward_weight) + (
        logits.forward + logits.backward_input + logits.backward_weight)
    assert p.breakdown["compute"] == pytest.approx(4 * per_micro_batch)
    assert p.breakdown["bubble"] == 0 and p.breakdown["exposed_communication"] == 0
    assert p.iteration_time_s == pytest.approx(4 * per_micro_batch + p.breakdown["optimizer"])
    assert p.tflops_per_gpu == pytest.approx(p.flops_per_iteration / p.iteration_time_s / 1e12)
    assert p.mfu == pytest.approx(p.tflops_per_gpu / 989.0)


def test_overlapped_grad_reduce_hides_data_parallel_time():
    base = ("--micro-batch-size", "1", "--global-batch-size", "32", "--tensor-model-parallel-size", "2")
    exposed = prediction(*base)
    hidden = prediction(*base, "--overlap-grad-reduce")
    assert hidden.breakdown["exposed_communication"] < exposed.breakdown["exposed_communication"]
    assert hidden.breakdown["compute"] == exposed.breakdown["compute"]


def test_host_overhead_adds_per_layer_micro_batch_and_step():
    base = ("--micro-batch-size", "2", "--global-batch-size", "8")
    plain = prediction(*base, world=1)
    host = dataclasses.replace(H100, layer_overhead_s=1e-3, micro_batch_overhead_s=2e-3, step_overhead_s=3e-3)
    loaded = prediction(*base, world=1, hardware=host)
    assert loaded.iteration_time_s == pytest.approx(plain.iteration_time_s + 4 * (16 * 1e-3 + 2e-3) + 3e-3)
    assert loaded.breakdown["host_overhead"] == 3e-3 and plain.breakdown["host_overhead"] == 0.0


def test_each_collective_is_read_at_the_compute_before_it():
    # A link whose all-reduce costs more after more compute: the prediction lies strictly between the
    # link read at the shorter gap everywhere and at the longer one (the layers' passes fall between).
    def link(*fits):
        return Link(300.0, 5.0, tuple(("all_reduce", gap, bw, us) for gap, bw, us in fits))
    short, long_ = (1e-6, 50.0, 20.0), (1.0, 25.0, 200.0)
    base = ("--micro-batch-size", "1", "--global-batch-size", "4", "--tensor-model-parallel-size", "2")

    def exposed(measured):
        hw = dataclasses.replace(H100, intra_node=measured)
        return prediction(*base, world=2, hardware=hw).breakdown["exposed_communication"]
    at_short, at_long, between = exposed(link(short)), exposed(link(long_)), exposed(link(short, long_))
    assert at_short < between < at_long


def test_without_overlap_the_gradient_reduction_stays_exposed():
    # a calibrated CPU: gloo's threads run on the ranks' own cores, so nothing hides behind backward
    cpu = dataclasses.replace(H100, overlaps_communication=False)
    base = ("--micro-batch-size", "1", "--global-batch-size", "32", "--tensor-model-parallel-size", "2")
    exposed = prediction(*base, hardware=cpu)
    assert prediction(*base, "--overlap-grad-reduce", hardware=cpu).iteration_time_s == exposed.iteration_time_s


def test_tensor_parallel_counts_the_embedding_and_output_layer_collectives():
    # TP 2 on one device's worth of layers: every collective of a micro-batch, four per layer plus the
    # embedding's all-reduce, the output layer's input-gradient all-reduce and the loss's three.
    p = prediction("--micro-batch-size", "1", "--global-batch-size", "4", "--tensor-model-parallel-size", "2",
                   world=2)
    link, nbytes, tokens = H100.intra_node, 2048 * 4096 * 2, 2048
    per_micro_batch = (16 * 2 * comm.tp_time_per_layer(nbytes, 2, link, False)
                       + 2 * comm.all_reduce_time(nbytes, 2, link) + 3 * comm.all_reduce_time(4 * tokens, 2, link))
    assert p.breakdown["exposed_communication"] == pytest.approx(4 * per_micro_batch, rel=1e-9)


def test_zero1_shards_the_optimizer_state():
    base = ("--micro-batch-size", "1", "--global-batch-size", "32", "--tensor-model-parallel-size", "2")
    plain, sharded = prediction(*base), prediction(*base, "--use-distributed-optimizer")
    params_on_rank = plain.params / 2    # roughly: the layers and the vocabulary split over TP 2
    saved_gib = (plain.memory_gb_per_gpu - sharded.memory_gb_per_gpu) * 2 ** 30
    assert saved_gib == pytest.approx(12 * params_on_rank * (1 - 1 / 8), rel=0.02)   # DP 8


def test_sequence_parallel_and_recompute_cut_activations():
    base = ("--micro-batch-size", "1", "--global-batch-size", "32", "--tensor-model-parallel-size", "4")
    plain = prediction(*base)
    sp = prediction(*base, "--sequence-parallel")
    full = prediction(*base, "--recompute-granularity", "full", "--recompute-method", "uniform")
    assert sp.activation_bytes_per_layer < plain.activation_bytes_per_layer
    assert full.activation_bytes_per_layer < sp.activation_bytes_per_layer
    assert full.memory_gb_per_gpu < plain.memory_gb_per_gpu
    assert full.iteration_time_s > plain.iteration_time_s
    assert full.hardware_flops_per_iteration == pytest.approx(plain.flops_per_iteration * 4 / 3, rel=0.02)


def test_pipeline_bubble_shrinks_with_the_virtual_size():
    base = ("--micro-batch-size", "1", "--global-batch-size", "32", "--pipeline-model-parallel-size", "4")
    one = prediction(*base)
    two = prediction(*base, "--virtual-pipeline-model-parallel-size", "2")
    assert one.bubble_fraction == pytest.approx(3 / 8, rel=0.1)       # (p-1)/m, m = 32 / DP 4
    assert two.bubble_fraction < one.bubble_fraction
    assert two.memory_gb_per_gpu > one.memory_gb_per_gpu * 0.99       # more in flight on rank 0


@pytest.mark.parametrize("flags", [
    ("--pipeline-model-parallel-size", "4"),
    ("--pipeline-model-parallel-size", "4", "--virtual-pipeline-model-parallel-size", "2"),
    ("--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zb-h1"),
])
def test_closed_form_memory_equals_the_simulated_one(flags):
    """The planner rejects layouts by memory before simulating them (closed-form in-flight counts)."""
    argv = MODEL + ["--micro-batch-size", "1", "--global-batch-size", "32", *flags]
    model, parallel, optimizer, _data, training = parse_args(argv, world_size=16)
    simulated = predict(model, parallel, training, optimizer, H100, 16).memory_gb_per_stage
    closed_form = memory_per_stage(model, parallel, optimizer, layout_of(parallel, training, optimizer, 16))
    assert [s.total / 2 ** 30 for s in closed_form] == pytest.approx(simulated, rel=1e-12)


def test_context_parallel_ring_runs_beside_the_attention_core_where_communication_overlaps():
    from megalite.scaling.compute import attention_core_times
    flags = ("--context-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size", "8",
             "--hidden-dropout", "0", "--attention-dropout", "0")
    quiet = dataclasses.replace(H100, overlap_sm_fraction=0.0)
    hidden = prediction(*flags, hardware=quiet)
    exposed = prediction(*flags, hardware=dataclasses.replace(quiet, overlaps_communication=False))
    model, _parallel, _optimizer, _data, _training = parse_args(MODEL + list(flags), world_size=16)
    block = comm.kv_block_bytes(1024, 1, 32, 128, 2, 1)          # s/CP tokens' K and V, 32 groups of 128
    ring_f, ring_b = comm.cp_ring_times(block, 2, comm.group_link(quiet, 2, 1))
    core_f, core_b = attention_core_times(model, 1, quiet, "bfloat16", cp=2)
    # where it overlaps, the core hides up to its own length of the ring; 16 layers, 1 micro-batch per DP rank
    per_step = 16 * 1 * (min(ring_f, core_f) + min(ring_b, core_b))
    assert per_step > 0
    assert exposed.breakdown["exposed_communication"] - hidden.breakdown["exposed_communication"] == \
        pytest.approx(per_step, rel=1e-6)


def test_context_parallel_all_gather_and_a2a_are_exposed_whole():
    # The p2p ring hides behind the attention core; all_gather and a2a finish before the attention that needs
    # them, so on a GPU their whole time is exposed (docs/scaling.md), and each type costs what its table says.
    from megalite.scaling.compute import attention_core_times
    flags = ["--context-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size", "8",
             "--hidden-dropout", "0", "--attention-dropout", "0"]
    quiet = dataclasses.replace(H100, overlap_sm_fraction=0.0)
    ring = prediction(*flags, hardware=quiet).breakdown["exposed_communication"]
    model, _parallel, _optimizer, _data, _training = parse_args(MODEL + flags, world_size=16)
    block = comm.kv_block_bytes(1024, 1, 32, 128, 2, 1)
    query = 1 * 32 * 128 * 1024 * 2
    link = comm.group_link(quiet, 2, 1)
    ring_f, ring_b = comm.cp_ring_times(block, 2, link)
    core_f, core_b = attention_core_times(model, 1, quiet, "bfloat16", cp=2)
    hidden = 16 * (min(ring_f, core_f) + min(ring_b, core_b))
    for comm_type in ("all_gather", "a2a"):
        exposed = prediction(*flags, "--cp-comm-type", comm_type, hardware=quiet).breakdown["exposed_communication"]
        forward, backward = comm.cp_exchange_times(block, query, 2, link, comm_type)
        assert forward > 0 and backward > 0
        assert exposed - ring == pytest.approx(16 * (forward + backward) - (16 * (ring_f + ring_b) - hidden), rel=1e-6)
