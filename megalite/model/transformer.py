"""The transformer layer: attention, MLP, residuals and norms, in ``[s, b, h]`` layout.

One layer (pre-norm, as GPT-2 and LLaMA):

    x = x + dropout(Attention(Norm(x)))
    x = x + dropout(MLP(Norm(x)))

Tensor parallelism enters only through the layers: the QKV and first MLP projections are
column-parallel (this rank's heads / hidden units), the output projections row-parallel (partial
sums reduced over TP).  Under sequence parallelism the residual stream, norms and dropout live on
``s/t`` tokens; the column-parallel layers gather the tokens and the row-parallel ones scatter them
back.  The TP size is the process grid's (``mappings.tp_size()``, 1 without a grid); sequence
parallelism is switched on by the ``sequence_parallel`` argument of the modules that change under it.
Under context parallelism every tensor holds this rank's s/cp tokens of the sequence; only
attention reads the other CP ranks' keys and values (megalite/parallel/cp_attention.py).  With packed
documents (``documents``, megalite/parallel/documents.py) attention stays inside each document.
Symbols: s sequence, b micro-batch, h hidden, a heads, g query groups, d head dim, t TP size.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megalite.config.settings import ModelConfig
from megalite.ops import layer_norm, rms_norm, swiglu
from megalite.parallel import random as tp_random
from megalite.parallel.context_parallel import cp_comm_type
from megalite.parallel.cp_attention import attention
from megalite.parallel.documents import Documents
from megalite.parallel.layers import ColumnParallelLinear, RowParallelLinear, new_parameter
from megalite.parallel.mappings import tp_size
from megalite.parallel.param_info import Init


# -- norms and dropout ------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """x: [s(/t), b, h] -> same; weight and bias replicated over TP (grads summed over TP under SP)."""

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False):
        super().__init__()
        self.eps = config.norm_epsilon
        self.weight = new_parameter((config.hidden_size,), Init("ones"), sequence_parallel=sequence_parallel)
        self.bias = new_parameter((config.hidden_size,), Init("zeros"), sequence_parallel=sequence_parallel)

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x: [s(/t), b, h] -> x / rms(x) * weight (Zhang & Sennrich 2019)."""

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False):
        super().__init__()
        self.eps = config.norm_epsilon
        self.weight = new_parameter((config.hidden_size,), Init("ones"), sequence_parallel=sequence_parallel)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def build_norm(config: ModelConfig, sequence_parallel: bool = False) -> nn.Module:
    norm = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return norm(config, sequence_parallel)


class Dropout(nn.Module):
    """Dropout on hidden states [s(/t), b, h].

    Replicated activations draw the same mask on every TP rank (default generator); under sequence
    parallelism each rank's tokens draw their own (the tracker's sequence-parallel stream).
    """

    def __init__(self, p: float, sequence_parallel: bool):
        super().__init__()
        self.p, self.sequence_parallel = p, sequence_parallel

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        with tp_random.dropout_stream(self.sequence_parallel):
            return F.dropout(x, self.p, training=True)


