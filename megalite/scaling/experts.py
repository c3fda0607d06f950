"""Mixture of experts in the performance model: an MoE layer's compute, activations, expert state and token
dispatch (docs/scaling.md, Mixture of experts).

For a rank's ``T = s b / (CP TP)`` routed tokens of a micro-batch (under TP, which MoE runs with sequence
parallelism, each TP rank routes its own ``s/TP``: the TP ranks act as more expert-parallel and
expert-data-parallel ranks, model/moe/layer.py), ``E`` experts of width ``f_e`` (``--moe-ffn-hidden-size``),
top-``k`` routing, a shared expert of width ``f_s`` (0 without one), ``G = 2`` with SwiGLU (else 1), hidden
``h``, element size ``e``, ``EP`` expert-parallel ranks and ``X`` expert-TP ranks (1, or TP with
``--expert-tensor-parallel-size``: each expert's ffn split over the TP group, the rows an EP rank receives
gathered over it):

    router          [T, h] x [h, E]                                  (its own tokens, every rank)
    experts         E/EP local experts, each [T k EP X / E, h] x [h, G f_e / X] and [.., f_e / X] x [f_e / X, h]
    shared expert   [T TP, h] x [h, G f_s / TP] and [T TP, f_s / TP] x [f_s / TP, h]   (split as a dense MLP)

Routing is taken as balanced: each expert receives ``T k EP / E`` rows from its EP group, so every rank
runs ``T k`` rows through its experts whatever EP is (what EP changes is whose tokens they are).  The
rows are gathered into expert order before the experts and scattered back after (the permuted copies:
``e T k h`` bytes read and written each way, at the memory bandwidth like every elementwise op), and
the experts' activation function moves ``2 e T k f_e`` bytes.  Model FLOPs stay Megatron-LM's count
(model/flops.py: the ``k`` routed experts and the shared expert, not the router); the router's
``2 T h E`` per pass is executed, so it is in the pass times and the hardware FLOPs.

Activations one MoE layer keeps for backward (beyond the attention part and the norms, which are the
dense inventory's, activations.py): the permuted expert input ``e T k h``, the activation's input and
fc2's input ``2 e T k f_e``, the expert outputs kept for the probability-weighted combine ``e T k h``, the
router's fp32 probabilities ``4 T E``, and the shared expert's as a dense MLP of width ``f_s``.

Expert state: a layer's ``E G' h f_e`` expert weights (``G' = 3`` with SwiGLU, else 2) are split over EP
and expert TP (each rank holds ``E/EP`` experts, ``1/X`` of each) and their gradients and optimizer state
sharded, under ZeRO, over the expert-data-parallel group (``TP x CP x DP / (EP X)`` ranks, ``EP X`` apart;
layout.py) -- the group their gradients are reduced over.  The dense parts (attention, norms, router,
shared expert) stay as they were.  With expert TP the permuted expert input is kept gathered
(``e T k X h``) and the activation's and fc2's inputs are ``1/X`` as wide for ``X`` times the rows.

Token dispatch, per MoE layer and micro-batch (``parallel/expert_parallel.py``):

    alltoall    forward an all-to-all of the ``T k`` rows to the ranks of their experts (dispatch) and
                one back (combine), each ``e T k h`` bytes a rank, after an all-to-all of the rows'
                counts per expert (``8 E`` bytes); backward the two again, reversed
    allgather   forward the EP group's tokens all-gathered (``e T h EP`` gathered) and the partial outputs
                reduce-scattered (``e T h EP`` before the scatter); backward the mirror (a reduce-scatter
                of the input gradient, an all-gather of the output gradient)

on the EP group's link (``EP`` ranks ``X`` apart: inside a node when they fit one), on the critical path
(no overlap is modelled); full recompute repeats the forward's.  With one EP rank nothing moves.  With
expert TP the alltoall dispatcher also passes the received rows to every rank of the expert-TP group and
their partial outputs back, an all-to-all each way (``e T k h X`` a rank sends: the volume of an all-gather
and a reduce-scatter; the counts all-gathered first), on the TP group's link, and the
allgather dispatcher gathers over expert TP x EP (``X`` times the rows).  An MoE layer without a shared
expert runs no TP collectives in its MLP: the sequence-parallel gather and scatter around it (half of a
dense layer's TP traffic) are left out for that share of the layers (``tp_collectives_share``).
Layers are averaged: with dense layers among them (``--moe-layer-freq`` > 1, or a list with 0s) a layer's
times and bytes are the MoE share of the layers times the MoE layer's plus the rest times the dense layer's
(every pipeline stage is given the average, wherever the list puts its dense layers).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from megalite.config.settings import ModelConfig
from megalite.scaling import communication as comm
from megalite.scaling.activations import activation_bytes_per_layer
from megalite.scaling.compute import (
    Gemm,
    PassTimes,
    backward_gemms,
    elementwise_seconds,
    gemm_seconds,
    layer_gemms,
    layer_times,
)
from megalite.scaling.hardware import Hardware, Link

__all__ = ["moe_share", "tp_collectives_share", "expert_parameters_per_layer", "expert_gemms", "mixed_layer_times",
           "dispatch_bytes", "dispatch_times", "moe_extra_activation_bytes", "moe_layer_activation_bytes",
           "state_groups"]


def moe_share(model: ModelConfig) -> float:
    """The fraction of the layers that hold experts (0 for a dense model)."""
    if model.num_experts is None:
        return 0.0
    return sum(model.is_moe_layer(i) for i in range(model.num_layers)) / model.num_layers


def tp_collectives_share(model: ModelConfig) -> float:
    """The share of a dense layer's TP collectives an average layer runs: an MoE layer without a shared expert
    skips its MLP's half (module docstring)."""
    if model.num_experts is None or model.moe_shared_expert_intermediate_size:
        return 1.0
    return 1.0 - moe_share(model) / 2


