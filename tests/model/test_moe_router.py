"""The router against a straightforward per-token reference written from the definitions (router.py's docstring):
choice and weights for every score function, the balancing losses as Switch's f_i P_i sums, the z-loss."""
import math

import pytest
import torch

from megalite.config.settings import ModelConfig
from megalite.model.moe import aux_loss
from megalite.model.moe.router import (
    TopKRouter,
    scores_for_aux_loss,
    sequence_load_balancing_loss,
    switch_load_balancing_loss,
    topk_routing,
    z_loss,
)


def reference_routing(logits, k, score_function, pre_softmax, bias=None, scale=None):
    """Token by token, with Python lists: (weights, experts) as the definitions say."""
    weights, experts = [], []
    for row in logits.double().tolist():
        if score_function == "softmax":
            soft = [math.exp(z - max(row)) for z in row]
            soft = [v / sum(soft) for v in soft]
            key = soft if pre_softmax else row
            chosen = sorted(range(len(row)), key=lambda e: -key[e])[:k]
            if pre_softmax:
                w = [soft[e] for e in chosen]
            else:
                top = [math.exp(row[e] - row[chosen[0]]) for e in chosen]
                w = [v / sum(top) for v in top]
        else:
            sig = [1 / (1 + math.exp(-z)) for z in row]
            key = [s + (bias[e] if bias is not None else 0.0) for e, s in enumerate(sig)]
            chosen = sorted(range(len(row)), key=lambda e: -key[e])[:k]
            w = [sig[e] for e in chosen]
            if k > 1:
                w = [v / sum(w) for v in w]
        weights.append([v * (scale or 1.0) for v in w])
        experts.append(chosen)
    return torch.tensor(weights), torch.tensor(experts)


@pytest.mark.parametrize("score_function, pre_softmax, k, bias, scale", [
    ("softmax", False, 2, None, None), ("softmax", True, 2, None, None), ("softmax", False, 1, None, 2.5),
    ("sigmoid", False, 2, None, None), ("sigmoid", False, 1, None, None), ("sigmoid", False, 3, "bias", None)])
def test_routing_matches_reference(score_function, pre_softmax, k, bias, scale):
    torch.manual_seed(0)
    logits = torch.randn(40, 6, dtype=torch.float64)
    bias = torch.linspace(-0.3, 0.3, 6, dtype=torch.float64) if bias else None
    weights, experts = topk_routing(logits, k, score_function, pre_softmax, bias, scale)
    ref_weights, ref_experts = reference_routing(logits, k, score_function, pre_softmax,
                                                 None if bias is None else bias.tolist(), scale)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights.to(weights.dtype))


def test_expert_bias_changes_the_choice_not_the_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0], dtype=torch.float64)
    weights, experts = topk_routing(logits, 1, "sigmoid", expert_bias=bias)
    assert experts.tolist() == [[3]]
    torch.testing.assert_close(weights, torch.sigmoid(logits[:, 3:]))


def reference_switch_loss(scores, experts, k):
    """E sum_i f_i P_i: f_i the fraction of the T k assignments that went to i, P_i i's mean score."""
    tokens, num_experts = scores.shape
    f = [sum(row.count(i) for row in experts.tolist()) / (tokens * k) for i in range(num_experts)]
    p = scores.mean(dim=0).tolist()
    return num_experts * sum(fi * pi for fi, pi in zip(f, p))


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_load_balancing_losses_match_reference(score_function):
    torch.manual_seed(1)
    seq, batch, k = 5, 3, 2
    logits = torch.randn(seq * batch, 4, dtype=torch.float64)
    scores = scores_for_aux_loss(logits, score_function)
    experts = topk_routing(logits, k, score_function)[1]
    load = torch.bincount(experts.reshape(-1), minlength=4).double()
    expected = reference_switch_loss(scores, experts, k)
    assert switch_load_balancing_loss(scores, load, k).item() == pytest.approx(expected)
    per_sequence = [reference_switch_loss(scores[b::batch], experts[b::batch], k) for b in range(batch)]
    routing_map = torch.zeros(seq * batch, 4, dtype=torch.bool).scatter_(1, experts, True)
    per_sequence_loss = sequence_load_balancing_loss(scores, routing_map, batch, k).item()
    assert per_sequence_loss == pytest.approx(sum(per_sequence) / batch)
    even = torch.full((8, 4), 0.25, dtype=torch.float64)
    assert switch_load_balancing_loss(even, torch.full((4,), 4.0, dtype=torch.float64), 2).item() == pytest.approx(1.0)


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_router_losses_weighted_recorded_and_only_in_training():
    cfg = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, add_bias_linear=False, num_experts=4,
                      moe_router_topk=2, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    router = TopKRouter(cfg, layer_number=3)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(6, 2, 8)
    aux_loss.take_records()
    weights, experts, kept, total = router(x)
    assert kept is None                                   # dropless
    logits = x.reshape(-1, 8) @ router.weight.t()
    load = torch.bincount(experts.reshape(-1), minlength=4).float()
    balance = switch_load_balancing_loss(scores_for_aux_loss(logits, "softmax"), load, 2)
    torch.testing.assert_close(total, 0.1 * balance + 0.01 * z_loss(logits))
    records = aux_loss.take_records()
    torch.testing.assert_close(records["load_balancing_loss"][3], balance.detach())
    torch.testing.assert_close(records["z_loss"][3], z_loss(logits).detach())
    router.eval()
    assert router(x)[3] is None and aux_loss.take_records() == {}


