"""Measure the work of a layer outside its GEMMs: the attention core through SDPA, and the elementwise ops.

The calibration file's optional ``attention`` and ``elementwise`` tables (written by
``calibrate.py``, read by ``compute.py``).  Each is PyTorch's own kernels timed on this machine at
the shapes of a layer, forward and backward under autograd as training runs them, and stored as an
*effective* rate on the quantity ``compute.py`` already counts, so the model's time is that count
divided by the measured rate:

- ``attention``: rows ``{"heads", "s", "d", "dtype", "forward_tflops", "backward_tflops"}``.  The
  attention core as megalite runs it (``CoreAttention``: the fused QKV ``[s, b, 3 h]`` split into
  ``[s, b, a, d]`` heads, permuted to ``[b, a, s, d]``, causal ``F.scaled_dot_product_attention``
  without dropout, the context permuted back to ``[s, b, h]``), ``heads = b a``.  The rates are on
  the FLOPs of its two modelled GEMMs, ``4 heads s^2 d`` forward and ``8 heads s^2 d`` backward
  (``rate = FLOPs / measured seconds``), so the kernel's causal skipping, its softmax and the copies
  all fold into one measured figure.
- ``elementwise``: rows ``{"op", "dtype", "bytes", "forward_gbs", "backward_gbs"}``, effective GB/s
  on the bytes ``compute.py`` counts for the op at ``n`` elements (``e`` bytes each): forward
  ``bytes``, backward ``2 x bytes``::

      norm           megalite's LayerNorm over rows of 256 (its        bytes = 2 e n
                     outputs recycled, as its output cache does)
      activation     F.gelu (exact)                                   bytes = 2 e n
      add            the residual add x + y; backward: autograd's      bytes = 3 e n
                     accumulation of the residual gradient (one add)
      cross_entropy  megalite's vocab-parallel cross-entropy (fp32)   bytes = (e + 8) n   (n = tokens x V)
      permute        an MoE layer's token permutation and its         bytes = 4 e n       (n = rows x h)
                     weighted unpermutation (model/moe/experts.py's
                     permute, unpermute; top-2 of 8 experts, rows
                     of 256, the routing weights' gradient included)

  at several ``n`` (small tensors pay PyTorch's per-op dispatch, which the bandwidth alone misses).

Each time is the median of repeats after a warm-up call (``timing.median_seconds``: every call's
outputs and input gradients are kept, so each writes fresh memory as in a training step); the
backward is timed alone, after an untimed forward.  Nothing here is fitted to a training run.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from megalite.calibration.timing import median_seconds

__all__ = ["measure_attention", "measure_elementwise", "ATTENTION_GRID", "ELEMENTWISE_SIZES"]

# (heads, s, d) of the attention table: heads x s^2 x d capped (the largest point ~50 ms in fp32 here).
ATTENTION_GRID = tuple((heads, s, d) for heads in (4, 16, 64) for s in (64, 256, 1024) for d in (32, 128)
                       if heads * s * s * d <= 2 ** 31)
ATTENTION_GRID_QUICK = ((4, 64, 32), (8, 128, 32))
ELEMENTWISE_SIZES = tuple(2 ** p for p in range(14, 23))   # every power of two: caches and the allocator make steps
ELEMENTWISE_SIZES_QUICK = (2 ** 12, 2 ** 14)
_NORM_WIDTH = 256
_VOCAB = 1024
_TOPK, _EXPERTS = 2, 8


def _forward_backward_seconds(make: Callable[[], tuple], min_time: float, keep: bool = True):
    """(forward seconds, backward seconds) of ``make() -> (inputs, forward_fn, grad)``, each timed alone
    (the backward's forward runs untimed before it)."""
    inputs, forward, grad = make()

    def backward(out):
        out.backward(grad)
        grads = [x.grad for x in inputs]   # kept by median_seconds: each backward writes fresh gradients
        for x in inputs:
            x.grad = None
        return grads
    forward_s = median_seconds(lambda: forward(*inputs), min_time, keep=keep)
    backward_s = median_seconds(backward, min_time, setup=lambda: (forward(*inputs),), keep=keep)
    return forward_s, backward_s


def _core_attention(qkv: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    s, b = qkv.shape[:2]
    q, k, v = qkv.view(s, b, heads, 3, d).unbind(3)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)


def measure_attention(dtypes: Dict[str, torch.dtype], quick: bool, min_time: float) -> List[dict]:
    rows = []
    for dtype_name, dtype in dtypes.items():
        for heads, s, d in (ATTENTION_GRID_QUICK if quick else ATTENTION_GRID):
            def make():
                qkv = torch.randn(s, 1, 3 * heads * d).to(dtype).requires_grad_()
                return (qkv,), (lambda x: _core_attention(x, heads, d)), torch.randn(s, 1, heads * d).to(dtype)
            forward_s, backward_s = _forward_backward_seconds(make, min_time)
            flops = 4.0 * heads * s * s * d
            rows.append({"heads": heads, "s": s, "d": d, "dtype": dtype_name,
                         "forward_tflops": flops / forward_s / 1e12, "backward_tflops": 2 * flops / backward_s / 1e12})
    return rows


def _elementwise_ops(dtype: torch.dtype) -> Dict[str, tuple]:
    """op -> (make(n) -> (inputs, forward, grad), counted forward bytes per element at this dtype)."""
    from megalite.model.moe.experts import permute, unpermute
    from megalite.ops import layer_norm
    from megalite.parallel.layers import vocab_parallel_cross_entropy

    e = torch.tensor([], dtype=dtype).element_size()

    def norm(n):
        x = torch.randn(n // _NORM_WIDTH, _NORM_WIDTH).to(dtype).requires_grad_()
        weight, bias = torch.ones(_NORM_WIDTH, dtype=dtype), torch.zeros(_NORM_WIDTH, dtype=dtype)
        return (x,), (lambda x: layer_norm(x, weight, bias, 1e-5)), torch.randn_like(x)

    def activation(n):
        x = torch.randn(n).to(dtype).requires_grad_()
        return (x,), (lambda x: F.gelu(x)), torch.randn_like(x)

    def add(n):
        x, y = torch.randn(n).to(dtype).requires_grad_(), torch.randn(n).to(dtype).requires_grad_()
        # x feeds two paths (as the residual stream does): backward accumulates its two gradients.
        return (x, y), (lambda x, y: (x + y) + x), torch.randn_like(x)

    def cross_entropy(n):
        logits = torch.randn(n // _VOCAB, 1, _VOCAB).to(dtype).requires_grad_()
        target = torch.randint(0, _VOCAB, (n // _VOCAB, 1))
        return (logits,), (lambda x: vocab_parallel_cross_entropy(x, target)), torch.ones(n // _VOCAB, 1)

    def permuted(n):
        tokens = n // (_NORM_WIDTH * _TOPK)
        x = torch.randn(tokens, _NORM_WIDTH).to(dtype).requires_grad_()
        weights = torch.rand(tokens, _TOPK).requires_grad_()
        indices = torch.randint(0, _EXPERTS, (tokens, _TOPK), generator=torch.Generator().manual_seed(0))

        def forward(x, weights):
            rows, order, _counts = permute(x, indices, _EXPERTS)
            return unpermute(rows, order, weights, tokens)
        return (x, weights), forward, torch.randn_like(x)

    return {"norm": (norm, 2 * e), "activation": (activation, 2 * e), "add": (add, 3 * e),
            "cross_entropy": (cross_entropy, e + 8), "permute": (permuted, 4 * e)}


def measure_elementwise(dtypes: Dict[str, torch.dtype], quick: bool, min_time: float) -> List[dict]:
    rows = []
    for dtype_name, dtype in dtypes.items():
        for op, (make, bytes_per_element) in _elementwise_ops(dtype).items():
            for n in (ELEMENTWISE_SIZES_QUICK if quick else ELEMENTWISE_SIZES):
                # megalite's norm outputs come from its reused output cache: not kept (timing.py)
                forward_s, backward_s = _forward_backward_seconds(lambda: make(n), min_time, keep=op != "norm")
                if op == "add":
                    forward_s, backward_s = forward_s / 2, backward_s   # two adds forward, one accumulation back
                counted = bytes_per_element * n
                rows.append({"op": op, "dtype": dtype_name, "bytes": counted,
                             "forward_gbs": counted / forward_s / 1e9, "backward_gbs": 2 * counted / backward_s / 1e9})
    return rows
