"""Ring collective times (alpha-beta model) on hand-computed cases, and which link a group runs on."""
import pytest

from megalite.scaling import communication as comm
from megalite.scaling.hardware import PRESETS, Link

LINK = Link(bandwidth_gbs=100.0, latency_us=10.0)   # 1e11 B/s, 1e-5 s per hop
GB = 1e9


def test_all_reduce_on_four_ranks():
    # 2 (n-1)/n * B / bw + 2 (n-1) alpha = 2 * 3/4 * 1e9 / 1e11 + 6 * 1e-5 = 0.015 + 0.00006
    assert comm.all_reduce_time(GB, 4, LINK) == pytest.approx(0.01506, rel=1e-12)


def test_all_gather_and_reduce_scatter_are_half_an_all_reduce():
    # (n-1)/n * B / bw + (n-1) alpha = 7/8 * 1e9 / 1e11 + 7e-5
    assert comm.all_gather_time(GB, 8, LINK) == pytest.approx(0.00875 + 0.00007, rel=1e-12)
    assert comm.reduce_scatter_time(GB, 8, LINK) == comm.all_gather_time(GB, 8, LINK)
    assert comm.all_reduce_time(GB, 8, LINK) == pytest.approx(2 * comm.all_gather_time(GB, 8, LINK), rel=1e-12)


def test_point_to_point_and_single_rank():
    assert comm.p2p_time(GB, LINK) == pytest.approx(0.01 + 1e-5, rel=1e-12)
    assert comm.all_reduce_time(GB, 1, LINK) == 0.0 and comm.all_gather_time(GB, 1, LINK) == 0.0


@pytest.mark.parametrize("size, stride, bandwidth, latency", [
    (8, 1, 300.0, 5.0),         # TP 8: one node, NVLink
    (4, 2, 300.0, 5.0),         # DP 4 over TP 2: still one node
    (32, 1, 200.0, 10.0),       # DP 32 with TP 1: 8 per node, 8 NICs of 25 GB/s = 200 GB/s across nodes
    (6, 8, 25.0, 10.0),         # DP 6 over TP 8: one member per node, one NIC
    (4, 4, 50.0, 10.0),         # two members per node
])
def test_group_link_follows_the_grid_order(size, stride, bandwidth, latency):
    link = comm.group_link(PRESETS["a100-80gb"], size, stride)
    assert (link.bandwidth_gbs, link.latency_us) == (bandwidth, latency)


def test_layer_tp_traffic_and_dp_reduction():
    hw = PRESETS["a100-80gb"]
    nbytes = 2048 * 1 * 4096 * 2
    # two all-reduces per pass direction; SP: two all-gathers + two reduce-scatters, the same ring bytes
    link = hw.intra_node
    assert comm.tp_time_per_layer(nbytes, 8, link, False) == pytest.approx(2 * comm.all_reduce_time(nbytes, 8, link))
    assert comm.tp_time_per_layer(nbytes, 8, link, True) == pytest.approx(
        comm.tp_time_per_layer(nbytes, 8, link, False))
    # SP's backward gathers the QKV and fc1 inputs again for their weight gradients: two all-gathers more
    assert comm.tp_time_per_layer(nbytes, 8, link, True, backward=True) == pytest.approx(
        comm.tp_time_per_layer(nbytes, 8, link, True) + 2 * comm.all_gather_time(nbytes, 8, link))
    assert [comm.tp_collectives_per_layer(sp, bwd) for sp in (False, True) for bwd in (False, True)] == [2, 2, 4, 6]
    # 1e9 fp32 gradients over DP 2 on NVLink: 2 * 1/2 * 4e9 / 3e11 + 2 * 5e-6
    assert comm.dp_gradient_time(1e9, 2, link, zero1=False) == pytest.approx(4e9 / 3e11 + 1e-5)
    assert comm.dp_gradient_time(1e9, 2, link, zero1=True) == pytest.approx(0.5 * 4e9 / 3e11 + 5e-6)
    assert comm.zero1_gather_time(1e9, 2, 2, link) == pytest.approx(0.5 * 2e9 / 3e11 + 5e-6)


@pytest.mark.parametrize("tp, dp, pp, inter", [(8, 1, 2, True), (2, 1, 4, False), (2, 1, 8, True), (1, 8, 2, True),
                                               (1, 1, 8, False)])
def test_pipeline_link_is_the_slowest_boundary(tp, dp, pp, inter):
    hw = PRESETS["a100-80gb"]
    link = comm.GridStrides(tp, 1, dp, pp).pp_link(hw)
    assert link == (hw.inter_node if inter else hw.intra_node)


