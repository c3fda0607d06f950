"""Device memory of each pipeline rank: model state, activations in flight, the logits.

Model state, per parameter element held by a rank (mixed precision, Megatron's layout; Rajbhandari
et al. 2020 "ZeRO", Sec. 3 count the same 2 + 4 + 12 minus the fp32 gradient they do not keep):

    weights            e bytes (2 for bf16/fp16, 4 for fp32)
    gradient buffer    4 bytes (the contiguous fp32 ``main_grad`` buffer, data_parallel.py)
    optimizer          (4 fp32 master if e = 2) + 4 Adam m + 4 Adam v,  / (DP x CP) with ZeRO-1

sharded over the ``DP x CP`` ranks as the sharding strategy says (``--data-parallel-sharding-strategy``,
a planner flag; Rajbhandari et al. 2020's stages): ``optim`` (ZeRO-1, ``--use-distributed-optimizer``)
the optimizer state, ``optim_grads`` (ZeRO-2) the gradients too, ``optim_grads_params`` (ZeRO-3, FSDP)
the weights too -- which then are gathered a layer at a time: two layers' full weights and their
fp32 gradients are held at once (the one computing and the one prefetched),
``2 (e + 4) P_layer / t``.

A rank holds ``L_r / t`` of the layers' weights (``L_r`` its layers over all its chunks), the word
embedding ``V h / t`` (+ the position table) on the first rank, and the final norm and the output
layer on the last (tied weights: the last rank keeps its own copy of the embedding).

Activations: Korthikanti et al. 2022 per layer and micro-batch (activations.py; Eq. 1, 2, 4,
selective and full recompute) times the layers of a chunk times the (micro-batch, chunk) pairs the
rank holds at once.  That count is the schedule's (simulator.peak_in_flight); in closed form, for rank
``r`` of ``p`` with ``m`` micro-batches and ``v`` chunks:

    GPipe           m
    1F1B, ZB-H1     min(p - r, m)                  (ZB-H1 keeps W's inputs: min(p, m) on every rank)
    interleaved     min(2 (p - r - 1) + (v - 1) p + 1, m v),  or m v when m = p

which for rank 0 of the interleaved schedule is Korthikanti's ``L (1 + (p-1)/(p v))`` layers.  With
full recompute a rank also holds, during one layer's backward, that layer's full activations (the
recomputed forward).  The first rank keeps the embedding's dropout mask (``sbh`` bytes) per
micro-batch in flight; the last rank holds one micro-batch's fp32 logits and their gradient
(``2 x 4 s b V / t``).

On a calibrated CPU (``cpu_kernels``) a layer's activations are what PyTorch's CPU kernels save
(cpu_activations.py, where its inventory is the model's layer): no score matrix without attention
dropout, so selective recompute saves nothing there; the embedding's dropout mask has the
activation's element size; the last rank also keeps, per micro-batch, the final norm's input
(``e sbh``, ``/t`` with SP) and the output layer's input (``e sbh``, gathered under SP) -- found with
saved-tensor hooks on a whole TP 2 model, with and without SP (docs/scaling.md).  Every rank also
holds the runtime's own memory (``runtime_bytes``: the interpreter, torch, the process group and a
first step's lazily made state; calibration/baseline.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megalite.config.settings import ModelConfig
from megalite.model.flops import count_parameters
from megalite.parallel.pipeline.stages import virtual_stage_layer_counts
from megalite.scaling.activations import activation_bytes_per_layer, fused_attention
from megalite.scaling.cpu_activations import cpu_activation_bytes_per_layer, inventory_applies
from megalite.scaling.experts import expert_parameters_per_layer, moe_layer_activation_bytes, moe_share

__all__ = ["StageMemory", "in_flight_formula", "parameter_split", "activation_bytes", "stage_memories"]


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of a pipeline stage."""

    pp_rank: int
    parameters: float          # elements
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    expert_parameters: float = 0.0   # elements of ``parameters`` that are routed experts' (experts.py)
    runtime: float = 0.0             # the runtime's own bytes (a calibrated CPU's baseline)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.runtime


def in_flight_formula(schedule: Optional[str], p: int, v: int, m: int, rank: int) -> int:
    """(micro-batch, chunk) activations rank ``rank`` holds at its peak, in closed form."""
    if schedule is None or p == 1:
        return 1
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(p - rank, m)
    if schedule == "zb-h1":
        return min(p, m)
    if schedule == "interleaved":
        return m * v if m == p else min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v)
    raise ValueError(f"schedule {schedule!r} has no in-flight formula")


