"""Activation memory of one transformer layer, from an inventory of what backward needs.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4)
count, for one layer of a GPT with ``s`` tokens, micro-batch ``b``, hidden ``h``, ``a`` heads, 16-bit
activations and 1-byte dropout masks::

    attention   QKV input 2sbh, Q and K 4sbh, softmax output 2as^2b, its dropout mask as^2b,
                dropout output 2as^2b, V 2sbh, projection input 2sbh, dropout mask sbh
    MLP         fc1 input 2sbh, GELU input 8sbh, fc2 input 8sbh, dropout mask sbh
    norms       two inputs, 4sbh

which sums to their Eq. 1, ``sbh (34 + 5 a s / h)``.  Tensor parallelism (size t) splits what lies
between the TP communication (Eq. 2: ``sbh (10 + 24/t + 5as/(ht))``); sequence parallelism splits
the rest too (Eq. 4: ``sbh/t (34 + 5as/h)``); selective recompute drops the ``as^2b`` terms it
recomputes; full recompute keeps only each layer's input (``2sbh``, ``/t`` with SP).  The inventory
below is that list, item by item, so the equations follow from it rather than being restated.

Two departures from the paper's kernels, both as arguments:

- ``kv_length``: a context-parallel rank holds ``s/CP`` queries against all ``s`` keys over the K/V
  ring, so its score matrix is ``a (s/CP) s b``, not ``a (s/CP)^2 b`` (``kv_length`` = the full ``s``).
- ``fused``: fused (flash) attention keeps no ``[a, s, s]`` tensor: the softmax, its dropout mask and
  the dropped-out probabilities are recomputed block by block in backward from Q, K, V, the output
  and one fp32 log-sum-exp per (head, token), ``4 a s b`` bytes (Dao et al. 2022, "FlashAttention",
  Sec. 3.1; the attention dropout mask is regenerated from the RNG state, not stored).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

__all__ = ["Saved", "layer_inventory", "activation_bytes_per_layer", "fused_attention"]

UNFUSED_BACKENDS = ("unfused", "local")


def fused_attention(attention_backend: str, attention_dropout: float = 0.0, dropout_fused: bool = True) -> bool:
    """Whether ``--attention-backend`` runs a fused (flash) kernel: every choice but Megatron's unfused
    ("unfused", "local") path, which materializes the scores -- and, with attention dropout, only where
    the fused kernel applies dropout itself (``dropout_fused``: a GPU's flash kernels do; torch's CPU
    SDPA falls back to its math kernel, which keeps the scores)."""
    return attention_backend not in UNFUSED_BACKENDS and (attention_dropout == 0 or dropout_fused)


@dataclass(frozen=True)
class Saved:
    """One tensor kept for backward: ``elements`` per layer, of ``kind`` (activation or mask)."""

    name: str
    elements: float
    kind: str                # "activation" (the run's element size), "mask" (1 byte) or "fp32" (4 bytes)
    tensor_parallel: bool    # split over TP ranks without sequence parallelism
    attention_scores: bool   # an [a, s, s] tensor: what selective recompute recomputes


def layer_inventory(s: int, b: int, h: int, a: int, ffn: int = None, dropout: bool = True,
                    kv_length: int = None, fused: bool = False) -> List[Saved]:
    """What one GPT layer (LayerNorm, GELU MLP of width ``ffn``, default 4h) keeps for backward; the
    score-sized items against ``kv_length`` keys (default ``s``), none of them with ``fused`` attention."""
    ffn = 4 * h if ffn is None else ffn
    sbh, scores = s * b * h, a * s * (s if kv_length is None else kv_length) * b
    items = [
        Saved("input norm input", sbh, "activation", False, False),
        Saved("QKV input", sbh, "activation", False, False),
        Saved("Q and K", 2 * sbh, "activation", True, False),
        Saved("softmax output", scores, "activation", True, True),
        Saved("V", sbh, "activation", True, False),
        Saved("projection input", sbh, "activation", True, False),
        Saved("MLP norm input", sbh, "activation", False, False),
        Saved("fc1 input", sbh, "activation", False, False),
        Saved("GELU input", s * b * ffn, "activation", True, False),
        Saved("fc2 input", s * b * ffn, "activation", True, False),
    ]
    if dropout:
        items += [
            Saved("attention dropout mask", scores, "mask", True, True),
            Saved("attention dropout output", scores, "activation", True, True),
            Saved("attention-out dropout mask", sbh, "mask", False, False),
            Saved("MLP-out dropout mask", sbh, "mask", False, False),
        ]
    if fused:
        items = [item for item in items if not item.attention_scores]
        items.append(Saved("softmax log-sum-exp", a * s * b, "fp32", True, False))
    return items


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, *, tp: int = 1, sequence_parallel: bool = False,
                               recompute: str = None, element_size: int = 2, ffn: int = None,
                               dropout: bool = True, kv_length: int = None, fused: bool = False) -> float:
    """Bytes one layer keeps for backward on one TP rank (one micro-batch).

    ``recompute``: None, "selective" (the attention scores are recomputed) or "full" (only the
    layer's input is kept).  ``element_size``: bytes of an activation (2 for bf16/fp16).  ``kv_length``
    and ``fused``: the score matrix's key length and fused attention (the module's docstring).
    """
    if recompute not in (None, "selective", "full"):
        raise ValueError(f"recompute {recompute!r}: choose None, 'selective' or 'full'")
    if recompute == "full":
        return element_size * s * b * h / (tp if sequence_parallel else 1)
    total = 0.0
    for item in layer_inventory(s, b, h, a, ffn, dropout, kv_length, fused):
        if recompute == "selective" and item.attention_scores:
            continue
        size = {"activation": element_size, "mask": 1, "fp32": 4}[item.kind]
        split = tp if (item.tensor_parallel or sequence_parallel) else 1
        total += item.elements * size / split
    return total
