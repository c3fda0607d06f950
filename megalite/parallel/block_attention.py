"""Attention computed block by block with a fused kernel, blocks merged by their log-sum-exp.

Softmax attention of a query row over keys split into blocks ``B_1 .. B_n`` needs only each
block's output ``o_j`` (softmax over that block alone, times its values) and its log-sum-exp
``l_j = log sum_{k in B_j} exp(q.k / sqrt(d))``:

    l = log sum_j exp(l_j)            o = sum_j exp(l_j - l) o_j

and the gradient of block ``j`` is the fused kernel's own backward called with the *merged*
``o`` and ``l`` (the probabilities ``exp(s - l)`` it rebuilds are then the full softmax's, and
``rowsum(do * o)`` the full row's), so no block ever sees another.  This is how ring attention
(Liu et al. 2023) and flash attention's split-K work, and what lets context parallelism and
per-document masks run without any ``s x s`` (or ``s/CP x s``) tensor: each block is a fused
kernel call, full or causal, never a dense mask.

A :class:`Pair` names one block: the batch rows, the query rows and key rows it joins, and whether
it is causal (then the two ranges cover the same positions).  :func:`forward_pairs` accumulates
pairs into ``(out, lse)``; :func:`backward_pairs` accumulates their gradients.

Kernels: on CPU ATen's flash attention (``_scaled_dot_product_flash_attention_for_cpu``, which
returns the log-sum-exp and has a matching backward); on CUDA the memory-efficient kernel
(``_efficient_attention_forward`` / ``_backward``, every float dtype; not yet run on a GPU:
tests/parallel/test_block_attention.py holds its CUDA checks); elsewhere, or with
``MEGALITE_BLOCK_ATTENTION=math``, a reference that forms the block's scores (one block's, never
the whole sequence's).  Dropout is not supported here (the callers fall back, attention.py).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Tuple

import torch

__all__ = ["Pair", "block_forward", "block_backward", "forward_pairs", "backward_pairs", "new_accumulators",
           "kernel_name"]

BACKEND_ENV = "MEGALITE_BLOCK_ATTENTION"


@dataclass(frozen=True)
class Pair:
    """One block: batch rows ``batch``, query rows ``q`` and key rows ``k`` (slices of the tensors
    handed to :func:`forward_pairs`); ``causal`` when both cover the same positions."""

    batch: slice
    q: slice
    k: slice
    causal: bool


def kernel_name(device: torch.device) -> str:
    """'flash_cpu', 'efficient_cuda' or 'math': the kernel :func:`block_forward` uses on ``device``."""
    if os.environ.get(BACKEND_ENV, "").strip().lower() == "math":
        return "math"
    if device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return "flash_cpu"
    if device.type == "cuda" and hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention"):
        return "efficient_cuda"
    return "math"


def _expand_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _fold_groups(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of :func:`_expand_groups`: sum the gradients of the heads that share a group."""
    if grad.shape[1] == groups:
        return grad
    b, a, s, d = grad.shape
    return grad.view(b, groups, a // groups, s, d).sum(2)


def _math_forward(q, k, v, causal: bool):
    k, v = _expand_groups(k, q.shape[1]), _expand_groups(v, q.shape[1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, causal: bool):
    groups = k.shape[1]
    k, v = _expand_groups(k, q.shape[1]), _expand_groups(v, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1))
    dout = dout.float()
    dv = torch.matmul(probs.transpose(-1, -2), dout)
    dprobs = torch.matmul(dout, v.float().transpose(-1, -2))
    dscores = probs * (dprobs - (dout * out.float()).sum(-1, keepdim=True)) * scale
    dq = torch.matmul(dscores, k.float())
    dk = torch.matmul(dscores.transpose(-1, -2), q.float())
    return dq.to(q.dtype), _fold_groups(dk, groups).to(k.dtype), _fold_groups(dv, groups).to(v.dtype)


def block_forward(q, k, v, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """q: [b, a, sq, d], k and v: [b, g, sk, d] -> (out [b, a, sq, d], lse [b, a, sq] float32).

    ``causal`` needs ``sq == sk`` (the same positions): query i reads keys 0..i of the block."""
    kernel = kernel_name(q.device)
    if kernel == "flash_cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse.float()
    if kernel == "efficient_cuda":   # the kernel's layout is [b, s, heads, d]; causal = 1 (from the top left)
        heads = q.shape[1]
        k, v = _expand_groups(k, heads), _expand_groups(v, heads)
        out, lse = torch.ops.aten._efficient_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None, None, None, 0.0,
            int(causal), True)[:2]
        return out.transpose(1, 2), lse[:, :, :q.shape[2]].float()   # the kernel pads rows to 32
    return _math_forward(q, k, v, causal)


def block_backward(dout, q, k, v, out, lse, causal: bool):
    """The gradients (dq, dk, dv) of one block, given the MERGED ``out`` and ``lse`` of its rows."""
    kernel = kernel_name(q.device)
    if kernel == "flash_cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal)
    if kernel == "efficient_cuda":
        heads, groups, rows = q.shape[1], k.shape[1], q.shape[2]
        padded = torch.zeros((*lse.shape[:2], (rows + 31) // 32 * 32), dtype=torch.float32, device=lse.device)
        padded[:, :, :rows] = lse
        unused = torch.empty(0, dtype=torch.int64, device=q.device)   # the dropout seed and offset
        dq, dk, dv = torch.ops.aten._efficient_attention_backward(
            dout.transpose(1, 2), q.transpose(1, 2), _expand_groups(k, heads).transpose(1, 2),
            _expand_groups(v, heads).transpose(1, 2), None, out.transpose(1, 2), None, None, rows, k.shape[2],
            padded, 0.0, unused, unused, int(causal), False)[:3]
        return dq.transpose(1, 2), _fold_groups(dk.transpose(1, 2), groups), _fold_groups(dv.transpose(1, 2), groups)
    return _math_backward(dout, q, k, v, out, lse, causal)


def new_accumulators(q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) to accumulate pairs into: zeros [b, a, s, d] float32 and -inf [b, a, s] float32."""
    return (torch.zeros(q.shape, dtype=torch.float32, device=q.device),
            torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device))


def forward_pairs(q, k, v, pairs: Iterable[Pair], out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge each pair's block attention into ``out`` and ``lse`` (from :func:`new_accumulators`).

    Every block gives each of its query rows at least one key (full blocks all of them, causal ones
    the diagonal), so the merged ``lse`` of a row that any pair touched is finite."""
    for pair in pairs:
        block_out, block_lse = block_forward(q[pair.batch, :, pair.q], k[pair.batch, :, pair.k],
                                             v[pair.batch, :, pair.k], pair.causal)
        old_out, old_lse = out[pair.batch, :, pair.q], lse[pair.batch, :, pair.q]
        new_lse = torch.logaddexp(old_lse, block_lse)
        old_out.mul_(torch.exp(old_lse - new_lse).unsqueeze(-1))
        old_out.add_(block_out.float() * torch.exp(block_lse - new_lse).unsqueeze(-1))
        old_lse.copy_(new_lse)


def backward_pairs(dout, q, k, v, out, lse, pairs: Iterable[Pair], dq, dk, dv) -> None:
    """Add each pair's gradients to ``dq`` (of ``q``) and ``dk``, ``dv`` (of ``k``, ``v``); ``out``
    and ``lse`` are the merged results of every pair of these query rows, ``out`` in q's dtype."""
    for pair in pairs:
        rows = (pair.batch, slice(None), pair.q)
        keys = (pair.batch, slice(None), pair.k)
        block_dq, block_dk, block_dv = block_backward(dout[rows], q[rows], k[keys], v[keys], out[rows],
                                                      lse[rows], pair.causal)
        dq[rows] += block_dq
        dk[keys] += block_dk
        dv[keys] += block_dv
