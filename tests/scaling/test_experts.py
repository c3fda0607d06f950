"""The planner's mixture of experts (scaling/experts.py): FLOPs by hand, expert state over EP, the token
dispatch's volume, and a Mixtral-shaped command line planned and searched."""
import dataclasses

import pytest

from megalite.scaling import communication as comm
from megalite.scaling import experts
from megalite.scaling.compute import hardware_flops_per_iteration
from megalite.scaling.hardware import PRESETS, Link
from megalite.scaling.options import PlanOptions
from megalite.scaling.planner import plan, search
from megalite.scaling.predict import layout_of, memory_per_stage, predict
from megalite.training.arguments import parse_args

H100 = PRESETS["h100-sxm"]
# 2 layers, h 64, 4 heads, s 32, vocabulary 128; 8 SwiGLU experts of width 48, top-2, a shared expert of 32.
TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--vocab-size", "128", "--swiglu", "--disable-bias-linear", "--bf16",
        "--num-experts", "8", "--moe-ffn-hidden-size", "48", "--moe-router-topk", "2",
        "--moe-shared-expert-intermediate-size", "32", "--micro-batch-size", "2"]
MIXTRAL = ["--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336", "--num-attention-heads", "32",
           "--group-query-attention", "--num-query-groups", "8", "--seq-length", "4096",
           "--max-position-embeddings", "4096", "--vocab-size", "32000", "--swiglu", "--normalization", "RMSNorm",
           "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
           "--hidden-dropout", "0", "--attention-dropout", "0", "--bf16", "--num-experts", "8", "--moe-router-topk",
           "2", "--moe-token-dispatcher-type", "alltoall", "--pipeline-model-parallel-size", "4",
           "--micro-batch-size", "1", "--global-batch-size", "256", "--use-distributed-optimizer"]


def configs(*flags, world=8):
    model, parallel, optimizer, _data, training = parse_args(TINY + list(flags), world_size=world)
    return model, parallel, training, optimizer


def test_flops_follow_megatron_and_the_router_counts_only_as_executed():
    model, parallel, training, optimizer = configs("--global-batch-size", "16")
    p = predict(model, parallel, training, optimizer, H100, 8)
    B, s, h, V, L = 16, 32, 64, 128, 2
    # per token, forward: QKV 2h(3h), scores + context 4 s h, projection 2h^2, top-2 experts and the shared one
    # 2 x 3 h (2 x 48 + 32) (SwiGLU: three matrices), logits 2 h V; backward twice that
    forward = L * (6 * h * h + 4 * s * h + 2 * h * h + 6 * h * (2 * 48 + 32)) + 2 * h * V
    assert p.flops_per_iteration == pytest.approx(3 * B * s * forward)
    router = 3 * B * s * L * 2 * h * 8      # [T, h] x [h, E], forward and backward, both layers
    assert p.hardware_flops_per_iteration == pytest.approx(p.flops_per_iteration + router)
    assert hardware_flops_per_iteration(model, B, "full", tp=1) > p.hardware_flops_per_iteration


@pytest.mark.parametrize("ep", [1, 2, 4, 8])
def test_expert_gemms_do_the_same_work_at_any_ep(ep):
    model, *_ = configs()
    gemms = {g.name: g for g in experts.expert_gemms(model, 2, cp=1, ep=ep)}
    tokens = 2 * 32
    assert gemms["router"].flops == 2 * tokens * 64 * 8
    assert gemms["expert_fc1"].batch == 8 // ep
    # each rank runs its T k rows through its E/EP experts: the work is EP's to redistribute, not to change
    assert gemms["expert_fc1"].flops + gemms["expert_fc2"].flops == pytest.approx(2 * tokens * 2 * 3 * 64 * 48)
    assert gemms["shared_fc1"].flops + gemms["shared_fc2"].flops == 2 * tokens * 3 * 64 * 32


def _memory(ep, sharding="optim", world=8):
    model, parallel, training, optimizer = configs("--expert-model-parallel-size", str(ep), "--global-batch-size",
                                                   "16", world=world)
    lay = layout_of(parallel, training, optimizer, world, PlanOptions(data_parallel_sharding_strategy=sharding))
    return memory_per_stage(model, parallel, optimizer, lay, hardware=H100)[0]