def test_a_measured_collective_uses_its_own_fit_at_its_gap():
    # gloo on a CPU: each collective fitted alone after 2 and 8 ms of compute; a collective the link has
    # no fit for keeps the link's.  Between the gaps latency and seconds per byte are linear, beyond
    # them constant.
    measured = Link(100.0, 10.0, (("all_reduce", 0.002, 50.0, 200.0), ("all_reduce", 0.008, 25.0, 400.0),
                                  ("send_recv", 0.002, 10.0, 1.0)))
    assert comm.all_reduce_time(GB, 2, measured, 0.002) == pytest.approx(1e9 / 50e9 + 2 * 200e-6, rel=1e-12)
    assert comm.all_reduce_time(GB, 2, measured) == comm.all_reduce_time(GB, 2, measured, 0.002)
    assert comm.all_reduce_time(GB, 2, measured, 0.1) == pytest.approx(1e9 / 25e9 + 2 * 400e-6, rel=1e-12)
    middle = measured.for_collective("all_reduce", 0.005)        # halfway: 1/bw = (1/50 + 1/25) / 2
    assert (1 / middle.bandwidth_gbs, middle.latency_us) == pytest.approx((0.03, 300.0))
    assert comm.p2p_time(GB, measured, 0.05) == pytest.approx(0.1 + 1e-6, rel=1e-12)
    assert comm.all_gather_time(GB, 2, measured) == comm.all_gather_time(GB, 2, LINK)
    assert comm.reduce_scatter_time(GB, 2, measured) == comm.reduce_scatter_time(GB, 2, LINK)


@pytest.mark.parametrize("sp", [False, True])
def test_embedding_and_output_layer_collectives(sp):
    nbytes, tokens = 2048 * 4096 * 2, 2048
    embedding, logits = comm.tp_embedding_time(nbytes, 4, LINK, sp), comm.tp_logits_time(nbytes, tokens, 4, LINK, sp)
    loss = 3 * comm.all_reduce_time(4 * tokens, 4, LINK)     # max, target logit, sum of exponentials
    if sp:   # embedding all-reduce then scatter (backward all-gathers); output layer all-gather / reduce-scatter
        assert embedding == (comm.all_reduce_time(nbytes, 4, LINK), comm.all_gather_time(nbytes, 4, LINK))
        assert logits == (comm.all_gather_time(nbytes, 4, LINK) + loss,    # backward: gathered again
                          comm.all_gather_time(nbytes, 4, LINK) + comm.reduce_scatter_time(nbytes, 4, LINK))
    else:    # embedding all-reduce; the output layer's input gradient all-reduced
        assert embedding == (comm.all_reduce_time(nbytes, 4, LINK), 0.0)
        assert logits == (loss, comm.all_reduce_time(nbytes, 4, LINK))
    assert comm.tp_embedding_time(nbytes, 1, LINK, sp) == (0.0, 0.0)
    assert comm.tp_logits_time(nbytes, tokens, 1, LINK, sp) == (0.0, 0.0)


def test_context_parallel_ring_passes_kv_blocks():
    # s = 8192 over CP 4: 2048 tokens; b 1, 8 query groups of 128, bf16, TP 8 -> 2 * 2048 * 8 * 128 * 2 / 8 bytes
    block = comm.kv_block_bytes(2048, 1, 8, 128, 2, 8)
    assert block == 2 * 2048 * 8 * 128 * 2 / 8
    forward, backward = comm.cp_ring_times(block, 4, LINK)
    one = block / 1e11 + 1e-5
    assert forward == pytest.approx(3 * one)              # CP - 1 blocks in
    assert backward == pytest.approx(6 * one)             # K/V again and dK/dV
    assert comm.cp_ring_times(block, 1, LINK) == (0.0, 0.0)


def test_context_parallel_exchange_by_comm_type():
    # docs/long_context.md's table, per layer and rank: B one rank's K/V, Q its queries; LINK 100 GB/s, 10 us
    kv, query, cp = 4e6, 16e6, 4
    assert comm.cp_exchange_times(kv, query, cp, LINK, "p2p") == comm.cp_ring_times(kv, cp, LINK)
    forward, backward = comm.cp_exchange_times(kv, query, cp, LINK, "all_gather")
    assert forward == pytest.approx(3 * kv / 1e11 + 3e-5)                 # (C - 1) B sent, C - 1 hops
    assert backward == pytest.approx(2 * forward)                          # gathered again, dK/dV reduce-scattered
    forward, backward = comm.cp_exchange_times(kv, query, cp, LINK, "a2a")
    assert forward == pytest.approx(3 / 4 * (2 * query + kv) / 1e11 + 4 * 3e-5)    # four all-to-alls
    assert backward == pytest.approx(forward)
    for comm_type in ("p2p", "all_gather", "a2a"):
        assert comm.cp_exchange_times(kv, query, 1, LINK, comm_type) == (0.0, 0.0)
    with pytest.raises(ValueError, match="a2a\\+p2p"):
        comm.cp_exchange_times(kv, query, cp, LINK, "a2a+p2p")