# -- rotary position embedding ----------------------------------------------------------------------
def rotary_tables(position_ids: torch.Tensor, head_dim: int, base: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [s, b, 1, d/2], for position_ids [b, s]: the angle pos * base^(-2i/d) of the
    pair (x_i, x_{i+d/2}) (Su et al. 2021, Eq. 34, in the "rotate half" layout).

    Angles are computed in float32 whatever the model's dtype: positions times frequencies loses
    digits fast in 16-bit.  One table per half serves both halves (``apply_rotary``).
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = (position_ids.t().unsqueeze(-1).float() * inv_freq).unsqueeze(2)   # [s, b, 1, d/2]
    return angles.cos(), angles.sin()


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
    contiguous, in x's dtype; each pair (x1, x2) = (x_i, x_{i+d/2}) rotated by its angle, in float32:

        y1 = x1 cos - x2 sin,    y2 = x2 cos + x1 sin

    The two halves are written into one output (no rotated copy of x is concatenated), and a strided
    x is read in place, so merging q's heads costs no copy of its own.  The forward is bit for bit
    the rotate-half form x cos + rotate_half(x) sin (x1 cos + (-x2) sin is x1 cos - x2 sin exactly);
    so is the backward in float32, while a 16-bit gradient is rounded once instead of per term.
    """
    return _Rotary.apply(x, cos, sin)


# -- attention --------------------------------------------------------------------------------------
# scaled_dot_product_attention takes enable_gqa from torch 2.5 on; below, down to the 2.4 floor in
# pyproject.toml, causal_attention repeats k and v to the query heads, which is what it computes.
SDPA_TAKES_GQA = torch.__version__ >= (2, 5)


def causal_attention(q, k, v, dropout_p: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: [b, a, sq, d], k and v: [b, g, sk, d] -> [b, a, sq, d]; query head i reads group i // (a/g).

    ``mask``: None for the causal mask of a whole sequence (sq == sk), or [sq, sk] bool, True where
    the query may read the key (a context-parallel chunk's causal mask, context_parallel.py).
    """
    causal = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **causal)
    if SDPA_TAKES_GQA:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True, **causal)
    heads_per_group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(heads_per_group, dim=1), v.repeat_interleave(heads_per_group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **causal)


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d) + causal mask) v, dropout on the probabilities.

    q: [s(/cp), b, a/t, d], k and v: [s(/cp), b, g/t, d] -> [s(/cp), b, a/t * d].  Each group's k/v
    serve a/g query heads (grouped-query attention, Ainslie et al. 2023).  Under context parallelism
    the queries are this rank's tokens and the keys the whole sequence's (cp_attention.py).
    Dropout draws from the TP-distinct stream: every rank holds different heads (and, under CP,
    different queries), which must not share masks.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dropout = config.attention_dropout

    def forward(self, q, k, v, documents: Optional[Documents] = None):
        s, b = q.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))   # [b, heads, s, d]
        dropout = self.dropout if self.training else 0.0

        def attend(q, k, v, mask):
            return causal_attention(q, k, v, dropout, mask)
        if dropout > 0:
            with tp_random.get_rng_tracker().fork(tp_random.TENSOR_PARALLEL_RNG):
                out = attention(q, k, v, attend, True, documents, cp_comm_type())
        else:   # no random draws: no stream switch (whose RNG-state copies torch.compile cannot trace)
            out = attention(q, k, v, attend, False, documents, cp_comm_type())
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class SelfAttention(nn.Module):
    """Causal self-attention with fused QKV. x: [s(/t), b, h] -> [s(/t), b, h].

    Fused QKV layout of the FULL weight ``[(a + 2g) d, h]``: one block per query group,
    ``[q of its a/g heads | k | v]``, so each TP rank's contiguous slice holds g/t whole groups.
    """

    def __init__(self, config: ModelConfig, output_init_std: float, sequence_parallel: bool = False):
        super().__init__()
        tp = tp_size()  # divides num_query_groups (GPTModel checks the config against the grid)
        self.head_dim = config.head_dim
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.local_groups = config.num_query_groups // tp
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        common = dict(bias=config.add_bias_linear, sequence_parallel=sequence_parallel)
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, qkv_size,
                                               init=Init("normal", config.init_method_std), **common)
        self.core_attention = CoreAttention(config)
        self.linear_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                             init=Init("normal", output_init_std), **common)
        # Selective recompute (Korthikanti et al. 2022, Sec. 5): keep q, k, v; recompute the
        # [b, a, s, s] scores, probabilities and dropout mask in backward.
        self.recompute_core_attention = config.recompute_granularity == "selective"

    def forward(self, x, rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                documents: Optional[Documents] = None):
        qkv = self.linear_qkv(x)                                            # [s, b, g/t * (a/g + 2) * d]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.local_groups, self.heads_per_group + 2, self.head_dim)
        q, k, v = qkv.split([self.heads_per_group, 1, 1], dim=3)           # views, no copies
        k, v = k.squeeze(3), v.squeeze(3)                                   # [s, b, g/t, d]
        if rotary is not None:   # writes q's heads merged: [s, b, a/t, d]
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        else:                    # a view when a == g (one head per group); a copy under grouped queries
            q = q.reshape(s, b, -1, self.head_dim)                          # [s, b, a/t, d]
        # Attention keeps q, k, v, its output and log-sum-exp (or, without CP and documents, what SDPA
        # keeps): never the whole sequence's K/V nor a score matrix, so nothing to gain from recompute
        # unless asked for.
        if self.recompute_core_attention and torch.is_grad_enabled():
            context = tp_random.checkpoint(self.core_attention, q, k, v, documents)
        else:
            context = self.core_attention(q, k, v, documents)               # [s, b, a/t * d]
        return self.linear_proj(context)


