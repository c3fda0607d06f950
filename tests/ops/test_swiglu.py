"""ops.swiglu on a CPU: the reference it runs there is the unfused expression the MLP used before
(silu(gate) * up of the interleaved halves); its errors and the interleaved layout.  The
CUDA kernel against the same reference: tests/ops/test_cuda_kernels.py."""
import pytest
import torch
import torch.nn.functional as F

from megalite.ops import swiglu


def unfused(h):
    gate, up = h.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(gate) * up


def test_pairs_are_interleaved():
    h = torch.tensor([[1.0, 2.0, -3.0, 4.0]])                 # (gate 1, up 2), (gate -3, up 4)
    expected = torch.tensor([[F.silu(torch.tensor(1.0)) * 2, F.silu(torch.tensor(-3.0)) * 4]])
    torch.testing.assert_close(swiglu(h), expected)


@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 14), (1, 2)])
def test_fp32_matches_the_unfused_expression_forward_and_backward(shape):
    torch.manual_seed(0)
    h = torch.randn(shape, requires_grad=True)
    ours = swiglu(h)
    dy = torch.randn_like(ours)
    (grad,) = torch.autograd.grad(ours, h, dy)
    h2 = h.detach().clone().requires_grad_()
    want = unfused(h2)
    (want_grad,) = torch.autograd.grad(want, h2, dy)
    torch.testing.assert_close(ours, want, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_a_cpu_is_the_unfused_expression(dtype):
    torch.manual_seed(0)
    h = torch.randn(64, 32).to(dtype)
    torch.testing.assert_close(swiglu(h), unfused(h), rtol=0, atol=0)
    torch.testing.assert_close(swiglu(h), unfused(h.float()).to(dtype))      # within a rounding of fp32


def test_bad_inputs_get_one_clear_error():
    with pytest.raises(ValueError, match=r"\[\.\.\., 2f\]"):
        swiglu(torch.randn(4, 7))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        swiglu(torch.ones(4, 8, dtype=torch.int64))