def _gated(model: ModelConfig) -> int:
    return 2 if model.swiglu else 1


def expert_parameters_per_layer(model: ModelConfig) -> float:
    """The routed experts' weights (and biases) of an average layer (whole model, before the EP split):
    ``share x E ((G + 1) h f_e + (G f_e + h) bias)``."""
    if model.num_experts is None:
        return 0.0
    h, f_e, gated = model.hidden_size, model.moe_ffn_hidden_size, _gated(model)
    return moe_share(model) * model.num_experts * ((gated + 1) * h * f_e + (gated * f_e + h) * model.add_bias_linear)


def _tokens(model: ModelConfig, micro_batch: int, cp: int, tp: int = 1) -> int:
    """The tokens a rank routes: its CP share of the micro-batch, and its s/TP of them under TP (with SP)."""
    return micro_batch * model.seq_length // (cp * tp)


def expert_gemms(model: ModelConfig, micro_batch: int, cp: int = 1, ep: int = 1, tp: int = 1,
                 etp: int = 1) -> List[Gemm]:
    """The forward GEMMs of one MoE layer's MLP on one rank: router, local experts (balanced), shared expert."""
    tokens, h, gated = _tokens(model, micro_batch, cp, tp), model.hidden_size, _gated(model)
    experts, k, width = model.num_experts, model.moe_router_topk, model.moe_ffn_hidden_size // etp
    local = experts // ep
    rows = max(1, round(tokens * k * ep * etp / experts))     # rows per local expert, gathered over expert TP
    gemms = [Gemm("router", tokens, experts, h, layout="nt"),
             Gemm("expert_fc1", rows, width * gated, h, local, layout="nt"),
             Gemm("expert_fc2", rows, h, width, local, layout="nt")]
    shared = model.moe_shared_expert_intermediate_size
    if shared:
        gemms += [Gemm("shared_fc1", tokens * tp, shared * gated // tp, h, layout="nt"),
                  Gemm("shared_fc2", tokens * tp, h, shared // tp, layout="nt")]
    return gemms


def _linear_passes(gemms: List[Gemm], hardware: Hardware, dtype: str) -> PassTimes:
    times = PassTimes(0.0, 0.0, 0.0)
    for gemm in gemms:
        grad_input, grad_weight = backward_gemms(gemm)
        times = times + PassTimes(gemm_seconds(gemm, hardware, dtype), gemm_seconds(grad_input, hardware, dtype),
                                  gemm_seconds(grad_weight, hardware, dtype))
    return times


def _elementwise(op: str, nbytes: float, hardware: Hardware, dtype: str) -> PassTimes:
    forward, backward = elementwise_seconds(op, nbytes, hardware, dtype)
    return PassTimes(forward, backward, 0.0)


def _mlp_times(gemms: List[Gemm], activation_elements: float, permuted_bytes: float, hardware: Hardware,
               dtype: str, linear_dtype: str, e: int, swiglu: bool) -> PassTimes:
    times = _linear_passes(gemms, hardware, linear_dtype)
    times = times + _elementwise("swiglu" if swiglu else "activation", 2 * e * activation_elements, hardware, dtype)
    if permuted_bytes:
        times = times + _elementwise("permute", permuted_bytes, hardware, dtype)
    return times


def _moe_layer(model: ModelConfig, micro_batch: int, hardware: Hardware, dtype: str, cp: int, ep: int,
               sequence_parallel: bool, linear_dtype: str, tp: int = 1, etp: int = 1) -> PassTimes:
    """One MoE layer without recompute: the dense layer less its MLP, plus the MoE MLP (module docstring)."""
    e = 4 if dtype == "float32" else 2
    tokens = _tokens(model, micro_batch, cp, tp)
    dense = layer_times(model, micro_batch, hardware, dtype, tp=tp, cp=cp, sequence_parallel=sequence_parallel,
                        linear_dtype=linear_dtype)
    dense_mlp = [g for g in layer_gemms(model, micro_batch, tp, cp) if g.name in ("fc1", "fc2")]
    mlp = _mlp_times(dense_mlp, tokens * model.ffn_hidden_size, 0.0, hardware, dtype, linear_dtype, e, model.swiglu)
    rows = tokens * model.moe_router_topk
    activated = rows * model.moe_ffn_hidden_size + tokens * (model.moe_shared_expert_intermediate_size or 0)
    permuted = 2 * 2 * e * rows * model.hidden_size     # gathered into expert order, scattered back
    moe = _mlp_times(expert_gemms(model, micro_batch, cp, ep, tp, etp), activated, permuted, hardware, dtype,
                     linear_dtype, e, model.swiglu)
    return dense + mlp.scaled(-1.0) + moe


def mixed_layer_times(model: ModelConfig, micro_batch: int, hardware: Hardware, dtype: str, *, tp: int = 1,
                      cp: int = 1, ep: int = 1, etp: int = 1, sequence_parallel: bool = False,
                      recompute: Optional[str] = None, linear_dtype: Optional[str] = None) -> PassTimes:
    """Compute seconds of an average layer (compute.layer_times for a dense model): the MoE share of the
    layers at the MoE layer's time, the rest at the dense layer's; recompute as compute.py adds it."""
    dense = layer_times(model, micro_batch, hardware, dtype, tp=tp, cp=cp, sequence_parallel=sequence_parallel,
                        recompute=recompute, linear_dtype=linear_dtype)
    share = moe_share(model)
    if share == 0:
        return dense
    moe = _moe_layer(model, micro_batch, hardware, dtype, cp, ep, sequence_parallel, linear_dtype or dtype, tp, etp)
    if recompute == "full":
        moe = moe + PassTimes(0.0, moe.forward, 0.0)
    elif recompute == "selective":   # the attention core again: what selective adds to the dense layer
        plain = layer_times(model, micro_batch, hardware, dtype, tp=tp, cp=cp, sequence_parallel=sequence_parallel,
                            linear_dtype=linear_dtype)
        moe = moe + PassTimes(0.0, dense.backward_input - plain.backward_input, 0.0)
    return dense.scaled(1 - share) + moe.scaled(share)


def dispatch_bytes(model: ModelConfig, micro_batch: int, cp: int, element_size: int, tp: int = 1) -> float:
    """Bytes of one all-to-all of the alltoall dispatcher on one rank: its ``T k`` rows of ``h``."""
    return element_size * _tokens(model, micro_batch, cp, tp) * model.moe_router_topk * model.hidden_size


def _gather_and_scatter(nbytes: float, size: int, link: Link, gap_s: float) -> float:
    return comm.all_gather_time(nbytes, size, link, gap_s) + comm.reduce_scatter_time(nbytes, size, link, gap_s)


def dispatch_times(model: ModelConfig, micro_batch: int, cp: int, ep: int, element_size: int, link: Link,
                   gap_forward_s: float = 0.0, gap_backward_s: float = 0.0, *, tp: int = 1, etp: int = 1,
                   etp_link: Optional[Link] = None, group_link: Optional[Link] = None) -> Tuple[float, float]:
    """(forward, backward) seconds of an average layer's token dispatch and combine over the EP group (and
    expert TP: ``etp_link`` its group's link, ``group_link`` the expert-TP x EP group's, module docstring)."""
    share = moe_share(model)
    if share == 0 or ep * etp <= 1:
        return 0.0, 0.0
    if model.moe_token_dispatcher_type == "alltoall":
        rows = dispatch_bytes(model, micro_batch, cp, element_size, tp)
        etp_link = etp_link or link

        def one_way(gap_s: float) -> float:
            exchange = 2 * comm.all_to_all_time(rows, ep, link, gap_s) if ep > 1 else 0.0
            return exchange + (2 * comm.all_to_all_time(rows * etp, etp, etp_link, gap_s) if etp > 1 else 0.0)
        counts = 8.0 * model.num_experts           # int64 rows per expert, exchanged before the forward's rows
        count_time = ((comm.all_to_all_time(counts, ep, link, gap_forward_s) if ep > 1 else 0.0)
                      + (comm.all_gather_time(counts / ep * etp, etp, etp_link, gap_forward_s) if etp > 1 else 0.0))
        return share * (one_way(gap_forward_s) + count_time), share * one_way(gap_backward_s)
    size = ep * etp
    gathered = element_size * _tokens(model, micro_batch, cp, tp) * model.hidden_size * size
    group = group_link or link
    return (share * _gather_and_scatter(gathered, size, group, gap_forward_s),
            share * _gather_and_scatter(gathered, size, group, gap_backward_s))


def moe_extra_activation_bytes(model: ModelConfig, micro_batch: int, *, cp: int = 1, element_size: int = 2,
                               recompute: Optional[str] = None, tp: int = 1, etp: int = 1) -> float:
    """What an MoE layer keeps for backward beyond a dense layer whose MLP has the shared expert's width
    (module docstring), one micro-batch, one rank; nothing with full recompute."""
    if model.num_experts is None or recompute == "full":
        return 0.0
    tokens, e = _tokens(model, micro_batch, cp, tp), element_size
    rows = tokens * model.moe_router_topk
    return (e * rows * ((etp + 1) * model.hidden_size + 2 * model.moe_ffn_hidden_size)
            + 4.0 * tokens * model.num_experts)


def moe_layer_activation_bytes(model: ModelConfig, micro_batch: int, *, cp: int, element_size: int,
                               recompute: Optional[str], dropout: bool, fused: bool, sequence_parallel: bool,
                               tp: int = 1, etp: int = 1) -> float:
    """One MoE layer's activation bytes on one rank: the dense inventory (its attention split over TP) with the
    shared expert as its MLP, plus the experts'."""
    base = activation_bytes_per_layer(model.seq_length // cp, micro_batch, model.hidden_size,
                                      model.num_attention_heads, tp=tp, sequence_parallel=sequence_parallel,
                                      recompute=recompute, element_size=element_size,
                                      ffn=model.moe_shared_expert_intermediate_size or 0, dropout=dropout,
                                      kv_length=model.seq_length, fused=fused)
    return base + moe_extra_activation_bytes(model, micro_batch, cp=cp, element_size=element_size,
                                             recompute=recompute, tp=tp, etp=etp)


def state_groups(elements: float, expert_elements: float, shards: int, link: Link, expert_shards: int,
                 expert_link: Link) -> List[Tuple[float, int, Link]]:
    """(parameter elements, group size, link) of each gradient-reduction group of a rank: the dense
    parameters over DP x CP, the experts' over the expert-data-parallel group."""
    groups = [(elements - expert_elements, shards, link)]
    if expert_elements:
        groups.append((expert_elements, expert_shards, expert_link))
    return groups