def test_attached_loss_gets_the_backward_scale():
    out, aux = torch.zeros(3, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    try:
        aux_loss.set_backward_scale(0.25)
        (aux_loss.attach(out, aux * 3.0).sum() * 2).backward()
    finally:
        aux_loss.set_backward_scale(1.0)
    assert aux.grad.item() == pytest.approx(0.75)       # d(3 aux)/d aux x scale, independent of the main loss
    assert out.grad.tolist() == [2.0, 2.0, 2.0]


def test_expert_bias_state_stays_float32_in_a_bfloat16_model():
    cfg = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, add_bias_linear=False, num_experts=4,
                      moe_router_topk=1, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    router = TopKRouter(cfg, layer_number=0).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == router.tokens_per_expert.dtype == torch.float32
    x = torch.randn(300, 1, 8, dtype=torch.bfloat16)
    with torch.enable_grad():
        router(x)
    assert router.tokens_per_expert.sum().item() == 300        # exact past bfloat16's 256
    assert "expert_bias" in router.state_dict() and "tokens_per_expert" not in router.state_dict()


def test_recompute_repeats_the_math_not_the_counting():
    from megalite.parallel import random as tp_random
    cfg = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, add_bias_linear=False, num_experts=4,
                      moe_router_topk=2, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                      moe_aux_loss_coeff=0.1)
    router = TopKRouter(cfg, layer_number=0)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(5, 2, 8, requires_grad=True)
    aux_loss.take_records()

    def weighted_loss(x):
        weights, _, _, total = router(x)
        return weights.sum() + total
    plain = torch.autograd.grad(weighted_loss(x), [x, router.weight])
    plain_records = aux_loss.take_records()
    router.tokens_per_expert.zero_()
    recomputed = torch.autograd.grad(tp_random.checkpoint(weighted_loss, x), [x, router.weight])
    assert router.tokens_per_expert.sum().item() == 5 * 2 * 2          # tokens x k, once
    assert aux_loss.take_records() == plain_records
    for got, want in zip(recomputed, plain):
        torch.testing.assert_close(got, want)


def reference_capacity(weights, experts, num_experts, capacity, policy):
    """Expert by expert: its (token, slot) pairs in policy order, the first ``capacity`` kept."""
    kept = [[False] * experts.shape[1] for _ in range(experts.shape[0])]
    for e in range(num_experts):
        pairs = [(t, j) for t in range(experts.shape[0]) for j in range(experts.shape[1]) if experts[t, j] == e]
        if policy == "probs":
            pairs.sort(key=lambda pair: (-float(weights[pair]), pair[0]))
        for t, j in pairs[:capacity]:
            kept[t][j] = True
    return torch.tensor(kept)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_keeps_what_the_policy_says(policy):
    from megalite.model.moe.capacity import capacity_masks, expert_capacity
    torch.manual_seed(6)
    logits = torch.randn(12, 4)
    weights, experts = topk_routing(logits, 2, "softmax")
    capacity = expert_capacity(12, 2, 4, 0.5)
    assert capacity == 3
    kept, routing_map = capacity_masks(weights, experts, 4, capacity, policy, pad=False)
    assert torch.equal(kept, reference_capacity(weights, experts, 4, capacity, policy))
    assert not kept.all() and routing_map.sum(dim=0).max() <= capacity
    expected_map = torch.zeros(12, 4, dtype=torch.bool)
    for t, j in kept.nonzero().tolist():
        expected_map[t, experts[t, j]] = True
    assert torch.equal(routing_map, expected_map)            # what the balancing loss counts: the kept pairs
    padded = capacity_masks(weights, experts, 4, capacity, policy, pad=True)
    assert torch.equal(padded[0], kept) and padded[1].sum(dim=0).tolist() == [capacity] * 4


