"""The experts' GEMMs (megalite/model/moe/experts.py): the per-expert loop's backward writes each expert's
gradient once, and the grouped path equals the loop, forward and backward, on this machine's device."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalite.config.settings import ModelConfig
from megalite.model.moe.experts import Experts, grouped_mm, grouped_mm_available


class _CountWritten(TorchDispatchMode):
    """Sums the elements of every tensor the dispatched ops write: what they return, or their out= tensors."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable:      # an in-place or out= op writes its out tensor(s), the result
            written = (kwargs or {}).get("out", out)
        else:
            written = out if func.is_view is False else []
        for tensor in written if isinstance(written, (tuple, list)) else [written]:
            if isinstance(tensor, torch.Tensor):
                self.elements += tensor.numel()
        return out


def test_loop_backward_writes_each_experts_gradient_once():
    """Indexing weight[e] per expert made backward write E whole [E, in, out] gradients (E^2 in out elements:
    at E=64, 2.6 s for one forward + backward on this machine, benchmarks/moe_step.py); the loop must write
    about one weight's worth per GEMM."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 2, 4, 0, 1, 2, 3, 1, 1, 2, 0, 3, 2])
    x = torch.randn(int(counts.sum()), 8, requires_grad=True)
    weight = torch.randn(16, 8, 8, requires_grad=True)
    out = grouped_mm(x, weight, counts, fused=False)
    probe = torch.randn_like(out)
    with _CountWritten() as written:
        out.backward(probe)
    assert written.elements <= 2 * weight.numel() + 4 * x.numel(), written.elements


def _grouped_kernel_or_skip(x, weight):
    if not grouped_mm_available(x, weight):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm for the CPU in {x.dtype}")


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [1, 1, 1, 1], [40, 2, 0, 17]])
def test_grouped_kernel_equals_the_loop_forward_and_backward(counts):
    """Every expert's rows, experts with no rows among them, forward and both gradients within float32
    round-off (the kernel may sum the inner dimension in another order)."""
    torch.manual_seed(1)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    weight = torch.randn(4, 16, 24, requires_grad=True)
    _grouped_kernel_or_skip(x, weight)
    fused, loop = grouped_mm(x, weight, counts, True), grouped_mm(x, weight, counts, False)
    assert fused.grad_fn.name() != loop.grad_fn.name()         # the kernel ran, not the loop again
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(fused)
    got = torch.autograd.grad((fused * probe).sum(), [x, weight])
    want = torch.autograd.grad((loop * probe).sum(), [x, weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for e in (counts == 0).nonzero().flatten().tolist():       # an expert without rows gets a zero gradient
        assert not got[1][e].any()


def test_experts_module_grouped_equals_loop_with_a_broadcast_gradient():
    """Experts (GELU between the GEMMs) both ways; a plain .sum() backward hands the kernel a gradient of
    strides 0, which it refuses unless made contiguous."""
    config = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=1, add_bias_linear=False,
                         num_experts=4, moe_ffn_hidden_size=8, moe_grouped_gemm=True)
    torch.manual_seed(2)
    experts = Experts(config, output_init_std=0.02)
    for weight in experts.parameters():        # new_parameter leaves them empty: the model draws them
        torch.nn.init.normal_(weight, std=0.3)
    counts = torch.tensor([2, 0, 6, 3])
    rows = torch.randn(11, 16, requires_grad=True)
    _grouped_kernel_or_skip(rows, experts.weight1)
    results = []
    for fused in (True, False):
        experts.fused = fused
        out = experts(rows, counts)
        results.append((out, *torch.autograd.grad(out.sum(), [rows, experts.weight1, experts.weight2])))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_rows_and_unaligned_shapes_take_the_loop():
    x, weight = torch.randn(0, 16), torch.randn(4, 16, 24)
    assert not grouped_mm_available(x, weight)
    assert grouped_mm(x, weight, torch.zeros(4, dtype=torch.long), True).shape == (0, 24)
    assert not grouped_mm_available(torch.randn(5, 6), torch.randn(4, 6, 8))    # 24-byte rows
    assert not grouped_mm_available(torch.randn(5, 8, dtype=torch.float64), torch.randn(4, 8, 8, dtype=torch.float64))