def parameter_split(model: ModelConfig, tp: int):
    """(per-layer, embedding (+ positions), final norm) parameter counts of the whole model, the vocabulary
    padded for ``tp`` tensor-parallel ranks; per layer the average (an MoE model's layers differ with
    --moe-layer-freq > 1 or a list with 0s)."""
    vocab = model.padded_vocab_size(tp)
    embedding = vocab * model.hidden_size
    if model.position_embedding_type == "learned_absolute":
        embedding += model.max_position_embeddings * model.hidden_size
    final_norm = (2 if model.normalization == "LayerNorm" else 1) * model.hidden_size
    output = vocab * model.hidden_size if model.untie_embeddings_and_output_weights else 0
    layers = count_parameters(model, tp=tp) - embedding - final_norm - output
    return layers / model.num_layers, embedding, final_norm


def _layers_on_rank(model: ModelConfig, pp: int, vpp: Optional[int], rank: int, first: Optional[int],
                    last: Optional[int], counts: Optional[List[int]] = None) -> List[int]:
    counts = counts or virtual_stage_layer_counts(model.num_layers, pp, vpp, first, last)
    return [counts[chunk * pp + rank] for chunk in range(vpp or 1)]


def activation_bytes(model: ModelConfig, micro_batch: int, *, tp: int = 1, cp: int = 1,
                     sequence_parallel: bool = False, recompute: Optional[str] = None, element_size: int = 2,
                     dropout_fused: bool = True, cpu_kernels: bool = False, etp: int = 1) -> float:
    """One layer, one micro-batch, one rank: Korthikanti et al. 2022 (activations.py), 1-byte dropout
    masks when dropout is on, a CP rank's s/cp queries against all s keys; no score matrix with fused
    attention (``--attention-backend`` other than unfused/local, its dropout in the kernel where
    ``dropout_fused``: activations.fused_attention).  ``cpu_kernels``: as PyTorch's CPU kernels save
    them (cpu_activations.py), where its inventory is this model's layer."""
    if cpu_kernels and inventory_applies(model, cp):
        return cpu_activation_bytes_per_layer(
            model.seq_length, micro_batch, model.hidden_size, model.num_attention_heads, element_size=element_size,
            tp=tp, sequence_parallel=sequence_parallel, recompute=recompute, ffn=model.ffn_hidden_size,
            hidden_dropout=model.hidden_dropout > 0, attention_dropout=model.attention_dropout > 0)
    dropout = model.hidden_dropout > 0 or model.attention_dropout > 0
    fused = fused_attention(model.attention_backend, model.attention_dropout, dropout_fused)
    dense = activation_bytes_per_layer(model.seq_length // cp, micro_batch, model.hidden_size,
                                       model.num_attention_heads, tp=tp, sequence_parallel=sequence_parallel,
                                       recompute=recompute, element_size=element_size, ffn=model.ffn_hidden_size,
                                       dropout=dropout, kv_length=model.seq_length, fused=fused)
    share = moe_share(model)
    if share == 0:
        return dense
    moe = moe_layer_activation_bytes(model, micro_batch, cp=cp, element_size=element_size, recompute=recompute,
                                     dropout=dropout, fused=fused, sequence_parallel=sequence_parallel, tp=tp, etp=etp)
    return (1 - share) * dense + share * moe


def _model_state(dense: float, experts: float, sharding: str, shards: int, expert_shards: int,
                 element_size: int, gathered: float) -> tuple:
    """(weights, gradients, optimizer) bytes of ``dense`` and ``experts`` parameter elements on a rank, each
    kind sharded as ``sharding`` says over its own group (DP x CP; the experts' over expert-DP), plus
    ZeRO-3's ``gathered`` working elements (whole weights and fp32 gradients)."""
    optimizer_bytes = (4 if element_size == 2 else 0) + 8

    def sharded(stage_min: str, elements: float, group: int) -> float:
        order = ("no_shard", "optim", "optim_grads", "optim_grads_params")
        return elements / group if order.index(sharding) >= order.index(stage_min) else elements

    weights = element_size * (sharded("optim_grads_params", dense, shards)
                              + sharded("optim_grads_params", experts, expert_shards) + gathered)
    gradients = 4.0 * (sharded("optim_grads", dense, shards) + sharded("optim_grads", experts, expert_shards)
                       + gathered)
    optimizer = optimizer_bytes * (sharded("optim", dense, shards) + sharded("optim", experts, expert_shards))
    return weights, gradients, optimizer


