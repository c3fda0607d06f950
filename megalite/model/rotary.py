"""Rotary position embedding (Su et al. 2021) in the "rotate half" layout, and its variants.

    --rotary-base B                    the angle of pair i at position p is p * B^(-2i/r)
    --rotary-percent P                 RoPE rotates the first r = P x head dim dimensions of each head
                                       and passes the rest through unchanged
    --use-rope-scaling                 Llama 3.1's frequency-dependent scaling of the frequencies
    --rotary-seq-len-interpolation-factor F   positions divided by F (linear interpolation)

Llama 3.1's scaling (factor f, low / high frequency factors 1 and 4, original context C = 8192, the
defaults Megatron-LM fixes): a pair whose wavelength 2 pi / freq is longer than C / low keeps
freq / f, one shorter than C / high keeps freq, and in between the two are mixed with the weight
w = (C / wavelength - low) / (high - low):  (1 - w) freq / f + w freq.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from megalite.config.model_settings import ModelConfig

__all__ = ["inverse_frequencies", "rotary_tables", "model_rotary_tables", "apply_rotary", "rotary_dim",
           "LLAMA3_LOW_FREQ_FACTOR", "LLAMA3_HIGH_FREQ_FACTOR", "LLAMA3_ORIGINAL_MAX_POSITIONS"]

LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0
LLAMA3_ORIGINAL_MAX_POSITIONS = 8192


def rotary_dim(config: ModelConfig) -> int:
    """The dimensions of each head that RoPE rotates (ModelConfig checks that it is even and positive)."""
    return int(config.head_dim * config.rotary_percent)


def inverse_frequencies(dim: int, base: float, device=None, *, llama3_factor: Optional[float] = None,
                        interpolation_factor: Optional[float] = None) -> torch.Tensor:
    """[dim/2] float32: base^(-2i/dim), then Llama 3.1's scaling by ``llama3_factor`` and the linear
    interpolation by ``interpolation_factor`` where given (see the module docstring)."""
    freq = 1.0 / base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    if llama3_factor is not None:
        low_wavelength = LLAMA3_ORIGINAL_MAX_POSITIONS / LLAMA3_LOW_FREQ_FACTOR
        high_wavelength = LLAMA3_ORIGINAL_MAX_POSITIONS / LLAMA3_HIGH_FREQ_FACTOR
        wavelength = 2 * math.pi / freq
        weight = ((LLAMA3_ORIGINAL_MAX_POSITIONS / wavelength - LLAMA3_LOW_FREQ_FACTOR)
                  / (LLAMA3_HIGH_FREQ_FACTOR - LLAMA3_LOW_FREQ_FACTOR))
        mixed = (1 - weight) * freq / llama3_factor + weight * freq
        scaled = torch.where(wavelength > low_wavelength, freq / llama3_factor, freq)
        middle = (wavelength <= low_wavelength) & (wavelength >= high_wavelength)
        freq = torch.where(middle, mixed, scaled)
    if interpolation_factor is not None:
        freq = freq / interpolation_factor
    return freq


def rotary_tables(position_ids: torch.Tensor, head_dim: int, base: float,
                  inv_freq: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [s, b, 1, d/2], for position_ids [b, s]: the angle pos * base^(-2i/d) of the
    pair (x_i, x_{i+d/2}) (Su et al. 2021, Eq. 34, in the "rotate half" layout), or pos * ``inv_freq``.

    Angles are computed in float32 whatever the model's dtype: positions times frequencies loses
    digits fast in 16-bit.  One table per half serves both halves (``apply_rotary``).
    """
    if inv_freq is None:
        inv_freq = inverse_frequencies(head_dim, base, position_ids.device)
    angles = (position_ids.t().unsqueeze(-1).float() * inv_freq.to(position_ids.device)).unsqueeze(2)
    return angles.cos(), angles.sin()                                     # [s, b, 1, d/2]


def model_rotary_tables(position_ids: torch.Tensor, config: ModelConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) tables of ``config``'s RoPE: its rotated dimensions, base and scaling."""
    dim = rotary_dim(config)
    inv_freq = inverse_frequencies(dim, config.rotary_base, position_ids.device,
                                   llama3_factor=config.rope_scaling_factor if config.use_rope_scaling else None,
                                   interpolation_factor=config.rotary_seq_len_interpolation_factor)
    return rotary_tables(position_ids, dim, config.rotary_base, inv_freq)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x: [s, b, ..., d] -> contiguous, x's shape and dtype; each pair (x1, x2) = (x_i, x_{i+d/2})
    rotated by +angle (or -angle when ``inverse``) in float32, rounded once on store."""
    s, b, half = x.shape[0], x.shape[1], x.shape[-1] // 2
    cos, sin = (t.view(s, b, *([1] * (x.dim() - 3)), half) for t in (cos, sin))
    first, second = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if inverse:
        out.narrow(-1, 0, half).copy_(first * cos + second * sin)
        out.narrow(-1, half, half).copy_(second * cos - first * sin)
    else:
        out.narrow(-1, 0, half).copy_(first * cos - second * sin)
        out.narrow(-1, half, half).copy_(second * cos + first * sin)
    return out


class _Rotary(torch.autograd.Function):
    """A rotation's gradient is the inverse rotation (its transpose): dx1 = g1 cos + g2 sin,
    dx2 = g2 cos - g1 sin -- written as one tensor, where autograd would chain casts, products and
    a concatenation of the halves."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_shape = x.shape
        out = _rotate(x, cos, sin, inverse=False)
        return out.view(x.shape[0], x.shape[1], -1, x.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad.reshape(ctx.x_shape), cos, sin, inverse=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [s, b, n, d], or [s, b, g, n/g, d] (a strided view into the fused QKV output) -> [s, b, n, d]
    contiguous, in x's dtype; each pair (x1, x2) = (x_i, x_{i+r/2}) of the first r = 2 x (the tables'
    angles) dimensions rotated by its angle in float32, the other d - r dimensions unchanged:

        y1 = x1 cos - x2 sin,    y2 = x2 cos + x1 sin

    The two halves are written into one output (no rotated copy of x is concatenated), and a strided
    x is read in place, so merging q's heads costs no copy of its own.  The forward is bit for bit
    the rotate-half form x cos + rotate_half(x) sin (x1 cos + (-x2) sin is x1 cos - x2 sin exactly);
    so is the backward in float32, while a 16-bit gradient is rounded once instead of per term.
    """
    rotated = 2 * cos.shape[-1]
    if rotated == x.shape[-1]:
        return _Rotary.apply(x, cos, sin)
    # --rotary-percent: the first ``rotated`` dimensions turn, the rest pass through.
    s, b = x.shape[:2]
    turned = _Rotary.apply(x[..., :rotated], cos, sin)
    return torch.cat([turned, x[..., rotated:].reshape(s, b, -1, x.shape[-1] - rotated)], dim=-1)
