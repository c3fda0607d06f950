"""Pure-PyTorch LayerNorm, RMSNorm and SwiGLU: what the csrc kernels compute, and the oracle of their tests.

Statistics are taken in fp32 whatever the input dtype, and the output is rounded once to the
input's dtype; the kernels do the same, so for bf16/fp16 the two differ only by the order of the
fp32 sums.  Gradients come from PyTorch autograd through these expressions.

    x: [..., h]   weight, bias: [h]   ->   y: [..., h] (x.dtype)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dim (Ba et al. 2016, Eq. 4)."""
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    centered = xf - mean
    var = centered.square().mean(dim=-1, keepdim=True)      # biased variance, as nn.LayerNorm
    y = centered * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim (Zhang & Sennrich 2019, Eq. 4)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Shazeer 2020) of h's interleaved (gate, up) pairs: [..., 2f] -> [..., f].  In h's
    dtype as PyTorch computes it (for bf16/fp16 silu's result is rounded before the product; the CUDA
    kernel rounds once, so the two differ by a rounding)."""
    gate, up = h.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(gate) * up
