"""Block attention (megalite/parallel/block_attention.py): a causal sequence cut into blocks, each
run by the fused kernel and merged by log-sum-exp, equals one causal attention call, forward and
backward, on every kernel the device has (CPU flash, the math reference, and on a GPU the
memory-efficient kernel in float32 and bfloat16)."""
import pytest
import torch
import torch.nn.functional as F

from megalite.parallel.block_attention import Pair, backward_pairs, forward_pairs, kernel_name, new_accumulators

ALL = slice(None)
# Rows 0..11 cut at 4 and 8: the diagonal blocks causal, the blocks below them full.
PAIRS = [Pair(ALL, slice(0, 4), slice(0, 4), True), Pair(ALL, slice(4, 8), slice(0, 4), False),
         Pair(ALL, slice(4, 8), slice(4, 8), True), Pair(ALL, slice(8, 12), slice(0, 8), False),
         Pair(ALL, slice(8, 12), slice(8, 12), True)]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def _blocks_against_one_call(device, dtype, groups):
    g = torch.Generator().manual_seed(groups)
    q, k, v = (torch.randn(2, heads, 12, 16, generator=g).to(device, dtype).requires_grad_()
               for heads in (4, groups, groups))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    dout = torch.randn_like(reference)
    reference.backward(dout)
    with torch.no_grad():
        out, lse = new_accumulators(q)
        forward_pairs(q, k, v, PAIRS, out, lse)
        out = out.to(dtype)
        grads = [torch.zeros(x.shape, dtype=torch.float32, device=device) for x in (q, k, v)]
        backward_pairs(dout, q, k, v, out, lse, PAIRS, *grads)
    return [(out, reference)] + [(grad, x.grad) for grad, x in zip(grads, (q, k, v))]


@pytest.mark.parametrize("kernel", ["fused", "math"])
@pytest.mark.parametrize("groups", [4, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_blocks_merged_by_log_sum_exp_equal_one_causal_call(device, groups, kernel, monkeypatch):
    if kernel == "math":
        monkeypatch.setenv("MEGALITE_BLOCK_ATTENTION", "math")
    assert (kernel_name(torch.device(device)) == "math") == (kernel == "math")
    for ours, reference in _blocks_against_one_call(device, torch.float32, groups):
        torch.testing.assert_close(ours.float(), reference.float(), rtol=1e-5, atol=2e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_blocks_on_the_gpu_within_bfloat16_rounding():
    for ours, reference in _blocks_against_one_call("cuda", torch.bfloat16, 2):
        torch.testing.assert_close(ours.float(), reference.float(), rtol=2e-2, atol=2e-2)