def test_expert_weights_and_gradients_fall_as_one_over_ep():
    all_experts = 2 * 8 * 3 * 64 * 48        # both layers' experts, whole
    by_ep = {ep: _memory(ep) for ep in (1, 2, 4, 8)}
    for ep, memory in by_ep.items():
        assert memory.expert_parameters == pytest.approx(all_experts / ep)
        # weights (bf16) and the fp32 gradient buffer: 2 + 4 bytes per expert element held
        assert by_ep[1].weights - memory.weights == pytest.approx(2 * all_experts * (1 - 1 / ep))
        assert by_ep[1].gradients - memory.gradients == pytest.approx(4 * all_experts * (1 - 1 / ep))
        # ZeRO-1: the experts' optimizer state over the expert-DP group (8 / EP ranks), the rest over DP 8
        assert memory.optimizer == pytest.approx(by_ep[1].optimizer)


def test_zero2_shards_expert_gradients_over_the_expert_data_parallel_group():
    dense, one, four = _memory(1, "optim_grads").parameters - 2 * 8 * 3 * 64 * 48, _memory(1), _memory(4, "optim_grads")
    expert = four.expert_parameters
    assert four.gradients == pytest.approx(4 * (dense / 8 + expert / (8 // 4)))
    assert one.gradients == pytest.approx(4 * one.parameters)


def test_all_to_all_volume_scales_with_top_k_and_its_time_is_the_pairwise_exchange():
    model, *_ = configs()
    k4, *_ = configs("--moe-router-topk", "4")
    assert experts.dispatch_bytes(model, 2, 1, 2) == 2 * 64 * 2 * 64        # e T k h
    assert experts.dispatch_bytes(k4, 2, 1, 2) == 2 * experts.dispatch_bytes(model, 2, 1, 2)
    link = Link(100.0, 10.0)
    assert comm.all_to_all_time(8e6, 8, link) == pytest.approx(7 / 8 * 8e6 / 100e9 + 7 * 10e-6)
    forward, backward = experts.dispatch_times(k4, 2, 1, 8, 2, link)
    assert forward == backward == pytest.approx(2 * comm.all_to_all_time(2 * 2 * 64 * 4 * 64, 8, link))
    assert experts.dispatch_times(k4, 2, 1, 1, 2, link) == (0.0, 0.0)


def test_the_allgather_dispatcher_gathers_the_groups_tokens():
    model, *_ = configs("--moe-token-dispatcher-type", "allgather")
    link = Link(100.0, 10.0)
    gathered = 2 * 64 * 64 * 4                     # e T h EP
    one_way = comm.all_gather_time(gathered, 4, link) + comm.reduce_scatter_time(gathered, 4, link)
    assert experts.dispatch_times(model, 2, 1, 4, 2, link) == pytest.approx((one_way, one_way))


def test_the_dispatch_runs_on_the_ep_groups_link_and_expert_gradients_on_the_expert_dp_groups():
    two_per_node = dataclasses.replace(H100, gpus_per_node=2)
    eight = comm.GridStrides(1, 1, 8, 1, ep=8)       # one EP group of 8 consecutive ranks; expert-DP of 1
    assert eight.ep_link(H100) == H100.intra_node
    assert eight.ep_link(two_per_node) == Link(min(H100.intra_node.bandwidth_gbs, 2 * H100.inter_node.bandwidth_gbs),
                                               H100.inter_node.latency_us)
    two = comm.GridStrides(1, 1, 8, 1, ep=2)         # EP pairs inside a node; expert-DP: 4 ranks 2 apart
    assert two.ep_link(two_per_node) == H100.intra_node
    assert two.edp_link(two_per_node).latency_us == H100.inter_node.latency_us
    assert two.edp_link(H100) == H100.intra_node
    # EP 4 of 8 ranks at 4 per node: each EP group is a node, so ranks 0 and 4 (same experts) are a node apart
    assert comm.GridStrides(1, 1, 8, 1, ep=4).edp_link(dataclasses.replace(H100, gpus_per_node=4)).latency_us == \
        H100.inter_node.latency_us


def test_dispatch_across_nodes_costs_more_than_inside_one():
    def exposed(ep, per_node):
        model, parallel, training, optimizer = configs("--expert-model-parallel-size", str(ep), "--global-batch-size",
                                                       "16", "--moe-token-dispatcher-type", "alltoall")
        return predict(model, parallel, training, optimizer, dataclasses.replace(H100, gpus_per_node=per_node),
                       8).breakdown["exposed_communication"]
    assert exposed(8, 2) > exposed(8, 8) > exposed(1, 8)


def test_expert_activations_count_the_routed_rows():
    model, *_ = configs()
    k4, *_ = configs("--moe-router-topk", "4")
    tokens = 2 * 32
    assert experts.moe_extra_activation_bytes(model, 2) == 2 * tokens * 2 * (2 * 64 + 2 * 48) + 4 * tokens * 8
    assert (experts.moe_extra_activation_bytes(k4, 2) - 4 * tokens * 8
            == 2 * (experts.moe_extra_activation_bytes(model, 2) - 4 * tokens * 8))
    assert experts.moe_extra_activation_bytes(model, 2, recompute="full") == 0


def test_a_mixtral_shaped_command_line_is_planned():
    candidate = plan(MIXTRAL + ["--expert-model-parallel-size", "8"], H100, 64)
    p = candidate.prediction
    assert p.params / 1e9 == pytest.approx(46.7, rel=0.01) and p.fits
    assert p.layout["pp"] == 4 and p.layout["dp"] == 16
    # EP 1 keeps all eight experts on every rank: more memory than EP 8
    whole = plan(MIXTRAL + ["--expert-model-parallel-size", "1", "--virtual-pipeline-model-parallel-size",
                            str(candidate.flags.get("--virtual-pipeline-model-parallel-size") or 1)], H100, 64)
    assert whole.prediction.memory_gb_per_gpu > p.memory_gb_per_gpu + 40


def test_search_tries_each_expert_parallel_size():
    argv = TINY[:-2] + ["--global-batch-size", "16"]      # the micro-batch left to the search
    described = [c.description for c in search(argv, H100, 4) if c.description]
    for ep in (1, 2, 4):
        assert any(f"EP{ep}" in d for d in described), ep
    assert not any("EP8" in d for d in described)      # 8 does not divide the 4 ranks of TP x CP x DP


@pytest.mark.parametrize("freq, share, recompute", [(1, 1, None), (2, 0.5, None), (1, 1, "full"), (2, 0.5, "selective"),
                                                    ("[0,1]", 0.5, None), ("[0]*2", 0, None)])
def test_one_expert_of_the_dense_width_costs_the_dense_layer_plus_router_and_permutation(freq, share, recompute):
    from megalite.scaling.compute import backward_gemms, elementwise_seconds, gemm_seconds, layer_times
    base = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length",
            "32", "--max-position-embeddings", "32", "--vocab-size", "128", "--ffn-hidden-size", "48",
            "--disable-bias-linear", "--bf16"]
    dense, *_ = parse_args(base, world_size=1)
    moe, *_ = parse_args(base + ["--num-experts", "1", "--moe-router-topk", "1", "--moe-layer-freq", str(freq)],
                         world_size=1)
    router = experts.expert_gemms(moe, 2)[0]
    extra_f = gemm_seconds(router, H100, "bfloat16")
    extra_b = sum(gemm_seconds(g, H100, "bfloat16") for g in backward_gemms(router))
    permute_f, permute_b = elementwise_seconds("permute", 2 * 2 * 2 * 64 * 64, H100, "bfloat16")   # 2 x 2 e T k h
    extra_f, extra_b = extra_f + permute_f, extra_b + permute_b
    got = experts.mixed_layer_times(moe, 2, H100, "bfloat16", recompute=recompute)
    want = layer_times(dense, 2, H100, "bfloat16", recompute=recompute)
    assert experts.moe_share(moe) == share     # the layers --moe-layer-freq (a number or a list) gives experts
    assert got.forward - want.forward == pytest.approx(share * extra_f)
    assert (got.backward_input + got.backward_weight) - (want.backward_input + want.backward_weight) == pytest.approx(
        share * (extra_b + (extra_f if recompute == "full" else 0.0)))


@pytest.mark.parametrize("ep", [1, 8])
def test_expert_gradients_are_reduced_over_the_expert_data_parallel_group(ep):
    # DP 8, one micro-batch, no pipeline and no overlap: exposed = the layers' dispatch + the gradient all-reduces
    model, parallel, training, optimizer = configs("--expert-model-parallel-size", str(ep), "--global-batch-size",
                                                   "16", "--moe-token-dispatcher-type", "alltoall")
    p = predict(model, parallel, training, optimizer, H100, 8)
    memory = _memory(ep, "no_shard")
    dispatch = sum(experts.dispatch_times(model, 2, 1, ep, 2, H100.intra_node))
    dense = comm.all_reduce_time(4.0 * (memory.parameters - memory.expert_parameters), 8, H100.intra_node)
    expert = comm.all_reduce_time(4.0 * memory.expert_parameters, 8 // ep, H100.intra_node)   # 0 at EP 8
    assert p.breakdown["exposed_communication"] == pytest.approx(2 * dispatch + dense + expert)


TP2 = ("--tensor-model-parallel-size", "2", "--sequence-parallel")


@pytest.mark.parametrize("etp", [1, 2])
def test_tensor_parallel_ranks_split_the_moe_work_and_keep_its_flops(etp):
    # Under TP (with SP) each rank routes its own s/TP tokens; expert TP gathers ETP times the rows for 1/ETP of
    # the ffn; the shared expert is split as a dense MLP.  Summed over the TP ranks, every GEMM's FLOPs are one
    # TP-1 rank's.
    model, *_ = configs(*TP2, "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", str(etp))
    one = {g.name: g for g in experts.expert_gemms(model, 2, 1, 2)}
    split = {g.name: g for g in experts.expert_gemms(model, 2, 1, 2, tp=2, etp=etp)}
    assert one.keys() == split.keys() == {"router", "expert_fc1", "expert_fc2", "shared_fc1", "shared_fc2"}
    for name in one:
        assert 2 * split[name].flops == pytest.approx(one[name].flops), name
    tokens = 2 * 32 // 2
    assert split["router"].m == tokens
    assert (split["expert_fc1"].m, split["expert_fc1"].n) == (tokens * 2 * 2 * etp // 8, 2 * 48 // etp)
    assert (split["shared_fc1"].m, split["shared_fc1"].n) == (2 * 32, 2 * 32 // 2)


@pytest.mark.parametrize("etp", [1, 2])
def test_expert_state_splits_over_ep_and_expert_tp(etp):
    model, parallel, training, optimizer = configs(*TP2, "--expert-model-parallel-size", "2",
                                                   "--expert-tensor-parallel-size", str(etp), "--global-batch-size",
                                                   "8", "--use-distributed-optimizer")
    layout = layout_of(parallel, training, optimizer, 8)
    assert (layout.ep, layout.etp, layout.edp) == (2, etp, 8 // (2 * etp))
    memory = memory_per_stage(model, parallel, optimizer, layout)[0]
    assert memory.expert_parameters == pytest.approx(2 * experts.expert_parameters_per_layer(model) / (2 * etp))
    p = predict(model, parallel, training, optimizer, H100, 8)
    assert p.fits and p.iteration_time_s > 0


def test_expert_tp_adds_its_gather_and_scatter_to_the_dispatch():
    model, *_ = configs(*TP2, "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "2",
                        "--moe-token-dispatcher-type", "alltoall")
    link, etp_link = Link(100.0, 10.0), Link(50.0, 5.0)
    rows = 2 * (2 * 32 // 2) * 2 * 64                          # e x this rank's s/TP tokens x k x h
    forward, backward = experts.dispatch_times(model, 2, 1, 2, 2, link, tp=2, etp=2, etp_link=etp_link)
    exchange = 2 * comm.all_to_all_time(rows, 2, link)
    gather = 2 * comm.all_to_all_time(2 * rows, 2, etp_link)     # the rows to the expert-TP pair and back
    counts = comm.all_to_all_time(8 * 8, 2, link) + comm.all_gather_time(8 * 8 / 2 * 2, 2, etp_link)
    assert backward == pytest.approx(exchange + gather) and forward == pytest.approx(backward + counts)
    plain, plain_back = experts.dispatch_times(model, 2, 1, 2, 2, link, tp=2, etp=1)
    assert plain_back == pytest.approx(exchange)
    assert plain == pytest.approx(exchange + comm.all_to_all_time(64, 2, link))


def test_moe_layers_without_a_shared_expert_skip_the_mlps_tp_collectives():
    # The sequence-parallel gather and scatter around an MLP are half of a layer's TP collectives; an MoE layer
    # runs them only for its shared expert.
    with_shared, *_ = configs(*TP2)
    assert experts.tp_collectives_share(with_shared) == 1.0
    without = dataclasses.replace(with_shared, moe_shared_expert_intermediate_size=None)
    assert experts.tp_collectives_share(without) == 0.5                    # both layers MoE
    every_other = dataclasses.replace(without, moe_layer_freq=2)
    assert experts.tp_collectives_share(every_other) == 0.75


def test_mixtral_plans_at_tensor_parallel_size_two():
    candidate = plan(MIXTRAL + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                "--expert-model-parallel-size", "8"], H100, 64)
    assert candidate.prediction.fits and candidate.prediction.layout["tp"] == 2


def test_expert_groups_lie_where_the_grid_puts_them():
    # Expert TP fastest, then EP, then expert-DP (parallel/state.py): on nodes of 4, TP 4 x DP 4 with EP 2 and
    # expert TP 4 puts an EP pair 4 ranks apart (across nodes) and expert TP inside a node; with expert TP 1
    # the EP pair is two neighbours.  Expert-DP's members are EP x ETP apart.
    hw = dataclasses.replace(H100, gpus_per_node=4)
    wide = comm.GridStrides(tp=4, cp=1, dp=4, pp=1, ep=2, etp=4)
    assert wide.ep_link(hw) == comm.group_link(hw, 2, 4) and wide.ep_link(hw).latency_us == hw.inter_node.latency_us
    assert wide.etp_link(hw) == hw.intra_node
    assert wide.expert_link(hw) == comm.group_link(hw, 8, 1)
    assert wide.edp_link(hw) == comm.group_link(hw, 2, 8)
    narrow = comm.GridStrides(tp=4, cp=1, dp=4, pp=1, ep=2, etp=1)
    assert narrow.ep_link(hw) == hw.intra_node
    assert narrow.edp_link(hw) == comm.group_link(hw, 8, 2)


def test_the_allgather_dispatcher_gathers_over_expert_tp_times_ep():
    model, *_ = configs(*TP2, "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "2",
                        "--moe-token-dispatcher-type", "allgather")
    link, group = Link(100.0, 10.0), Link(40.0, 20.0)
    gathered = 2 * (2 * 32 // 2) * 64 * 4                        # e x s/TP tokens x h x (EP x ETP)
    forward, backward = experts.dispatch_times(model, 2, 1, 2, 2, link, tp=2, etp=2, group_link=group)
    expected = comm.all_gather_time(gathered, 4, group) + comm.reduce_scatter_time(gathered, 4, group)
    assert forward == pytest.approx(expected) and backward == pytest.approx(expected)


def test_moe_activations_under_tp_and_expert_tp():
    # A rank's s/TP tokens; expert TP keeps the gathered expert input (X times the rows of h) and the
    # activation's and fc2's inputs at X times the rows of f/X.
    model, *_ = configs(*TP2)
    tokens, k, h, f, e, experts_count = 2 * 32 // 2, 2, 64, 48, 2, 8
    for etp in (1, 2):
        expected = e * tokens * k * ((etp + 1) * h + 2 * f) + 4 * tokens * experts_count
        assert experts.moe_extra_activation_bytes(model, 2, tp=2, etp=etp) == expected
    assert experts.moe_extra_activation_bytes(model, 2, tp=2, etp=2, recompute="full") == 0.0


def test_a_calibrated_permutation_rate_prices_the_moe_permutation():
    # A calibration's measured "permute" row (calibration/ops.py: megalite's permute and unpermute) replaces the
    # memory bandwidth for the permutation's 2 x 2 e T k h bytes: forward at its forward rate, backward at its own.
    moe, *_ = parse_args(["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                          "--seq-length", "32", "--max-position-embeddings", "32", "--vocab-size", "128",
                          "--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear", "--bf16"],
                         world_size=1)
    permuted = 2 * 2 * 2 * (2 * 32 * 2) * 64          # bytes: 2 x 2 e, T = 2 x 32 tokens, k = 2, h = 64
    slow = dataclasses.replace(H100, elementwise=(("permute", "bfloat16", permuted, 1.0, 0.5),))
    plain = experts.mixed_layer_times(moe, 2, H100, "bfloat16")
    measured = experts.mixed_layer_times(moe, 2, slow, "bfloat16")
    bandwidth = H100.hbm_gbs * 1e9 * H100.memory_efficiency
    assert measured.forward - plain.forward == pytest.approx(permuted / 1e9 - permuted / bandwidth)
    assert measured.backward_input - plain.backward_input == pytest.approx(
        2 * permuted / 0.5e9 - 2 * permuted / bandwidth)
