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
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megalite.config.settings import ModelConfig
from megalite.model.rotary import apply_rotary, rotary_tables  # noqa: F401 (rotary_tables: re-exported)
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
    """x: [s(/t), b, h] -> same; weight and bias replicated over TP (grads summed over TP under SP).

    ``dim``: the normalized size (default the hidden size; the head dimension for --qk-layernorm).
    With --apply-layernorm-1p the weight holds gamma - 1 (initialized to 0) and the norm scales by
    1 + weight, so weight decay pulls gamma towards 1 rather than 0.
    """

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False, dim: Optional[int] = None):
        super().__init__()
        dim = dim or config.hidden_size
        self.eps, self.one_p = config.norm_epsilon, config.apply_layernorm_1p
        self.weight = new_parameter((dim,), Init("zeros" if self.one_p else "ones"),
                                    sequence_parallel=sequence_parallel)
        self.bias = new_parameter((dim,), Init("zeros"), sequence_parallel=sequence_parallel)

    def forward(self, x):
        return layer_norm(x, self.weight + 1 if self.one_p else self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x: [s(/t), b, h] -> x / rms(x) * weight (Zhang & Sennrich 2019); ``dim`` and the 1p weight as LayerNorm."""

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False, dim: Optional[int] = None):
        super().__init__()
        dim = dim or config.hidden_size
        self.eps, self.one_p = config.norm_epsilon, config.apply_layernorm_1p
        self.weight = new_parameter((dim,), Init("zeros" if self.one_p else "ones"),
                                    sequence_parallel=sequence_parallel)

    def forward(self, x):
        return rms_norm(x, self.weight + 1 if self.one_p else self.weight, self.eps)


def build_norm(config: ModelConfig, sequence_parallel: bool = False, dim: Optional[int] = None) -> nn.Module:
    norm = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return norm(config, sequence_parallel, dim)


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
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, qkv_size, bias=config.add_bias_linear or
                                               config.add_qkv_bias, sequence_parallel=sequence_parallel,
                                               init=Init("normal", config.init_method_std))
        # --qk-layernorm: one norm of the head dimension shared by every query head, one by every key head
        # (Qwen3).  Replicated over TP, but each rank's heads give only part of its gradient, which is
        # therefore summed over TP like a sequence-parallel norm's (ParamInfo.sequence_parallel).
        self.q_layernorm = self.k_layernorm = None
        if config.qk_layernorm:
            self.q_layernorm = build_norm(config, sequence_parallel=True, dim=self.head_dim)
            self.k_layernorm = build_norm(config, sequence_parallel=True, dim=self.head_dim)
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
        if self.q_layernorm is not None:   # the norms read whole rows: q's heads merged, k made contiguous
            q = self.q_layernorm(q.reshape(s, b, -1, self.head_dim).contiguous())
            k = self.k_layernorm(k.contiguous())
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

    def __init__(self, config: ModelConfig, sequence_parallel: bool = False, layer_number: int = 0,
                 build_mlp: Optional[Callable] = None):
        super().__init__()
        # GPT-2's scaled init of the projections that write into the residual stream: std / sqrt(2 L).
        output_init_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
        self.input_norm = build_norm(config, sequence_parallel)
        self.self_attention = SelfAttention(config, output_init_std, sequence_parallel)
        self.pre_mlp_norm = build_norm(config, sequence_parallel)
        # build_mlp(global layer number, output init std, SP) may give another MLP (an MoE layer, model/moe/)
        mlp = build_mlp(layer_number, output_init_std, sequence_parallel) if build_mlp is not None else None
        self.mlp = mlp if mlp is not None else MLP(config, output_init_std, sequence_parallel)
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

    def __init__(self, config: ModelConfig, num_layers: int, sequence_parallel: bool = False,
                 layer_numbers: Optional[Sequence[int]] = None, build_mlp: Optional[Callable] = None):
        super().__init__()
        layer_numbers = list(range(num_layers)) if layer_numbers is None else layer_numbers
        self.layers = nn.ModuleList(TransformerLayer(config, sequence_parallel, layer_numbers[i], build_mlp)
                                    for i in range(num_layers))
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
