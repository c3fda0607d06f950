"""Autograd front of the fused LayerNorm / RMSNorm kernels (csrc/norm_math.h, csrc/cpu, csrc/cuda).

    x: [..., h] contiguous, fp32 / bf16 / fp16     weight, bias: [h], x's dtype or fp32
    y: [..., h] in x's dtype; per-row statistics (mean, rstd): [rows] fp32, saved for backward

The forward keeps only x and the two fp32 row statistics for the backward (not the normalized
x), the same memory as PyTorch's own LayerNorm.  Where the compiled kernel for x's device is not
available, or ``MEGALITE_KERNELS=reference``, the pure-PyTorch reference (``reference.py``) runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from megalite.ops import reference
from megalite.ops.backend import check_tensor, use_native

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if weight is None:
        raise ValueError("weight is None; megalite's norms need a weight of shape [h] (use torch.ones(h))")
    check_tensor("x", x, x.device, _DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; the norms need x: [..., h] with h >= 1 "
                         f"(for a single vector use x.view(1, -1))")
    hidden = x.shape[-1]
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        check_tensor(name, tensor, x.device, (x.dtype, torch.float32))
        if tuple(tensor.shape) != (hidden,):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but x {tuple(x.shape)} needs [{hidden}]")


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        rows = x.view(-1, x.shape[-1])
        y, mean, rstd = torch.ops.megalite.layer_norm_forward(rows, weight, bias, eps)
        ctx.save_for_backward(rows, mean, rstd, weight)
        ctx.has_bias = bias is not None
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        rows, mean, rstd, weight = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.megalite.layer_norm_backward(
            dy.contiguous().view_as(rows), rows, mean, rstd, weight)
        return dx.view(dy.shape), dweight, dbias if ctx.has_bias else None, None


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = x.view(-1, x.shape[-1])
        y, rstd = torch.ops.megalite.rms_norm_forward(rows, weight, eps)
        ctx.save_for_backward(rows, rstd, weight)
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        rows, rstd, weight = ctx.saved_tensors
        dx, dweight = torch.ops.megalite.rms_norm_backward(dy.contiguous().view_as(rows), rows, rstd, weight)
        return dx.view(dy.shape), dweight, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over the last dim. x: [..., h] contiguous; weight, bias (or None): [h] -> [..., h]."""
    _check_inputs(x, weight, bias)
    if not use_native(x.device):
        return reference.layer_norm(x, weight, bias, eps)
    return _LayerNormFunction.apply(x, weight, bias, float(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim. x: [..., h] contiguous; weight: [h] -> [..., h]."""
    _check_inputs(x, weight, None)
    if not use_native(x.device):
        return reference.rms_norm(x, weight, eps)
    return _RMSNormFunction.apply(x, weight, float(eps))
