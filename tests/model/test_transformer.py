"""megalite/model/transformer.py: grouped-query attention without torch's enable_gqa (torch < 2.5)."""
import pytest
import torch

from megalite.model import transformer


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_attention_without_enable_gqa_matches_with_it(monkeypatch, groups):
    # The torch < 2.5 path (k and v repeated per query head) against the one this torch takes.
    # Under torch < 2.5 both sides run the fallback and the test cannot tell them apart: the
    # oracle is then the parity tests, which train GQA models against one process.
    torch.manual_seed(0)
    q = torch.randn(2, 8, 5, 4)
    k, v = torch.randn(2, groups, 5, 4), torch.randn(2, groups, 5, 4)
    reference = transformer.causal_attention(q, k, v, 0.0)
    monkeypatch.setattr(transformer, "SDPA_TAKES_GQA", False)
    # atol: the same values through the same kernel, so only fp32 round-off of reordered sums differs.
    torch.testing.assert_close(transformer.causal_attention(q, k, v, 0.0), reference, rtol=0, atol=1e-6)
    # Head 5 of 8 reads group 5 // (8 / groups): the layout the fused QKV weight assumes.
    group = 5 // (8 // groups)
    scores = (q[:, 5] @ k[:, group].transpose(-1, -2) / 2.0).masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(reference[:, 5], scores.softmax(-1) @ v[:, group], rtol=0, atol=1e-6)


def rotate_half_reference(x, position_ids, head_dim, base):
    """RoPE as the rotate-half formula reads, with [s, b, 1, d] tables: x cos + rotate_half(x) sin."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = position_ids.t().unsqueeze(-1).float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return (x.float() * angles.cos() + rotated_half.float() * angles.sin()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grouped", [False, True])
def test_apply_rotary_is_the_rotate_half_formula_bit_for_bit(dtype, grouped):
    """Forward equal to the rotate-half form exactly (the same float32 products and sums), and so is
    the float32 backward; for a plain [s, b, n, d] input and for q's strided view [s, b, g, n/g, d]
    of a fused QKV output.  A bf16 gradient is rounded once, so it is at least as close to the exact
    one as autograd's."""
    s, b, groups, heads_per_group, d = 6, 2, 2, 3, 8
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(s, b, groups, heads_per_group + 2, d, generator=gen).to(dtype)
    position_ids = torch.arange(s).repeat(b, 1) + torch.tensor([[0], [5]])
    dy = torch.randn(s, b, groups * heads_per_group, d, generator=gen).to(dtype)
    cos, sin = transformer.rotary_tables(position_ids, d, 10000.0)

    leaf = qkv.clone().requires_grad_()
    q = leaf.split([heads_per_group, 1, 1], dim=3)[0]
    ours = transformer.apply_rotary(q if grouped else q.reshape(s, b, -1, d), cos, sin)
    ours.backward(dy)

    reference_leaf = qkv.clone().requires_grad_()
    q = reference_leaf.split([heads_per_group, 1, 1], dim=3)[0].reshape(s, b, -1, d)
    expected = rotate_half_reference(q, position_ids, d, 10000.0)
    expected.backward(dy)

    assert ours.is_contiguous() and ours.shape == expected.shape
    assert torch.equal(ours, expected)
    if dtype == torch.float32:
        assert torch.equal(leaf.grad, reference_leaf.grad)
    else:   # one rounding of g1 cos + g2 sin against autograd's two (each product, then their sum)
        exact = rotary_gradient_in_float64(dy, qkv.shape, position_ids, d, heads_per_group)
        ours_error = (leaf.grad.double() - exact).abs().max()
        assert ours_error <= (reference_leaf.grad.double() - exact).abs().max()
        # Apart by about one bf16 step (2^-7 relative) plus one at the gradients' scale (~1): where
        # g1 cos + g2 sin cancels, the two roundings differ relatively by far more than bf16's epsilon.
        torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=2 ** -7, atol=2 ** -7)


def rotary_gradient_in_float64(dy, qkv_shape, position_ids, head_dim, heads_per_group):
    """d(sum dy * rope(q))/d qkv in float64: the inverse rotation of dy in q's slots, zero elsewhere."""
    s, b = qkv_shape[:2]
    q = torch.zeros(qkv_shape, dtype=torch.float64).split([heads_per_group, 1, 1], dim=3)[0]
    q = q.reshape(s, b, -1, head_dim).requires_grad_()
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = (position_ids.t().unsqueeze(-1).double() * inv_freq).unsqueeze(2)
    angles = torch.cat([angles, angles], dim=-1)
    first, second = q.chunk(2, dim=-1)
    (q * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()).mul(dy.double()).sum().backward()
    grad = torch.zeros(qkv_shape, dtype=torch.float64)
    grad.split([heads_per_group, 1, 1], dim=3)[0].copy_(q.grad.view(s, b, -1, heads_per_group, head_dim))
    return grad
