"""The routed experts: tokens sorted by expert, every expert's MLP as one grouped GEMM, the results weighted
and summed back into token order -- dropless, with no loop over tokens.

Permutation.  With T tokens each sent to k experts, the T k (token, expert) pairs are sorted by expert
(stably, so each expert's tokens keep their order): ``permuted[j] = tokens[order[j] // k]``, and expert e
reads the ``counts[e]`` consecutive rows that follow the experts before it.  Unpermutation multiplies row j by
its routing weight and adds it into token ``order[j] // k`` (index_add), the sum over the token's k experts.

Experts.  All E experts' weights live in two tensors, ``weight1 [E, h, f]`` (``[E, h, 2f]`` with SwiGLU, gate
and up interleaved per unit as in megalite/model/transformer.py's MLP) and ``weight2 [E, f, h]``, drawn whole
from the seed (so splitting the experts over ranks later keeps each expert's values).  ``grouped_mm`` computes
row block e times ``weight[e]`` for every e: one ``torch._grouped_mm`` call where torch, the device and the
dtype support it (CUDA, bfloat16, compute capability 9.0 on; the CPU in float32 or bfloat16 where torch has
the kernel, as 2.13 does), else a loop over the experts with the same math, each block's product and
gradients written in place (``_ExpertLoop``).  On this 2-core CPU the kernel took 0.64-1.02x the loop's time
for forward + backward at 8 and 64 experts (docs/moe.md, "The loop writes each block in place").
"""
from __future__ import annotations

import functools
import itertools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megalite.config.settings import ModelConfig
from megalite.ops import swiglu
from megalite.parallel.expert_parallel import ep_size, etp_rank, etp_size
from megalite.parallel.layers import new_parameter
from megalite.parallel.param_info import Init

__all__ = ["permute", "unpermute", "grouped_mm", "grouped_mm_available", "Experts"]


def permute(tokens: torch.Tensor, indices: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, ...]:
    """tokens [T, h], indices [T, k] -> (rows [T k, h] grouped by expert, order [T k], counts [E])."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return tokens.index_select(0, order // indices.shape[1]), order, counts


def unpermute(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """rows [T k, h] from :func:`permute`'s order, weights [T, k] -> [T, h]: each token's weighted sum."""
    topk = weights.shape[1]
    weighted = rows * weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(rows.dtype)
    out = rows.new_zeros(num_tokens, rows.shape[1])
    return out.index_add(0, order // topk, weighted)


@functools.lru_cache(maxsize=None)
def _cpu_grouped_mm_works(dtype: torch.dtype) -> bool:
    """Whether this torch's torch._grouped_mm runs on the CPU in ``dtype`` (torch 2.13 does; older ones
    serve CUDA only): one tiny call, forward and backward, tried once per dtype."""
    try:
        x = torch.zeros(2, 8, dtype=dtype, requires_grad=True)
        out = torch._grouped_mm(x, torch.zeros(2, 8, 8, dtype=dtype), offs=torch.tensor([1, 2], dtype=torch.int32))
        out.backward(torch.ones_like(out))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch._grouped_mm serves x [N, in] @ weight [E, in, out] here: CUDA in bfloat16 from compute
    capability 9.0, or the CPU where this torch has the kernel (float32 / bfloat16); rows of 16 bytes' multiples
    and at least one row (the kernel's limits)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype or x.shape[0] == 0:
        return False
    if (x.shape[1] * x.element_size()) % 16 or (weight.shape[2] * x.element_size()) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _cpu_grouped_mm_works(x.dtype)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, fused: bool = True,
               sizes: Optional[List[int]] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [N, in] with its rows in E consecutive blocks of ``counts``, weight [E, in, out] (and bias [E, out])
    -> [N, out]: block e times weight[e] (plus bias[e]).  ``sizes``: ``counts`` already on the host (the loop
    over experts needs them there)."""
    if fused and grouped_mm_available(x, weight):
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        out = torch._grouped_mm(x.contiguous(), weight, offs=offsets)
        if out.requires_grad:   # the kernel's backward refuses a broadcast gradient (strides 0), e.g. of a sum
            out.register_hook(torch.Tensor.contiguous)
        if bias is None:
            return out
        # bias row e repeated for expert e's rows, without reading the counts on the host
        return out + torch.repeat_interleave(bias.to(out.dtype), counts, dim=0, output_size=x.shape[0])
    return _ExpertLoop.apply(x, weight, bias, list(sizes if sizes is not None else counts.tolist()))


