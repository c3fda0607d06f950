"""The experts' GEMMs (megalite/model/moe/experts.py): the per-expert loop's backward writes each expert's
gradient once, and the grouped path equals the loop, forward and backward, on this machine's device."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megalite.model.moe.experts import grouped_mm


class _CountWritten(TorchDispatchMode):
    """Sums the elements of every tensor the dispatched ops return (what they wrote)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and not func._schema.is_mutable and func.is_view is False:
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
