"""Tensor-parallel layers: each rank holds a slice of a weight and the mappings glue the slices.

With ``t`` TP ranks (Shoeybi et al. 2019, Sec. 3; Korthikanti et al. 2022, Sec. 4.2.2 for SP):

- :class:`ColumnParallelLinear`   ``Y = X A^T + b``, A's rows (output features) split: rank r makes
  ``Y[..., r-th slice]``; its input enters with ``copy_to_tp`` (or, under sequence parallelism, is
  all-gathered from ``s/t`` tokens).
- :class:`RowParallelLinear`      ``Y = X A^T + b``, A's columns (input features) split: rank r
  makes the partial sum ``X_r A_r^T``; the sum is an all-reduce (a reduce-scatter to ``s/t``
  tokens under sequence parallelism), and the bias is added once, after it.
- :class:`VocabParallelEmbedding` vocabulary rows split; ids outside a rank's rows give zeros and
  the sum over ranks picks the one rank that holds each id.
- :func:`vocab_parallel_cross_entropy` softmax cross-entropy on logits that stay split over the
  vocabulary: only ``[s, b]``-sized max / sums cross the wire.

Initialization is TP-invariant: every parameter carries an ``Init`` (``param_info.py``); :func:`initialize_from_seed`
generates the FULL tensor from a generator seeded by (seed, the parameter's name in the full model)
and keeps this rank's slice, so the TP=4 model holds exactly the slices of the TP=1 model.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalite.parallel.expert_parallel import ep_rank, ep_size, etp_rank, etp_size
from megalite.parallel.mappings import (
    all_gather_along,
    all_reduce,
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_along,
    reduce_scatter_to_sp,
    scatter_to_tp,
    tp_rank,
    tp_size,
)
from megalite.parallel.param_info import Init, ParamInfo, param_info, set_param_info


# -- initialization ---------------------------------------------------------------------------------
def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (run seed, parameter name); stable across processes and versions."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def full_shape(param: torch.Tensor) -> Tuple[int, ...]:
    """The shape of ``param`` in the unpartitioned model."""
    shape, dim, experts = list(param.shape), param_info(param).partition_dim, param_info(param).expert_parallel
    if dim is not None:   # an expert's ffn is split over expert TP, any other weight over TP
        shape[dim] *= etp_size() if experts else tp_size()
    if experts:           # the experts stacked on dim 0, E / EP of them here
        shape[0] *= ep_size()
    return tuple(shape)


@torch.no_grad()
def initialize_from_seed(named_params: Iterable[Tuple[str, nn.Parameter]], seed: int) -> None:
    """Fill each ``(full-model name, param)`` with its slice of the full tensor drawn from (seed, name).

    The full tensor is drawn on the CPU, so the values do not depend on the device either.
    """
    size, rank = tp_size(), tp_rank()
    for name, param in named_params:
        info = param_info(param)
        if info.init is None:
            raise ValueError(f"parameter {name} has no init recipe; make it with new_parameter() or set its ParamInfo")
        full = info.init.full_tensor(full_shape(param), torch.Generator().manual_seed(name_seed(seed, name)))
        if info.tensor_parallel and info.expert_parallel:
            full = full.chunk(etp_size(), info.partition_dim)[etp_rank()]
        elif info.tensor_parallel:
            full = full.chunk(size, info.partition_dim)[rank]
        if info.expert_parallel:
            full = full.chunk(ep_size(), 0)[ep_rank()]
        param.copy_(full)


def new_parameter(shape, init: Init, partition_dim: Optional[int] = None,
                  sequence_parallel: bool = False, expert_parallel: bool = False) -> nn.Parameter:
    """An (uninitialized) parameter carrying the :class:`ParamInfo` that grads/optimizer/checkpoints read.

    ``sequence_parallel``: replicated over TP but fed s/t tokens under SP, so its grad is summed over
    TP (``finalize_model_grads``).
    """
    return set_param_info(nn.Parameter(torch.empty(shape)),
                          ParamInfo(partition_dim=partition_dim, sequence_parallel=sequence_parallel, init=init,
                                    expert_parallel=expert_parallel))


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by the TP size {denominator}")
    return numerator // denominator


# -- linear layers ----------------------------------------------------------------------------------
class _LinearOnGatheredTokens(torch.autograd.Function):
    """``Y = all_gather_sp(X) W^T + b`` that keeps only X's ``s/t`` token shard for backward.

    Storing the gathered ``[s, b, in]`` input would cost t times the shard; instead backward gathers
    it again (one extra all-gather per layer input, Korthikanti et al. 2022, Sec. 4.2.2) -- the price
    of activation memory falling to 1/t.  Backward: dX = reduce_scatter_sp(dY W), dW = dY^T X_full.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(all_gather_along(x, 0), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        x_full = all_gather_along(x, 0, kind="all_gather_regather")
        grad_x = reduce_scatter_along(grad_out.matmul(weight), 0)
        grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_out_2d.t().matmul(x_full.reshape(-1, x_full.shape[-1]))
        grad_bias = grad_out_2d.sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with A's output features split over TP.

    x: ``[s, b, in]`` replicated (``[s/t, b, in]`` under sequence parallelism)
    -> ``[s, b, out/t]`` (``[s, b, out]`` with ``gather_output``).

    The full weight is ``[out, in]``; rank r holds rows ``[r*out/t, (r+1)*out/t)``, so a layer that
    fuses several projections (QKV, SwiGLU's gate and up) orders its full rows so that every
    contiguous slice is self-contained.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, init: Init = Init("normal", 0.02)):
        super().__init__()
        tp = tp_size()
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        local = _divide(output_size, tp, "output size of a column-parallel layer")
        self.weight = new_parameter((local, input_size), init, partition_dim=0)
        self.bias = new_parameter((local,), Init("zeros"), partition_dim=0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            y = _LinearOnGatheredTokens.apply(x, self.weight, self.bias)
        else:
            y = F.linear(copy_to_tp(x), self.weight, self.bias)
        return gather_from_tp(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with A's input features split over TP.

    x: ``[s, b, in/t]`` (``input_is_parallel``; else ``[s, b, in]`` replicated and scattered here)
    -> ``[s, b, out]`` replicated (``[s/t, b, out]`` under sequence parallelism).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, init: Init = Init("normal", 0.02)):
        super().__init__()
        tp = tp_size()
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = new_parameter((output_size, _divide(input_size, tp, "input size of a row-parallel layer")),
                                 init, partition_dim=1)
        # Added after the reduction (once, not t times); replicated, so under SP its grad is partial.
        self.bias = new_parameter((output_size,), Init("zeros"), sequence_parallel=sequence_parallel) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x)
        partial = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(partial) if self.sequence_parallel else reduce_from_tp(partial)
        return y + self.bias if self.bias is not None else y


# -- embedding and loss -----------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Embedding table with its vocabulary rows split over TP.

    ids: ``[s, b]`` int64 -> ``[s, b, h]`` replicated on every TP rank.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init: Init = Init("normal", 0.02)):
        super().__init__()
        tp, rank = tp_size(), tp_rank()
        self.rows_per_rank = _divide(num_embeddings, tp, "padded vocabulary size")
        self.vocab_start = rank * self.rows_per_rank
        self.weight = new_parameter((self.rows_per_rank, embedding_dim), init, partition_dim=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local_ids = ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.rows_per_rank)   # another rank holds these rows
        partial = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)
        return reduce_from_tp(partial.masked_fill(elsewhere.unsqueeze(-1), 0.0))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token ``-log softmax(z)[target]`` (optionally label-smoothed) with z split over the vocabulary.

    With K real classes, target distribution q = (1-eps) onehot(target) + eps/K on every real class:
        loss = logZ - (1-eps) z_target - eps/K sum_k z_k,     logZ = log sum_k exp z_k
        dloss/dz_k = softmax_k - q_k
    (the same convention as ``torch.nn.functional.cross_entropy(label_smoothing=eps)``).
    Padding columns (index >= vocab_size) are set to -inf: they get no probability and no gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, vocab_size, label_smoothing):
        rank = tp_rank()
        local_vocab, logits_dtype = logits.shape[-1], logits.dtype
        start = rank * local_vocab
        # One fp32 [tokens, v/t] buffer, overwritten in place: logits -> shifted -> exp -> softmax (each
        # step would otherwise be another full fp32 copy of the logits).  A low-precision input is
        # copied by .float(); an fp32 one is the caller's, so the first write makes the copy.
        owned = logits.dtype != torch.float32
        logits = logits.float()
        real = torch.arange(start, start + local_vocab, device=logits.device) < vocab_size
        if start + local_vocab > vocab_size:   # this rank holds padding columns
            logits = logits.masked_fill_(~real, float("-inf")) if owned else logits.masked_fill(~real, float("-inf"))
            owned = True
        # Subtract the global max so exp never overflows (it cancels in softmax and logZ).
        global_max = all_reduce(logits.max(dim=-1).values, op=dist.ReduceOp.MAX).unsqueeze(-1)
        shifted = logits.sub_(global_max) if owned else logits - global_max
        on_this_rank = (target >= start) & (target < start + local_vocab)
        local_target = (target - start).clamp(0, local_vocab - 1)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = all_reduce(torch.where(on_this_rank, target_logit, torch.zeros_like(target_logit)))
        sum_logits = all_reduce(shifted.masked_fill(~real, 0.0).sum(dim=-1)) if label_smoothing > 0 else None
        exp = shifted.exp_()
        sum_exp = all_reduce(exp.sum(dim=-1))
        log_z = sum_exp.log()
        loss = log_z - target_logit
        if label_smoothing > 0:
            loss = (1 - label_smoothing) * loss + label_smoothing * (log_z - sum_logits / vocab_size)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, on_this_rank, real)
        ctx.label_smoothing, ctx.vocab_size, ctx.logits_dtype = label_smoothing, vocab_size, logits_dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, on_this_rank, real = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(1 - eps) * on_this_rank.unsqueeze(-1).to(grad.dtype))
        if eps > 0:
            grad -= (eps / ctx.vocab_size) * real.to(grad.dtype)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: Optional[int] = None,
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross-entropy, computed in float32.

    logits: ``[s, b, V/t]`` (this rank's vocabulary slice, any float dtype); target: ``[s, b]`` int64;
    vocab_size: the real vocabulary (columns beyond are padding; default: no padding).
    Returns ``[s, b]`` float32, the same on every TP rank.  The gradient flows back to the logits
    in their own dtype.
    """
    if vocab_size is None:
        vocab_size = logits.shape[-1] * tp_size()
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label smoothing {label_smoothing} must be in [0, 1)")
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, label_smoothing)