# -- MLP --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """x: [s(/t), b, h] -> [s(/t), b, h].  GELU: W2 gelu(W1 x).  SwiGLU: W2 (silu(W_gate x) * W_up x)
    (Shazeer 2020).  With SwiGLU the FULL fused weight interleaves rows (gate_0, up_0, gate_1, up_1, ...),
    so each TP rank's contiguous slice holds matching gate and up units."""

    def __init__(self, config: ModelConfig, output_init_std: float, sequence_parallel: bool = False):
        super().__init__()
        self.swiglu = config.swiglu
        self.gelu_approximation = "tanh" if config.openai_gelu else "none"
        ffn = config.ffn_hidden_size
        common = dict(bias=config.add_bias_linear, sequence_parallel=sequence_parallel)
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, 2 * ffn if self.swiglu else ffn,
                                               init=Init("normal", config.init_method_std), **common)
        self.linear_fc2 = RowParallelLinear(ffn, config.hidden_size, init=Init("normal", output_init_std), **common)

    def forward(self, x):
        hidden = self.linear_fc1(x)                                         # [s, b, (2) ffn/t]
        if self.swiglu:
            hidden = swiglu(hidden)                                         # ops/swiglu.py: fused on CUDA
        else:
            hidden = F.gelu(hidden, approximate=self.gelu_approximation)
        return self.linear_fc2(hidden)


# -- the layer and the stack ------------------------------------------------------------------------
class TransformerLayer(nn.Module):
    """Pre-norm block. x: [s(/t), b, h] -> [s(/t), b, h] (s/t tokens with ``sequence_parallel``)."""

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False):
        super().__init__()
        # GPT-2's scaled init of the projections that write into the residual stream: std / sqrt(2 L).
        output_init_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
        self.input_norm = build_norm(config, sequence_parallel)
        self.self_attention = SelfAttention(config, output_init_std, sequence_parallel)
        self.pre_mlp_norm = build_norm(config, sequence_parallel)
        self.mlp = MLP(config, output_init_std, sequence_parallel)
        self.hidden_dropout = Dropout(config.hidden_dropout, sequence_parallel)

    def forward(self, x, rotary=None, documents: Optional[Documents] = None):
        x = x + self.hidden_dropout(self.self_attention(self.input_norm(x), rotary, documents))
        x = x + self.hidden_dropout(self.mlp(self.pre_mlp_norm(x)))
        return x


class TransformerBlock(nn.Module):
    """The layers this pipeline chunk holds, with full activation recompute if configured.

    Full recompute keeps only the inputs of recomputed spans and replays them in backward:
    ``uniform`` checkpoints consecutive spans of ``recompute_num_layers`` layers; ``block``
    checkpoints each of the first ``recompute_num_layers`` layers of this chunk and keeps the rest
    (Megatron-LM's two methods).  ``recompute_num_layers`` defaults to 1.
    """

    def __init__(self, config: ModelConfig, num_layers: int, sequence_parallel: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, sequence_parallel) for _ in range(num_layers))
        self.recompute_method = config.recompute_method if config.recompute_granularity == "full" else None
        self.recompute_num_layers = config.recompute_num_layers or 1

    def _spans(self) -> Sequence[Tuple[int, int, bool]]:
        """(start, end, recompute) spans of the layer list, in order."""
        n, k = len(self.layers), self.recompute_num_layers
        if self.recompute_method == "uniform":
            return [(i, min(i + k, n), True) for i in range(0, n, k)]
        if self.recompute_method == "block":
            return [(i, i + 1, i < k) for i in range(n)]
        return [(0, n, False)]

    def _run(self, start: int, end: int):
        def run_layers(x, documents, *rotary):
            for layer in self.layers[start:end]:
                x = layer(x, rotary or None, documents)
            return x
        return run_layers

    def forward(self, x, rotary=None, documents: Optional[Documents] = None):
        """x: [s(/t), b, h] -> same; rotary: (cos, sin) [s, b, 1, d/2] each, or None; documents: the
        micro-batch's packed documents (per-document attention), or None."""
        for start, end, recompute in self._spans():
            if recompute and torch.is_grad_enabled():
                x = tp_random.checkpoint(self._run(start, end), x, documents, *(rotary or ()))
            else:
                x = self._run(start, end)(x, documents, *(rotary or ()))
        return x
