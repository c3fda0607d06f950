"""Compute time of one transformer layer (and the logits) for one micro-batch on one TP rank.

A pass is a list of GEMMs plus memory-bound elementwise work.  A GEMM ``[m, k] x [k, n]`` (``batch``
of them) costs ``2 m n k batch`` FLOPs and runs at

    rate = min(peak * gemm_efficiency * sustained * quantization(m, n),  intensity * HBM bandwidth * memory_efficiency)
    intensity = 2 m n k / (e (m k + k n + m n))                   (FLOPs per byte moved, e bytes/element)

(the roofline: Williams, Waterman and Patterson 2009), where ``sustained`` is the share of the
tensor-core rate a device keeps through whole steps (hardware.py, fitted in fit.py), ``quantization``
is the useful fraction of the thread-block tiles (256 x 128 or 128 x 256) launched in whole waves over
the SMs (NVIDIA's "Matrix Multiplication Background" guide: tile and wave quantization).  A calibration table of
measured GEMM throughput replaces the formula: the rate is read at (m, n, k) between its grid points
(interpolate.py), in the operands' layout (a linear layer's forward ``x @ W^T``, input gradient
``g @ W`` and weight gradient ``g^T @ x`` run different kernels, up to ~3x apart at some shapes on a
CPU).

Per layer (``s`` tokens, ``b`` micro-batch, ``h`` hidden, ``a`` heads of ``d = h/a``, ``f`` MLP width,
``t`` TP ranks, ``g`` query groups):

    QKV      [bs, h] x [h, (h + 2 g d)/t]         scores   (ab/t) x [s, d] x [d, s]
    proj     [bs, h/t] x [h/t, h]                 context  (ab/t) x [s, s] x [s, d]
    fc1      [bs, h] x [h, f m/t]  (m = 2 SwiGLU) fc2      [bs, f/t] x [f/t, h]

Backward runs each linear twice (input gradient ``[m, n] x [n, k]``, weight gradient
``[k, m] x [m, n]``) and the attention core's four products.  Elementwise passes (norms, softmax,
dropout, GELU, bias-dropout-add) move these bytes in forward, one read and one write each, and twice
as many in backward (the gradient and the saved input in, the gradient out) -- Korthikanti et al.'s
inventory (activations.py) is what they read:

    norms 2 x 2 sbh e/sp, bias-dropout-add 2 x (3e + 1) sbh/sp, softmax 2 e as^2b/t,
    attention dropout (2e + 1) as^2b/t, GELU 2 e sbf/t                  (sp = t with SP, else 1)

The attention core runs one of two ways (``--attention-backend``; activations.fused_attention):

- unfused ("unfused", "local"): the scores and context GEMMs above over the full ``s x s`` (causal
  masking saves nothing: the masked half is computed, then overwritten), plus the softmax and dropout
  bytes at the memory bandwidth;
- fused (flash, the default): one kernel, priced from its FLOPs with the causal half skipped
  (whole key blocks above the diagonal are not visited; a load-balanced CP split keeps each rank at
  half of its ``(s/CP) x s`` block, Liu et al. 2023 "Ring Attention" / Megatron's CP), forward
  ``2 (ab/t) (s/CP) s d`` (half of the two products' ``4 ...``), backward 2.5 x that (five products
  instead of two: the scores are recomputed, then dV, dP, dQ, dK; Dao 2023 "FlashAttention-2",
  Sec. 3.1.2), at ``peak x attention_efficiency x sustained`` (hardware.py; ``flash`` at FlashAttention-2's
  own share where the device has one).  No score bytes move through HBM.

A calibration table of measured SDPA (a CPU) replaces both: it is what runs there.

Recompute: full adds the layer's forward to its backward; selective adds the attention core.  So
hardware FLOPs are 4 x forward with full recompute (Narayanan et al. 2021, Eq. 3) and 3 x forward
plus the attention core with selective (Korthikanti et al. 2022, Sec. 6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

from megalite.config.settings import ModelConfig
from megalite.model.flops import flops_per_iteration
from megalite.scaling.activations import fused_attention
from megalite.scaling.hardware import Hardware
from megalite.scaling.interpolate import interpolate

__all__ = ["Gemm", "PassTimes", "gemm_rate", "gemm_seconds", "layer_gemms", "backward_gemms", "layer_times",
           "attention_core_times", "linear_times", "FLASH_BACKWARD_RATIO",
           "logits_times", "hardware_flops_per_iteration", "router_flops_per_iteration", "element_size"]

_TILES = ((256, 128), (128, 256))
# A fused kernel's backward runs five products per block (S = Q K^T again, dV, dP, dQ, dK) against the
# forward's two (S, then P V): 2.5 x the forward's FLOPs.
FLASH_BACKWARD_RATIO = 2.5
# The causal mask: a fused kernel skips the key blocks above the diagonal, half of them.
CAUSAL_FRACTION = 0.5


class Gemm(NamedTuple):
    name: str
    m: int
    n: int
    k: int
    batch: int = 1
    attention_core: bool = False   # what selective recompute recomputes (no weights)
    # How the operands lie, as the calibration table keys them: "nn" A @ B; "nt" A @ B^T (a linear
    # layer's forward, x @ W^T); "tn" A^T @ B (its weight gradient, over the tokens).
    layout: str = "nn"

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.batch


@dataclass(frozen=True)
class PassTimes:
    """Seconds of one layer (or the logits) on one micro-batch: forward, input gradient, weight gradient."""

    forward: float
    backward_input: float
    backward_weight: float

    def __add__(self, other: "PassTimes") -> "PassTimes":
        return PassTimes(self.forward + other.forward, self.backward_input + other.backward_input,
                         self.backward_weight + other.backward_weight)

    def scaled(self, factor: float) -> "PassTimes":
        return PassTimes(self.forward * factor, self.backward_input * factor, self.backward_weight * factor)


def element_size(dtype: str) -> int:
    return {"float32": 4, "fp8": 1}.get(dtype, 2)


def quantization(m: int, n: int, batch: int, num_sms: int) -> float:
    """Useful fraction of the tiles launched in whole waves (1 when the device has no SM count)."""
    if num_sms <= 0:
        return 1.0
    best = 0.0
    for tile_m, tile_n in _TILES:
        tiles = math.ceil(m / tile_m) * math.ceil(n / tile_n) * batch
        waves = math.ceil(tiles / num_sms)
        best = max(best, m * n * batch / (waves * num_sms * tile_m * tile_n))
    return best


def _table_rate(hardware: Hardware, dtype: str, m: int, n: int, k: int, layout: str) -> Optional[float]:
    """Measured TFLOP/s at (m, n, k) in ``layout`` (interpolate.py), else in any layout the table has
    for ``dtype`` (files written before layouts were measured hold "nn" only); None without rows."""
    rows = [r for r in hardware.matmul if r[3] == dtype]
    rows = [r for r in rows if r[5] == layout] or rows
    return interpolate([((r[0], r[1], r[2]), r[4]) for r in rows], (m, n, k))


def gemm_rate(gemm: Gemm, hardware: Hardware, dtype: str) -> float:
    """Achieved TFLOP/s of ``gemm`` in ``dtype``: the calibration table, else the roofline."""
    measured = _table_rate(hardware, dtype, gemm.m * gemm.batch, gemm.n, gemm.k, gemm.layout)
    if measured is not None:
        return measured
    e = element_size(dtype)
    moved = e * gemm.batch * (gemm.m * gemm.k + gemm.k * gemm.n + gemm.m * gemm.n)
    memory_bound = gemm.flops / moved * hardware.hbm_gbs * hardware.memory_efficiency / 1e3
    efficiency = hardware.fp8_gemm_efficiency if dtype == "fp8" and hardware.fp8_gemm_efficiency else \
        hardware.gemm_efficiency
    compute_bound = (hardware.peak(dtype) * efficiency * hardware.sustained_fraction
                     * quantization(gemm.m, gemm.n, gemm.batch, hardware.num_sms))
    return min(compute_bound, memory_bound)


def gemm_seconds(gemm: Gemm, hardware: Hardware, dtype: str) -> float:
    return gemm.flops / (gemm_rate(gemm, hardware, dtype) * 1e12)


def layer_gemms(model: ModelConfig, micro_batch: int, tp: int, cp: int = 1) -> List[Gemm]:
    """The forward GEMMs of one layer on one TP rank (tokens: this CP rank's s/cp of each sequence)."""
    s, h, b = model.seq_length, model.hidden_size, micro_batch
    tokens = b * s // cp
    d, a = model.head_dim, model.num_attention_heads
    q, kv = a * d, 2 * model.num_query_groups * d     # q = h unless --kv-channels sets d
    ffn, gated = model.ffn_hidden_size, 2 if model.swiglu else 1
    heads = b * a // tp
    return [
        Gemm("qkv", tokens, (q + kv) // tp, h, layout="nt"),
        Gemm("scores", s // cp, s, d, heads, True),
        Gemm("context", s // cp, d, s, heads, True),
        Gemm("proj", tokens, h, q // tp, layout="nt"),
        Gemm("fc1", tokens, ffn * gated // tp, h, layout="nt"),
        Gemm("fc2", tokens, h, ffn // tp, layout="nt"),
    ]


def backward_gemms(gemm: Gemm) -> List[Gemm]:
    """Input-gradient and weight-gradient products of a forward GEMM (the attention core has no weights:
    both of its operands' gradients are input gradients).  A linear layer's (``y = x W^T``, W
    ``[n, k]``) are ``dx = g W`` ("nn", ``[m, n] x [n, k]``) and ``dW = g^T x`` ("tn", ``[n, m] x [m, k]``,
    over the tokens), as megalite and ATen compute them."""
    grad_input = Gemm(gemm.name + ".dgrad", gemm.m, gemm.k, gemm.n, gemm.batch, gemm.attention_core)
    if gemm.layout == "nt":
        return [grad_input, Gemm(gemm.name + ".wgrad", gemm.n, gemm.k, gemm.m, gemm.batch, gemm.attention_core, "tn")]
    grad_other = Gemm(gemm.name + ".wgrad", gemm.k, gemm.n, gemm.m, gemm.batch, gemm.attention_core)
    return [grad_input, grad_other]


def _elementwise_bytes(model: ModelConfig, micro_batch: int, tp: int, cp: int, sequence_parallel: bool, e: int):
    """Forward bytes of one layer's memory-bound passes by op family (``elementwise_seconds``'s names),
    and the attention core's softmax and dropout bytes."""
    s, h, b, a = model.seq_length // cp, model.hidden_size, micro_batch, model.num_attention_heads
    sbh = s * b * h / (tp if sequence_parallel else 1)
    scores = a * s * model.seq_length * b / tp
    core = 2 * e * scores + ((2 * e + 1) * scores if model.attention_dropout > 0 else 0)
    families = {
        "norm": (2, 2 * e * sbh),                                                   # two norms
        "dropout_add" if model.hidden_dropout > 0 else "add":                      # two bias-dropout-adds
            (2, ((3 * e + 1) if model.hidden_dropout > 0 else 3 * e) * sbh),
        "swiglu" if model.swiglu else "activation": (1, 2 * e * s * b * model.ffn_hidden_size / tp),
    }
    return families, core


def elementwise_seconds(op: str, nbytes: float, hardware: Hardware, dtype: str) -> tuple:
    """(forward, backward) seconds of an elementwise op that ``compute.py`` counts at ``nbytes`` forward
    (and ``2 nbytes`` backward): the calibration's measured effective GB/s for ``op`` at that size
    (interpolated in log bytes), else the memory bandwidth for both."""
    rows = sorted((r[2], r[3], r[4]) for r in hardware.elementwise if r[0] == op and r[1] == dtype)
    if not rows:
        bandwidth = hardware.hbm_gbs * 1e9 * hardware.memory_efficiency
        return nbytes / bandwidth, 2 * nbytes / bandwidth
    forward_gbs = interpolate([((r[0],), r[1]) for r in rows], (nbytes,))
    backward_gbs = interpolate([((r[0],), r[2]) for r in rows], (nbytes,))
    return nbytes / (forward_gbs * 1e9), 2 * nbytes / (backward_gbs * 1e9)


def attention_rates(hardware: Hardware, dtype: str, heads: int, s: int, d: int) -> Optional[tuple]:
    """Measured (forward, backward) TFLOP/s of the attention core on its ``4 heads s^2 d`` (forward) and
    ``8 heads s^2 d`` (backward) FLOPs, interpolated like the GEMM table; None without a table."""
    rows = [r for r in hardware.attention if r[3] == dtype]
    if not rows:
        return None
    point = (heads, s, d)
    return (interpolate([(r[:3], r[4]) for r in rows], point), interpolate([(r[:3], r[5]) for r in rows], point))


def _core_times(model: ModelConfig, core: List[Gemm], core_bytes: float, hardware: Hardware, dtype: str) -> tuple:
    """(forward, backward) seconds of the attention core: measured SDPA when the calibration has it
    (and attention dropout is off: the table is of the dropout-free kernel); else a fused kernel's
    FLOPs (causal half skipped) at ``peak x`` the kernel's share; else (unfused) its GEMMs plus the
    softmax/dropout bytes at the memory bandwidth."""
    scores = core[0]
    rates = attention_rates(hardware, dtype, scores.batch, model.seq_length, model.head_dim)
    if rates is not None and model.attention_dropout == 0:
        flops = sum(g.flops for g in core)
        return flops / (rates[0] * 1e12), 2 * flops / (rates[1] * 1e12)
    if fused_attention(model.attention_backend, model.attention_dropout, hardware.fused_attention_dropout):
        share = hardware.fused_attention_efficiency(model.attention_backend)
        rate = hardware.peak(dtype) * share * hardware.sustained_fraction
        forward = CAUSAL_FRACTION * sum(g.flops for g in core) / (rate * 1e12)
        return forward, FLASH_BACKWARD_RATIO * forward
    bandwidth = hardware.hbm_gbs * 1e9 * hardware.memory_efficiency
    backward = sum(gemm_seconds(b, hardware, dtype) for g in core for b in backward_gemms(g))
    return _seconds(core, hardware, dtype) + core_bytes / bandwidth, backward + 2 * core_bytes / bandwidth


def attention_core_times(model: ModelConfig, micro_batch: int, hardware: Hardware, dtype: str, *, tp: int = 1,
                         cp: int = 1) -> tuple:
    """(forward, backward) seconds of one layer's attention core on one TP and CP rank (what a CP
    ring's K/V transfers run beside)."""
    core = [g for g in layer_gemms(model, micro_batch, tp, cp) if g.attention_core]
    _families, core_bytes = _elementwise_bytes(model, micro_batch, tp, cp, False, element_size(dtype))
    return _core_times(model, core, core_bytes, hardware, dtype)


def _seconds(gemms: List[Gemm], hardware: Hardware, dtype: str) -> float:
    return sum(gemm_seconds(g, hardware, dtype) for g in gemms)


def _linear_times(forward_gemms: List[Gemm], hardware: Hardware, dtype: str) -> PassTimes:
    times = PassTimes(0.0, 0.0, 0.0)
    for gemm in forward_gemms:
        if not gemm.attention_core:
            grad_input, grad_weight = backward_gemms(gemm)
            times = times + PassTimes(gemm_seconds(gemm, hardware, dtype), gemm_seconds(grad_input, hardware, dtype),
                                      gemm_seconds(grad_weight, hardware, dtype))
    return times


def linear_times(model: ModelConfig, micro_batch: int, hardware: Hardware, dtype: str, *, tp: int = 1,
                 cp: int = 1) -> PassTimes:
    """The four linear layers' GEMMs of one layer (what TP communication can overlap with); ``dtype``
    "fp8" runs them at the hardware's FP8 peak on 1-byte operands (``--fp8-format``)."""
    return _linear_times(layer_gemms(model, micro_batch, tp, cp), hardware, dtype)


def layer_times(model: ModelConfig, micro_batch: int, hardware: Hardware, dtype: str, *, tp: int = 1, cp: int = 1,
                sequence_parallel: bool = False, recompute: Optional[str] = None,
                linear_dtype: Optional[str] = None) -> PassTimes:
    """Compute seconds of one layer on one micro-batch, on one TP rank (communication excluded);
    ``linear_dtype`` "fp8": the linear layers' GEMMs in FP8 (the attention core and the elementwise
    work stay in ``dtype``, as Transformer Engine's FP8 recipes run them)."""
    e = element_size(dtype)
    forward_gemms = layer_gemms(model, micro_batch, tp, cp)
    families, core_bytes = _elementwise_bytes(model, micro_batch, tp, cp, sequence_parallel, e)
    core_forward, core_backward = _core_times(model, [g for g in forward_gemms if g.attention_core], core_bytes,
                                              hardware, dtype)
    forward, backward_input = core_forward, core_backward
    for op, (count, nbytes) in families.items():
        op_forward, op_backward = elementwise_seconds(op, nbytes, hardware, dtype)
        forward, backward_input = forward + count * op_forward, backward_input + count * op_backward
    linears = _linear_times(forward_gemms, hardware, linear_dtype or dtype)
    forward, backward_input = forward + linears.forward, backward_input + linears.backward_input
    backward_weight = linears.backward_weight
    if recompute == "full":
        backward_input += forward
    elif recompute == "selective":
        backward_input += core_forward
    return PassTimes(forward, backward_input, backward_weight)


def _cross_entropy_seconds(logits: int, hardware: Hardware, dtype: str) -> tuple:
    """(forward, backward) seconds of the fp32 vocabulary-parallel cross-entropy over ``logits`` values.

    A calibration's measured rate is on its own count, ``(e + 8)`` bytes per logit (the logits in, an
    fp32 copy, the fp32 softmax out; x 2 backward).  Without one, every pass of the kernels that run
    (megalite's parallel/layers.py, the same sequence as Megatron-LM's) moves its bytes at the memory
    bandwidth: forward the fp32 copy (``e + 4``), max (4), subtract (8), exp (8), sum (4), divide (8):
    ``e + 36``; backward the clone (8), the scale (8), the cast back (``4 + e``): ``e + 20``.
    """
    e = element_size(dtype)
    if any(r[0] == "cross_entropy" and r[1] == dtype for r in hardware.elementwise):
        return elementwise_seconds("cross_entropy", logits * (e + 8), hardware, dtype)
    bandwidth = hardware.hbm_gbs * 1e9 * hardware.memory_efficiency
    return logits * (e + 36) / bandwidth, logits * (e + 20) / bandwidth


def logits_times(model: ModelConfig, micro_batch: int, hardware: Hardware, dtype: str, *, tp: int = 1,
                 cp: int = 1) -> PassTimes:
    """The output layer ``[bs, h] x [h, V/t]`` and the fp32 cross-entropy over its ``sbV/t`` logits."""
    tokens = micro_batch * model.seq_length // cp
    vocab = model.padded_vocab_size(tp) // tp
    gemm = Gemm("logits", tokens, vocab, model.hidden_size, layout="nt")
    grad_input, grad_weight = backward_gemms(gemm)
    loss_forward, loss_backward = _cross_entropy_seconds(tokens * vocab, hardware, dtype)
    return PassTimes(gemm_seconds(gemm, hardware, dtype) + loss_forward,
                     gemm_seconds(grad_input, hardware, dtype) + loss_backward,
                     gemm_seconds(grad_weight, hardware, dtype))


def hardware_flops_per_iteration(model: ModelConfig, global_batch_size: int, recompute: Optional[str], *,
                                 tp: int) -> float:
    """FLOPs the devices execute in one step: model FLOPs (and the MoE routers') plus what recompute repeats.

    Full recompute repeats every layer's forward: ``96 B s L h^2 (1 + s/6h + V/16Lh)`` for a GPT, the
    FLOPs Narayanan et al. 2021 (Eq. 3) count.  Selective repeats the attention core, ``4 B s^2 L h``.
    """
    s, h, layers = model.seq_length, model.hidden_size, model.num_layers
    model_flops = flops_per_iteration(model, global_batch_size, tp=tp) + router_flops_per_iteration(
        model, global_batch_size)
    if recompute == "full":
        logits = 6.0 * global_batch_size * s * h * model.padded_vocab_size(tp)
        return model_flops + (model_flops - logits) / 3
    if recompute == "selective":
        return model_flops + 4.0 * global_batch_size * s * s * layers * h
    return model_flops


def router_flops_per_iteration(model: ModelConfig, global_batch_size: int) -> float:
    """The MoE routers' GEMMs, ``6 B s h E`` per MoE layer (forward and backward): executed, but not in
    Megatron-LM's model FLOPs (model/flops.py), so counted in the hardware FLOPs only."""
    if model.num_experts is None:
        return 0.0
    moe_layers = sum(model.is_moe_layer(i) for i in range(model.num_layers))
    return 6.0 * global_batch_size * model.seq_length * model.hidden_size * model.num_experts * moe_layers
