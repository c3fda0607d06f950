"""Autograd front of the fused SwiGLU kernel (csrc/cuda/swiglu.cu).

    h: [..., 2f] fp32 / bf16 / fp16, the fc1 output with (gate_j, up_j) pairs interleaved
    y = silu(gate) * up: [..., f] in h's dtype (the kernel: fp32 math, rounded once)

The fused forward keeps only h for the backward (not silu(gate)), and the backward writes dh in one
pass (no stack of the two halves' gradients).  The kernel is CUDA's alone: on a CPU, and where the
CUDA extension is missing or ``MEGALITE_KERNELS=reference``, the reference runs (``reference.swiglu``:
PyTorch's own vectorized silu and mul under autograd).
"""
from __future__ import annotations

import torch

from megalite.ops import reference
from megalite.ops.backend import use_native

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return torch.ops.megalite.swiglu_forward(h)

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        return torch.ops.megalite.swiglu_backward(dy.contiguous(), h)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the interleaved (gate, up) pairs of h's last dim: [..., 2f] -> [..., f]."""
    if h.dtype not in _DTYPES:
        raise TypeError(f"h has dtype {h.dtype}; SwiGLU takes one of {[str(d) for d in _DTYPES]}")
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"h has shape {tuple(h.shape)}; SwiGLU needs [..., 2f]: (gate, up) pairs in the last dim")
    if h.device.type != "cuda" or not use_native(h.device):
        return reference.swiglu(h)
    return _SwiGLUFunction.apply(h.contiguous())
