"""The MoE layer against a token-by-token reference: each token through its k experts' MLPs, weighted, summed,
plus the shared expert; the permutation's round trip; the grouped GEMM's fallback; gradients of every part."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megalite.config.settings import ModelConfig
from megalite.model.gpt import GPTModel
from megalite.model.moe.experts import grouped_mm, permute, unpermute
from megalite.model.moe.layer import MoELayer
from megalite.ops import reference


def moe_config(**overrides):
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=64,
                add_bias_linear=False, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=12,
                hidden_dropout=0.0, attention_dropout=0.0)
    return ModelConfig(**{**base, **overrides})


def reference_layer(layer: MoELayer, x, cfg):
    """Token by token: router scores, its k experts one at a time, the shared expert."""
    out = torch.zeros_like(x.reshape(-1, x.shape[-1]))
    weights, experts, kept, _ = layer.router(x)
    for t, token in enumerate(x.reshape(-1, x.shape[-1])):
        keeps = kept[t].tolist() if kept is not None else [True] * len(experts[t])
        for w, e, keep in zip(weights[t], experts[t].tolist(), keeps):
            if not keep:
                continue
            hidden = token @ layer.experts.weight1[e]
            if cfg.add_bias_linear:   # each expert's own biases; the weight scales fc2's bias too
                hidden = hidden + layer.experts.bias1[e]
            hidden = reference.swiglu(hidden) if cfg.swiglu else F.gelu(hidden)
            down = hidden @ layer.experts.weight2[e]
            out[t] += w * (down + layer.experts.bias2[e] if cfg.add_bias_linear else down)
    out = out.view_as(x)
    if layer.shared_expert is not None:
        gate = 1.0
        if layer.shared_expert_gate is not None:   # sigmoid(x . g), token by token
            gate = torch.stack([torch.sigmoid(token @ layer.shared_expert_gate[0])
                                for token in x.reshape(-1, x.shape[-1])]).view(*x.shape[:-1], 1)
        out = out + gate * layer.shared_expert(x)
    return out


@pytest.mark.parametrize("extra", [dict(), dict(swiglu=True, moe_shared_expert_intermediate_size=8),
                                   dict(moe_shared_expert_intermediate_size=8, moe_shared_expert_gate=True),
                                   dict(moe_router_score_function="sigmoid", moe_router_topk=3, moe_grouped_gemm=True),
                                   dict(moe_router_topk=1, moe_router_pre_softmax=True),
                                   dict(moe_expert_capacity_factor=0.5), dict(moe_expert_capacity_factor=0.5,
                                                                              moe_token_drop_policy="position"),
                                   dict(add_bias_linear=True),
                                   dict(add_bias_linear=True, moe_expert_capacity_factor=0.5),
                                   dict(add_bias_linear=True, swiglu=True, moe_grouped_gemm=True,
                                        moe_shared_expert_intermediate_size=8)])
def test_layer_matches_token_by_token(extra):
    cfg = moe_config(**extra)
    torch.manual_seed(0)
    layer = MoELayer(cfg, layer_number=0, output_init_std=0.02)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(5, 3, 16, requires_grad=True)
    out = layer(x)
    expected = reference_layer(layer, x, cfg)
    torch.testing.assert_close(out, expected)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad((expected * probe).sum(), [x, *layer.parameters()])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert all(g.abs().sum() > 0 for g in grads)     # router, experts (and shared expert) all learn


def test_permutation_round_trip_and_grouping():
    torch.manual_seed(2)
    tokens = torch.randn(7, 3)
    experts = torch.randint(0, 5, (7, 2))
    rows, order, counts = permute(tokens, experts, 5)
    assert counts.tolist() == [int((experts == e).sum()) for e in range(5)]
    owners = experts.reshape(-1)[order]
    assert torch.equal(owners, owners.sort().values)          # grouped by expert
    for j, row in enumerate(rows):
        assert torch.equal(row, tokens[order[j] // 2])
    weights = torch.rand(7, 2)
    back = unpermute(rows, order, weights, 7)
    torch.testing.assert_close(back, tokens * weights.sum(dim=1, keepdim=True))


def test_grouped_mm_fallback_is_per_block_product():
    torch.manual_seed(3)
    counts = torch.tensor([3, 0, 2, 4])
    x, weight, bias = torch.randn(9, 5), torch.randn(4, 5, 6), torch.randn(4, 6)
    owner = torch.repeat_interleave(torch.arange(4), counts)
    expected = torch.stack([x[i] @ weight[owner[i]] for i in range(9)])
    for fused in (False, True):
        torch.testing.assert_close(grouped_mm(x, weight, counts, fused), expected)
        torch.testing.assert_close(grouped_mm(x, weight, counts, fused, bias=bias), expected + bias[owner])


def test_grouped_kernel_path_adds_each_experts_bias(monkeypatch):
    """The torch._grouped_mm path's bias (repeated by the counts on the device), with the kernel replaced by
    a per-block product so that it runs on the CPU."""
    from megalite.model.moe import experts

    def blocks(x, weight, offs):
        starts = [0] + offs.tolist()[:-1]
        return torch.cat([x[a:b] @ weight[e] for e, (a, b) in enumerate(zip(starts, offs.tolist()))])
    monkeypatch.setattr(experts, "grouped_mm_available", lambda x, weight: True)
    monkeypatch.setattr(torch, "_grouped_mm", blocks, raising=False)
    torch.manual_seed(3)
    counts = torch.tensor([3, 0, 2, 4])
    x, weight, bias = torch.randn(9, 5), torch.randn(4, 5, 6), torch.randn(4, 6)
    owner = torch.repeat_interleave(torch.arange(4), counts)
    expected = torch.stack([x[i] @ weight[owner[i]] + bias[owner[i]] for i in range(9)])
    torch.testing.assert_close(experts.grouped_mm(x, weight, counts, True, bias=bias), expected)


def test_moe_layer_freq_places_experts_and_model_trains():
    cfg = moe_config(num_layers=3, moe_layer_freq=2, moe_aux_loss_coeff=1e-2)
    model = GPTModel(cfg)
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["MoELayer", "MLP", "MoELayer"]
    again = GPTModel(dataclasses.replace(cfg))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))   # drawn from the seed
    torch.manual_seed(4)
    tokens = torch.randint(0, 64, (4, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = model(tokens, labels=tokens).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_mm_kernel_matches_the_loop_on_cuda():
    from megalite.model.moe.experts import grouped_mm_available
    torch.manual_seed(5)
    x = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(4, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    counts = torch.tensor([16, 0, 24, 8], device="cuda")
    if not grouped_mm_available(x, weight):
        pytest.skip("torch._grouped_mm does not serve this device / torch")
    fused, loop = grouped_mm(x, weight, counts, True, bias=bias), grouped_mm(x, weight, counts, False, bias=bias)
    torch.testing.assert_close(fused.float(), loop.float(), rtol=2e-2, atol=2e-2)
    probe = torch.randn_like(fused)
    got = torch.autograd.grad((fused * probe).sum(), [x, weight, bias])
    want = torch.autograd.grad((loop * probe).sum(), [x, weight, bias])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=5e-2)