class _ExpertLoop(torch.autograd.Function):
    """The loop over experts, each block's product written straight into its rows of one output, and in
    backward each block's input gradient into its rows and each expert's weight gradient into its slice:
    no per-expert results joined by a copy (``cat``) and no per-expert gradients stacked (the unbind or
    split of autograd's own loop), so every element is written once, forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, sizes):
        x = x.contiguous()
        out = x.new_empty(x.shape[0], weight.shape[2])
        for e, (start, end) in enumerate(_spans(sizes)):
            if bias is None:
                torch.mm(x[start:end], weight[e], out=out[start:end])
            else:
                torch.addmm(bias[e], x[start:end], weight[e], out=out[start:end])
        ctx.save_for_backward(x, weight)
        ctx.sizes, ctx.has_bias = sizes, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        spans = _spans(ctx.sizes)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
            for e, (start, end) in enumerate(spans):
                torch.mm(grad[start:end], weight[e].t(), out=grad_x[start:end])
        if ctx.needs_input_grad[1]:
            grad_weight = weight.new_empty(weight.shape)
            for e, (start, end) in enumerate(spans):
                torch.mm(x[start:end].t(), grad[start:end], out=grad_weight[e])    # zeros for no rows
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = torch.stack([grad[start:end].sum(0) for start, end in spans])
        return grad_x, grad_weight, grad_bias, None


def _spans(sizes: List[int]) -> List[Tuple[int, int]]:
    """(start, end) rows of each expert's block, from the blocks' sizes."""
    ends = list(itertools.accumulate(sizes))
    return list(zip([0] + ends[:-1], ends))


class Experts(nn.Module):
    """rows [N, h] grouped by this rank's experts, counts [E / EP] -> [N, h]: each row through its expert's
    MLP (GELU or SwiGLU; under expert TP its ffn slice, a partial sum of the output that layer.py sums; with
    --add-bias-linear each expert's own fc1 and fc2 biases, as Megatron-LM's grouped experts: ``bias1 [E, f]``
    (``[E, 2f]`` interleaved as weight1's columns) and ``bias2 [E, h]``, zeros at first, split over EP like the
    weights).  The router's weight multiplies the whole output, fc2's bias included (layer.py's unpermute), as
    in Megatron."""

    def __init__(self, config: ModelConfig, output_init_std: float):
        super().__init__()
        split = etp_size()   # expert TP: this rank's slice of every expert's ffn, as a dense MLP's TP shard
        experts, hidden, ffn = config.num_experts // ep_size(), config.hidden_size, config.moe_ffn_hidden_size // split
        self.swiglu, self.fused = config.swiglu, config.moe_grouped_gemm
        self.gelu_approximation = "tanh" if config.openai_gelu else "none"
        # This rank's E / EP experts: rows ep_rank x E / EP on of the whole stack drawn from the seed, and of
        # them (ETP > 1) fc1's columns and fc2's rows etp_rank x f / ETP on (whole (gate, up) units with SwiGLU).
        self.weight1 = new_parameter((experts, hidden, 2 * ffn if self.swiglu else ffn),
                                     Init("normal", config.init_method_std), partition_dim=2 if split > 1 else None,
                                     expert_parallel=True)
        self.weight2 = new_parameter((experts, ffn, hidden), Init("normal", output_init_std),
                                     partition_dim=1 if split > 1 else None, expert_parallel=True)
        self.bias1 = self.bias2 = None
        if config.add_bias_linear:   # under expert TP, bias1 split as fc1's columns; bias2 whole on every rank,
            # added by expert-TP rank 0 alone (the partial outputs are summed), its gradient summed over TP
            self.bias1 = new_parameter((experts, self.weight1.shape[2]), Init("zeros"),
                                       partition_dim=1 if split > 1 else None, expert_parallel=True)
            self.bias2 = new_parameter((experts, hidden), Init("zeros"), sequence_parallel=split > 1,
                                       expert_parallel=True)
        self.adds_bias2 = etp_rank() == 0

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # The loop over experts needs the counts on the host: one device-to-host copy for both GEMMs.
        sizes = None if self.fused and grouped_mm_available(rows, self.weight1) else counts.tolist()
        hidden = grouped_mm(rows, self.weight1, counts, self.fused, sizes, self.bias1)
        hidden = swiglu(hidden) if self.swiglu else F.gelu(hidden, approximate=self.gelu_approximation)
        return grouped_mm(hidden, self.weight2, counts, self.fused, sizes, self.bias2 if self.adds_bias2 else None)

