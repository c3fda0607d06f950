"""Activation memory of one megalite layer as PyTorch's CPU kernels actually save it.

``activations.py`` counts what backward needs the way Korthikanti et al. 2022 do, for GPU kernels:
16-bit activations, 1-byte dropout masks, an explicit softmax.  On CPU the same layer saves other
tensors, found item by item with saved-tensor hooks (``tests/scaling/test_cpu_activations.py``
checks the sum); with ``e`` the run's element size (4 fp32, 2 bf16), the differences are:

1. Dropout masks have the activation's element size (``e`` bytes), not 1 byte.
2. Attention runs through ``scaled_dot_product_attention``, which on CPU picks
   - with attention dropout, the *math* kernel: it saves its own scaled copies of Q and K and a copy
     of V, all in fp32 (bf16 inputs are upcast), and the softmax output, the dropout mask and the
     dropped-out probabilities, each ``a s^2 b`` fp32 values.  In an fp32 run V is a view of the fused
     QKV output instead of a copy, which keeps that whole ``3 sbh`` buffer alive;
   - without attention dropout, the *flash* kernel: it saves Q, K and V (views of one ``3 sbh``
     buffer), its output (which is also the projection's input) and an fp32 log-sum-exp per
     (head, token): no ``[a, s, s]`` tensor at all.
3. Each LayerNorm keeps its fp32 mean and 1/std per token (``2 x 4 sb`` bytes per norm).
4. Selective recompute checkpoints the attention core with Q, K and V as its inputs: views of the
   fused QKV output, ``3 sbh e`` bytes, whatever the kernel.  Full recompute keeps each layer's input.

These are the kernels of torch 2.13 (where the test holds the sum to the byte).  torch 2.4.1's differ
in two items (measured): its math kernel keeps bf16 inputs in bf16 (no fp32 copies), and its flash
kernel saves one of Q, K, V as a separate copy rather than a view of the QKV buffer; versions between
were not measured.

Everything else is Korthikanti's list: the two norm inputs, the QKV input, the projection input, the
MLP's fc1 input, activation input and fc2 input.  Tensor parallelism (t) splits what lies between
the TP communication (heads, the MLP width); sequence parallelism also splits the rest (the norms,
their statistics, the dropout masks, the QKV and fc1 inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

__all__ = ["SavedBytes", "cpu_layer_inventory", "cpu_activation_bytes_per_layer", "inventory_applies"]

FP32 = 4


@dataclass(frozen=True)
class SavedBytes:
    """One tensor a layer keeps for backward on CPU: its bytes for the whole layer (no TP)."""

    name: str
    nbytes: float
    tensor_parallel: bool    # split over TP ranks even without sequence parallelism


def cpu_layer_inventory(s: int, b: int, h: int, a: int, *, element_size: int, ffn: Optional[int] = None,
                        hidden_dropout: bool = True, attention_dropout: bool = True,
                        selective: bool = False) -> List[SavedBytes]:
    """What one GPT layer (LayerNorm, GELU MLP of width ``ffn``, default 4h) saves on CPU (module docstring)."""
    e, ffn = element_size, 4 * h if ffn is None else ffn
    sbh, scores = s * b * h, a * s * s * b
    items = [
        SavedBytes("input norm input", e * sbh, False),
        SavedBytes("input norm mean and 1/std (fp32)", 2 * FP32 * s * b, False),
        SavedBytes("QKV input", e * sbh, False),
    ]
    if selective:
        items.append(SavedBytes("Q, K, V (views of the QKV output; the core is recomputed)", 3 * e * sbh, True))
    elif attention_dropout:
        items += [
            SavedBytes("Q and K, scaled fp32 copies (math kernel)", 2 * FP32 * sbh, True),
            SavedBytes("V: the whole QKV output it is a view of" if e == FP32 else "V, fp32 copy",
                       3 * e * sbh if e == FP32 else FP32 * sbh, True),
            SavedBytes("softmax output (fp32)", FP32 * scores, True),
            SavedBytes("attention dropout mask (fp32)", FP32 * scores, True),
            SavedBytes("attention dropout output (fp32)", FP32 * scores, True),
        ]
    else:
        items += [
            SavedBytes("Q, K, V (views of one buffer; flash kernel)", 3 * e * sbh, True),
            SavedBytes("log-sum-exp per head and token (fp32)", FP32 * a * s * b, True),
        ]
    items += [
        SavedBytes("projection input (the attention output)", e * sbh, True),
        SavedBytes("MLP norm input", e * sbh, False),
        SavedBytes("MLP norm mean and 1/std (fp32)", 2 * FP32 * s * b, False),
        SavedBytes("fc1 input", e * sbh, False),
        SavedBytes("GELU input", e * s * b * ffn, True),
        SavedBytes("fc2 input", e * s * b * ffn, True),
    ]
    if hidden_dropout:
        items += [SavedBytes("attention-out dropout mask", e * sbh, False),
                  SavedBytes("MLP-out dropout mask", e * sbh, False)]
    return items


def inventory_applies(model, cp: int = 1) -> bool:
    """Whether the inventory is this model's layer: LayerNorm, a GELU MLP, one K/V head per query head, a
    learned or no position table (no RoPE), no experts, no QK norm, no context parallelism -- the layer the
    test measures.  Elsewhere memory.py keeps Korthikanti's count."""
    return (model.normalization == "LayerNorm" and not model.swiglu and model.num_experts is None
            and model.num_query_groups in (None, model.num_attention_heads) and not model.qk_layernorm
            and model.position_embedding_type != "rope" and not model.use_rotary_position_embeddings
            and model.kv_channels in (None, model.hidden_size // model.num_attention_heads) and cp == 1)


def cpu_activation_bytes_per_layer(s: int, b: int, h: int, a: int, *, element_size: int, tp: int = 1,
                                   sequence_parallel: bool = False, recompute: Optional[str] = None,
                                   ffn: Optional[int] = None, hidden_dropout: bool = True,
                                   attention_dropout: bool = True) -> float:
    """Bytes one layer keeps for backward on one TP rank, one micro-batch, on CPU.

    ``recompute``: None, "selective" or "full" (only the layer's input: ``e sbh``, ``/t`` with SP).
    """
    if recompute not in (None, "selective", "full"):
        raise ValueError(f"recompute {recompute!r}: choose None, 'selective' or 'full'")
    if recompute == "full":
        return element_size * s * b * h / (tp if sequence_parallel else 1)
    items = cpu_layer_inventory(s, b, h, a, element_size=element_size, ffn=ffn, hidden_dropout=hidden_dropout,
                                attention_dropout=attention_dropout, selective=recompute == "selective")
    return sum(item.nbytes / (tp if (item.tensor_parallel or sequence_parallel) else 1) for item in items)