def test_dropped_pairs_weigh_nothing_and_are_not_counted():
    cfg = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, add_bias_linear=False, num_experts=4,
                      moe_router_topk=2, moe_expert_capacity_factor=0.5, moe_aux_loss_coeff=0.1)
    router = TopKRouter(cfg, layer_number=0)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(6, 2, 8)
    aux_loss.take_records()
    weights, experts, kept, _ = router(x)
    assert not kept.all() and torch.equal(weights == 0, ~kept)
    logits = x.reshape(-1, 8) @ router.weight.t()
    load = torch.bincount(experts[kept], minlength=4).float()
    expected = switch_load_balancing_loss(scores_for_aux_loss(logits, "softmax"), load, 2)
    torch.testing.assert_close(aux_loss.take_records()["load_balancing_loss"][0], expected.detach())


def _sequence_loss_and_grad(rank, world_size, cp, tp=1):
    """The router's weighted seq_aux_loss over two sequences of 8 tokens, and its weight's gradient: summed over
    the TP ranks (each routes its s / TP of every sequence, as sequence parallelism splits it; the weight's
    gradient is a partial sum over TP) and averaged over the CP ranks (as data parallelism averages them over
    DP x CP), each CP rank holding s / CP of each sequence in the balanced split."""
    from megalite.parallel import state
    from megalite.parallel.context_parallel import split_sequence
    if cp * tp > 1:
        grid = state.initialize_grid(tp=tp, cp=cp)
    cfg = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, add_bias_linear=False, num_experts=4,
                      moe_router_topk=2, moe_aux_loss_coeff=1.0, moe_router_load_balancing_type="seq_aux_loss")
    router = TopKRouter(cfg, layer_number=0, sequence_parallel=tp > 1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(8, 2, 8, generator=torch.Generator().manual_seed(4))     # [s, b, h]: two sequences
    # Sequence 0's tokens lean to expert 0 at the start and to expert 3 at the end, so each CP or TP rank alone
    # sees another load than the whole sequence's.
    x[:4, 0] += 2 * router.weight[0].detach()
    x[4:, 0] += 2 * router.weight[3].detach()
    if cp > 1:
        x = split_sequence(x, cp, grid.cp_rank, dim=0)
    if tp > 1:
        x = x.chunk(tp, dim=0)[grid.tp_rank]
    total = router(x)[3]
    total.backward()
    loss, grad = total.detach(), router.weight.grad
    if cp * tp > 1:
        torch.distributed.all_reduce(loss)
        torch.distributed.all_reduce(grad)
        state.destroy_grid()
    return float(loss) / cp, (grad / cp).tolist()


@pytest.mark.parametrize("world_size, cp, tp", [(2, 2, 1), (2, 1, 2), (4, 2, 2)], ids=["CP=2", "TP=2", "TP=2 CP=2"])
def test_sequence_loss_under_context_and_tensor_parallelism_equals_one_rank(world_size, cp, tp):
    """CP=2, TP=2 (sequence parallel) and both give one rank's seq_aux_loss and gradient: each sequence's loads
    summed over the TP x CP group, each rank's loss its share."""
    from megalite.parallel.testing import run_on_ranks
    loss, grad = _sequence_loss_and_grad(0, 1, 1)
    for got_loss, got_grad in run_on_ranks(_sequence_loss_and_grad, world_size, cp, tp):
        assert got_loss == pytest.approx(loss, rel=1e-6)
        torch.testing.assert_close(torch.tensor(got_grad), torch.tensor(grad), rtol=1e-5, atol=1e-7)
