"""Parameter and FLOP counts of a GPT, and model FLOPs utilization (MFU).

FLOPs follow Megatron-LM's ``num_floating_point_operations`` (Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters", Appendix / Eq. 3, extended with grouped-query
attention and gated MLPs).  Per token and layer, a forward pass costs (a multiply-add = 2 FLOPs):

    QKV projection        2 h (a d + 2 g d)        g = query groups, a = heads, d = head dim
    scores and values     2 * 2 s a d              full s x s attention, causal mask NOT discounted
    output projection     2 a d h
    MLP                   2 * 2 h f * m            m = 3/2 with SwiGLU (three matrices), else 1
and once per token the logits 2 h V.  Backward costs twice the forward, so a training step is
3 x forward:

    F = 12 B s L h^2 [ (1 + g/a + s/h) r + m f/h + V / (2 L h) ]    (B sequences, V padded vocab)

where r = a d / h is the query width over the hidden size (1 unless --kv-channels sets the head dim d).
In a mixture-of-experts layer (Megatron's count) the MLP term is that of the k experts a token visits
and the shared expert, m (k f_e + f_s) / h, instead of m f / h; the router's 2 h E is not counted.

This is *model* FLOPs: activation recompute is not counted, so MFU does not reward recomputing.
"""
from __future__ import annotations

from typing import Optional

import torch

from megalite.config.settings import ModelConfig


def count_parameters(config: ModelConfig, *, tp: int) -> int:
    """Parameters of the whole (unpartitioned) model, tied weights once, with the vocabulary padded as a
    run over ``tp`` tensor-parallel ranks pads it."""
    h, f, layers = config.hidden_size, config.ffn_hidden_size, config.num_layers
    q = config.num_attention_heads * config.head_dim
    kv = 2 * config.num_query_groups * config.head_dim
    bias = config.add_bias_linear
    norm = 2 * h if config.normalization == "LayerNorm" else h
    head_norm = (2 if config.normalization == "LayerNorm" else 1) * config.head_dim * 2 * config.qk_layernorm
    gated = 2 if config.swiglu else 1
    per_layer = (
        h * (q + kv) + (q + kv) * (bias or config.add_qkv_bias)   # fused QKV
        + q * h + h * bias                             # attention output projection
        + h * f * gated + f * gated * bias             # MLP up (gate and up with SwiGLU)
        + f * h + h * bias                             # MLP down
        + 2 * norm + head_norm                         # pre-attention and pre-MLP norms, the q/k norms
    )
    moe_layers, moe_change = sum(config.is_moe_layer(i) for i in range(layers)), 0
    if moe_layers:   # an MoE layer's MLP: router, E experts (and their biases), the shared expert -- not the dense MLP
        shared, f_e = config.moe_shared_expert_intermediate_size or 0, config.moe_ffn_hidden_size
        moe_mlp = (config.num_experts * h + config.num_experts * ((gated + 1) * h * f_e + (gated * f_e + h) * bias)
                   + (gated + 1) * h * shared + (gated * shared + h) * bias * (shared > 0))
        moe_change = moe_layers * (moe_mlp - (h * f * gated + f * gated * bias + f * h + h * bias))
    vocab = config.padded_vocab_size(tp)
    embedding = vocab * h
    if config.position_embedding_type == "learned_absolute":
        embedding += config.max_position_embeddings * h
    output = vocab * h if config.untie_embeddings_and_output_weights else 0
    return embedding + layers * per_layer + moe_change + norm + output


def flops_per_iteration(config: ModelConfig, global_batch_size: int, seq_length: Optional[int] = None, *,
                        tp: int) -> float:
    """Model FLOPs of one training step (forward + backward) over ``global_batch_size`` sequences, the
    vocabulary padded for ``tp`` tensor-parallel ranks."""
    s = seq_length or config.seq_length
    h, layers = config.hidden_size, config.num_layers
    query_groups_ratio = config.num_query_groups / config.num_attention_heads
    query_width_ratio = config.num_attention_heads * config.head_dim / h    # 1 unless --kv-channels changes it
    gated = 1.5 if config.swiglu else 1.0
    attention = (1 + query_groups_ratio + s / h) * query_width_ratio
    mlp = gated * config.ffn_hidden_size / h
    moe_layers = sum(config.is_moe_layer(i) for i in range(layers))
    if moe_layers:
        routed = config.moe_router_topk * config.moe_ffn_hidden_size + (config.moe_shared_expert_intermediate_size or 0)
        mlp += (gated * routed / h - mlp) * moe_layers / layers
    logits = config.padded_vocab_size(tp) / (2 * layers * h)
    return 12.0 * global_batch_size * s * layers * h * h * (attention + mlp + logits)


def palm_flops_per_iteration(config: ModelConfig, global_batch_size: int, seq_length: Optional[int] = None, *,
                             tp: int) -> float:
    """Model FLOPs of one training step as PaLM's MFU counts them (Chowdhery et al. 2022, Appendix B):
    ``6 N + 12 L H Q T`` per token, ``N`` every parameter (``count_parameters``: the embedding table too,
    whose lookup the ``6 N`` charges as a matmul), ``H`` heads of dimension ``Q``, ``T`` the sequence
    length -- dense attention, the causal mask not discounted.  A dense model's count: the formula has
    no term for experts a token does not visit."""
    if config.num_experts is not None:
        raise ValueError(f"PaLM's 6N + 12LHQT counts a dense model; --num-experts {config.num_experts} has "
                         f"experts a token does not visit: count it with flops_per_iteration")
    s = seq_length or config.seq_length
    attention = 12 * config.num_layers * config.num_attention_heads * config.head_dim * s
    return float(global_batch_size * s * (6 * count_parameters(config, tp=tp) + attention))


# Dense peak TFLOP/s per device (no sparsity), from the vendors' data sheets.
_GPU_PEAK_TFLOPS = {  # name fragment: (bf16/fp16 tensor core, tf32 tensor core)
    "H200": (989.0, 494.5),
    "H100": (989.0, 494.5),   # SXM; the PCIe card is lower: pass --peak-tflops
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5),
    "V100": (125.0, 15.7),
    "T4": (65.0, 8.1),
}
# A CPU core with two 256-bit FMA units does 2 units x 8 fp32 lanes x 2 FLOPs = 32 FLOPs per cycle;
# at a nominal 3 GHz that is ~96 GFLOP/s per core.  Nominal, not measured: pass --peak-tflops to be exact.
_CPU_FLOPS_PER_CORE = 32 * 3.0e9


def default_peak_tflops(half_precision: bool, device: Optional[torch.device] = None) -> float:
    """Peak dense TFLOP/s of one device: a table for known GPUs, a nominal figure for CPU cores."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (half, tf32) in _GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return half if half_precision else tf32
        return 100.0  # unknown GPU: a round number; --peak-tflops overrides it
    return torch.get_num_threads() * _CPU_FLOPS_PER_CORE / 1e12


def mfu(achieved_tflops_per_device: float, peak_tflops_per_device: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the device's peak (0..1)."""
    return achieved_tflops_per_device / peak_tflops_per_device