def _chunk_activations(per_chunk: int, stored: float, whole: float, recompute: Optional[str],
                       recompute_method: Optional[str], span: int) -> tuple:
    """(bytes of one chunk's layers for one micro-batch, the working bytes of a recomputed span)."""
    if recompute == "full" and recompute_method == "block":
        recomputed = min(span, per_chunk)
        return recomputed * stored + (per_chunk - recomputed) * whole, whole
    if recompute == "full":
        return per_chunk * stored / span, span * whole
    return per_chunk * stored, 0.0


def stage_memories(model: ModelConfig, *, micro_batch: int, tp: int, pp: int, cp: int, dp: int,
                   vpp: Optional[int], in_flight: List[int], element_size: int, zero1: bool = False,
                   sequence_parallel: bool = False, recompute: Optional[str] = None,
                   recompute_method: Optional[str] = None, recompute_num_layers: Optional[int] = None,
                   first_stage_layers: Optional[int] = None,
                   last_stage_layers: Optional[int] = None,
                   stage_counts: Optional[List[int]] = None, sharding: Optional[str] = None,
                   dropout_fused: bool = True, ep: int = 1, cpu_kernels: bool = False,
                   runtime_bytes: float = 0.0, etp: int = 1) -> List[StageMemory]:
    """Memory of one rank of each pipeline stage; ``in_flight[r]`` (micro-batch, chunk) pairs held by rank r;
    ``stage_counts``: layers per virtual stage when the split is not the trainer's (pipeline_split.py);
    ``sharding``: the strategy (default ``optim`` with ``zero1``, else ``no_shard``); ``ep``: the experts split
    over EP (and expert-TP, ``etp``) ranks, their state sharded over the ``TP x CP x DP / (EP etp)``
    expert-data-parallel ranks;
    ``cpu_kernels`` and ``runtime_bytes``: a calibrated CPU's (module docstring)."""
    sharding = sharding or ("optim" if zero1 else "no_shard")
    per_layer, embedding, final_norm = parameter_split(model, tp)
    expert_per_layer = expert_parameters_per_layer(model)
    vocab = model.padded_vocab_size(tp)
    h, s, b = model.hidden_size, model.seq_length // cp, micro_batch
    stored = activation_bytes(model, b, tp=tp, cp=cp, sequence_parallel=sequence_parallel, recompute=recompute,
                              element_size=element_size, dropout_fused=dropout_fused, cpu_kernels=cpu_kernels, etp=etp)
    whole = activation_bytes(model, b, tp=tp, cp=cp, sequence_parallel=sequence_parallel, recompute=None,
                             element_size=element_size, dropout_fused=dropout_fused, cpu_kernels=cpu_kernels, etp=etp)
    mask = element_size if cpu_kernels else 1   # bytes per element of the embedding's dropout mask
    out = []
    for rank in range(pp):
        chunks = _layers_on_rank(model, pp, vpp, rank, first_stage_layers, last_stage_layers, stage_counts)
        layers = sum(chunks)
        experts = layers * expert_per_layer / (ep * etp)
        params = layers * (per_layer - expert_per_layer) / tp
        if rank == 0:
            params += embedding / tp
        if rank == pp - 1:
            own_output = pp > 1 or model.untie_embeddings_and_output_weights   # else the embedding is it
            params += final_norm + (vocab * h / tp if own_output else 0.0)
        chunk_bytes, working = _chunk_activations(max(chunks), stored, whole, recompute, recompute_method,
                                                  recompute_num_layers or 1)
        activations = in_flight[rank] * chunk_bytes + working
        if rank == 0 and model.hidden_dropout > 0:
            activations += in_flight[rank] * mask * s * b * h / (tp if sequence_parallel else 1)
        if rank == pp - 1 and cpu_kernels:   # the final norm's input and the output layer's (gathered) input
            activations += in_flight[rank] * element_size * s * b * h * (1 + 1 / (tp if sequence_parallel else 1))
        logits = 2 * 4.0 * s * b * vocab / tp if rank == pp - 1 else 0.0
        zero3 = sharding == "optim_grads_params" and dp * cp > 1      # ZeRO-3's two whole working layers
        gathered = 2 * ((per_layer - expert_per_layer) / tp + expert_per_layer / (ep * etp)) if zero3 else 0.0
        state = _model_state(params, experts, sharding, dp * cp, tp * cp * dp // (ep * etp), element_size, gathered)
        out.append(StageMemory(rank, params + experts, *state, activations, logits, experts, runtime_bytes))
    return out
