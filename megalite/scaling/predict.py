"""``predict``: the step time, throughput and memory of a run's settings on a given machine.

    iteration time = pipeline makespan (simulated; passes = compute + their exposed TP/CP/PP communication)
                     + exposed data-parallel reduction (all of it, or what the last micro-batch's
                       backward cannot hide with --overlap-grad-reduce on hardware whose communication
                       overlaps compute) + the tied-embedding all-reduce
                     + optimizer step (memory-bound Adam) + ZeRO-1's parameter all-gather
                     + the host's fixed cost per step (a calibrated CPU; its fixed costs per layer and
                       per micro-batch are part of the layer and output-layer passes)

    TFLOP/s per GPU = model FLOPs per step / iteration time / world size  (flops.py: no recompute);
    the hardware TFLOP/s count recompute too (compute.hardware_flops_per_iteration: Narayanan Eq. 3).

The pieces: compute.py (pass times), communication.py (collective times and links), schedule.py
(makespan, bubble, in-flight micro-batches), memory.py (bytes per pipeline rank), hardware.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from megalite.config.settings import ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig
from megalite.model.flops import count_parameters, flops_per_iteration
from megalite.scaling import communication as comm
from megalite.scaling import experts
from megalite.scaling.compute import (
    PassTimes,
    attention_core_times,
    element_size,
    hardware_flops_per_iteration,
    linear_times,
    logits_times,
)
from megalite.scaling.experts import mixed_layer_times
from megalite.scaling.hardware import Hardware
from megalite.scaling.layout import Layout, layout_of, run_dtype
from megalite.scaling.memory import StageMemory, activation_bytes, in_flight_formula, stage_memories
from megalite.scaling.options import PlanOptions
from megalite.scaling.overlap import behind, p2p_exposed, tp_exposed
from megalite.scaling.pipeline_split import stage_layer_counts
from megalite.scaling.schedule import pipeline_time

__all__ = ["Prediction", "predict", "Layout", "layout_of", "memory_per_stage", "run_dtype", "with_host_overhead"]

GIB = 2.0 ** 30


@dataclass
class Prediction:
    params: int
    flops_per_iteration: float              # model FLOPs (no recompute)
    hardware_flops_per_iteration: float     # with recompute
    iteration_time_s: float
    tflops_per_gpu: float                   # model FLOPs
    hardware_tflops_per_gpu: float
    mfu: float
    memory_gb_per_gpu: float                # GiB on the most loaded rank
    activation_bytes_per_layer: float       # one micro-batch, one rank
    bubble_fraction: float
    micro_batch_size: int
    virtual_pipeline_model_parallel_size: Optional[int]
    fits: bool
    breakdown: Dict[str, float]             # seconds: compute, exposed_communication, bubble, optimizer,
                                            # host_overhead
    layout: Dict[str, object] = field(default_factory=dict)
    memory_gb_per_stage: List[float] = field(default_factory=list)
    hardware: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _stage_pass_times(chunks: Sequence[int], first: bool, last: bool, layer: PassTimes, logits: PassTimes,
                      layer_comm_f: float, layer_comm_b: float, p2p: float,
                      ends: Sequence[PassTimes] = (PassTimes(0.0, 0.0, 0.0),) * 2) -> PassTimes:
    """One stage's passes (all its chunks) for one micro-batch, communication included; ``ends`` are
    the embedding's and the output layer's collectives (first and last stage)."""
    layers = sum(chunks)
    times = layer.scaled(layers)
    if first:
        times = times + ends[0]
    if last:
        times = times + logits + ends[1]
    # TP collectives of each layer; a chunk receives one activation (forward) and one gradient (backward)
    # unless it is the first (last) virtual stage.
    receives_f = len(chunks) - (1 if first else 0)
    receives_b = len(chunks) - (1 if last else 0)
    return times + PassTimes(layers * layer_comm_f + receives_f * p2p, layers * layer_comm_b + receives_b * p2p, 0.0)


def with_host_overhead(times: PassTimes, seconds: float) -> PassTimes:
    """``times`` plus the host's fixed ``seconds``, shared out over its passes in proportion to them."""
    total = times.forward + times.backward_input + times.backward_weight
    return times.scaled((total + seconds) / total) if seconds and total > 0 else times


def memory_per_stage(model: ModelConfig, parallel: ParallelConfig, optimizer: Optional[OptimizerConfig], layout: Layout,
                     in_flight: Optional[Sequence[int]] = None,
                     hardware: Optional[Hardware] = None) -> List[StageMemory]:
    """Bytes on one rank of each pipeline stage; ``in_flight`` per rank defaults to the closed form
    (memory.in_flight_formula, equal to the simulator's count); ``hardware``: whether its fused
    attention applies dropout itself (default: it does)."""
    lay = layout
    if in_flight is None:
        in_flight = [in_flight_formula(lay.schedule, lay.pp, lay.v, lay.num_microbatches, r) for r in range(lay.pp)]
    return stage_memories(model, micro_batch=lay.micro_batch, tp=lay.tp, pp=lay.pp, cp=lay.cp, dp=lay.dp,
                          vpp=lay.vpp, in_flight=list(in_flight), element_size=element_size(lay.dtype),
                          sharding=lay.sharding, sequence_parallel=parallel.sequence_parallel,
                          recompute=model.recompute_granularity, recompute_method=model.recompute_method,
                          recompute_num_layers=model.recompute_num_layers,
                          stage_counts=_stage_counts(model, parallel, lay),
                          dropout_fused=hardware is None or hardware.fused_attention_dropout, ep=lay.ep, etp=lay.etp,
                          cpu_kernels=hardware is not None and hardware.cpu_activations,
                          runtime_bytes=hardware.runtime_bytes if hardware is not None else 0.0)


def _stage_counts(model: ModelConfig, parallel: ParallelConfig, lay: Layout) -> List[int]:
    return stage_layer_counts(model.num_layers, lay.pp, lay.vpp, parallel.decoder_first_pipeline_num_layers,
                              parallel.decoder_last_pipeline_num_layers, lay.options)


def _pass_communication(model: ModelConfig, lay: Layout, sp: bool, hardware: Hardware, grid: comm.GridStrides,
                        layer: PassTimes, logits: PassTimes) -> tuple:
    """(TP + CP seconds per layer forward, per layer backward, one PP message, (embedding, output layer)
    collectives as PassTimes) of one micro-batch.  Each collective's gap -- the compute before it, which
    a calibrated CPU's fits depend on -- is its share of the pass it follows."""
    tp, cp, b, e = lay.tp, lay.cp, lay.micro_batch, element_size(lay.dtype)
    full = model.recompute_granularity == "full"
    tokens_bytes = model.seq_length // cp * b * model.hidden_size * e
    # collectives in one layer's forward and backward (full recompute: the forward's again in the backward)
    per_forward = comm.tp_collectives_per_layer(sp, False) * (tp > 1) + (cp > 1)
    per_backward = comm.tp_collectives_per_layer(sp, True) * (tp > 1) + (cp > 1) + (per_forward if full else 0)
    gap_f = layer.forward / max(1, per_forward)
    gap_b = (layer.backward_input + layer.backward_weight) / max(1, per_backward)
    tp_link = grid.tp_link(hardware)
    overlapped = lay.options.tp_comm_overlap and hardware.overlaps_communication
    linears = linear_times(model, b, hardware, lay.linear_dtype, tp=tp, cp=cp)
    share = hardware.overlap_sm_fraction
    tp_share = experts.tp_collectives_share(model)   # MoE layers without a shared expert: no TP collectives in the MLP
    tp_f = tp_exposed(tp_share * comm.tp_time_per_layer(tokens_bytes, tp, tp_link, sp, gap_f), linears.forward, tp,
                      overlapped, share)
    tp_b = tp_exposed(tp_share * comm.tp_time_per_layer(tokens_bytes, tp, tp_link, sp, gap_b, backward=True),
                      linears.backward_input + linears.backward_weight, tp, overlapped, share)
    cp_f = cp_b = 0.0
    if cp > 1:
        cp_f, cp_b = _cp_exposed(model, lay, hardware, gap_f, gap_b)
    # full recompute repeats the forward's collectives inside the backward
    moe_f, moe_b = experts.dispatch_times(model, b, cp, lay.ep, e, grid.ep_link(hardware), gap_f, gap_b, tp=tp,
                                          etp=lay.etp, etp_link=grid.etp_link(hardware),
                                          group_link=grid.expert_link(hardware))
    layer_comm_f = tp_f + cp_f + moe_f
    layer_comm_b = tp_b + cp_b + moe_b + ((tp_exposed(tp_share * comm.tp_time_per_layer(tokens_bytes, tp, tp_link, sp,
                                                                                       gap_b),
                                                      linears.forward, tp, overlapped, share) + cp_f + moe_f)
                                          if full else 0.0)
    p2p = 0.0
    if lay.pp > 1:   # a message follows one chunk's pass; the interleaved schedule hides it behind the next
        chunk_forward = layer.forward * model.num_layers / (lay.pp * lay.v)
        p2p = comm.p2p_time(comm.pp_message_bytes(model.seq_length // cp, b, model.hidden_size, e, tp, sp),
                            grid.pp_link(hardware), chunk_forward)
        p2p = p2p_exposed(p2p, chunk_forward, lay.schedule == "interleaved" and lay.options.overlap_p2p_comm
                          and hardware.overlaps_communication, hardware.overlap_sm_fraction)
    tokens = model.seq_length // cp * b
    logits_comm = comm.tp_logits_time(tokens_bytes, tokens, tp, tp_link, sp, logits.forward, logits.backward_input)
    ends = (PassTimes(*comm.tp_embedding_time(tokens_bytes, tp, tp_link, sp, gap_f), 0.0),
            PassTimes(*logits_comm, 0.0))
    return layer_comm_f, layer_comm_b, p2p, ends


def _cp_exposed(model: ModelConfig, lay: Layout, hardware: Hardware, gap_f: float, gap_b: float) -> tuple:
    """(forward, backward) seconds of one layer's CP exchange (communication.cp_exchange_times) on the
    critical path.  The ``p2p`` ring's transfers run beside the attention core, which hides up to its own
    length of them where communication overlaps compute; ``all_gather`` and ``a2a`` complete before the
    attention that needs them (as megalite runs them, and as Llama 3's all-gather CP was published: its
    latency exposed), so all of it counts, as all of every type does where nothing overlaps."""
    e = element_size(lay.dtype)
    kv_block = comm.kv_block_bytes(model.seq_length // lay.cp, lay.micro_batch, model.num_query_groups,
                                   model.head_dim, e, lay.tp)
    query_block = lay.micro_batch * model.num_attention_heads * model.head_dim * model.seq_length // lay.cp * e / lay.tp
    link = comm.group_link(hardware, lay.cp, lay.tp)
    exchange_f, exchange_b = comm.cp_exchange_times(kv_block, query_block, lay.cp, link, lay.cp_comm_type, gap_f,
                                                    gap_b)
    if not hardware.overlaps_communication or lay.cp_comm_type != "p2p":
        return exchange_f, exchange_b
    core_f, core_b = attention_core_times(model, lay.micro_batch, hardware, lay.dtype, tp=lay.tp, cp=lay.cp)
    share = hardware.overlap_sm_fraction
    return behind(exchange_f, core_f, True, share), behind(exchange_b, core_b, True, share)


@dataclass(frozen=True)
class _Passes:
    """One micro-batch's pass times on each pipeline stage (communication included), and the pieces they
    are made of."""
    layer: PassTimes            # one layer's compute
    logits: PassTimes           # the output layer's compute
    counts: List[int]           # layers per virtual stage
    stages: List[PassTimes]     # per pipeline rank

    @property
    def slowest(self) -> PassTimes:
        return max(self.stages, key=lambda t: t.forward + t.backward_input + t.backward_weight)


@dataclass(frozen=True)
class _OutsidePasses:
    """Seconds of one step that the pipeline's passes do not hold."""
    dp_exposed: float           # the data-parallel gradient reduction that no backward hides
    zero_gather: float          # ZeRO-1's parameter all-gather
    embedding_sync: float       # the tied embedding's all-reduce between the first and last stage
    optimizer: float


def predict(model: ModelConfig, parallel: ParallelConfig, training: TrainingConfig, optimizer: OptimizerConfig,
            hardware: Hardware, world_size: Optional[int] = None, options: Optional[PlanOptions] = None) -> Prediction:
    """Predicted step time, throughput and per-rank memory of these settings on ``world_size`` devices of
    ``hardware`` (default: ``parallel.world_size``).  The configs come from ``arguments.parse_args``;
    ``options`` are the planner's own flags (options.py)."""
    lay = layout_of(parallel, training, optimizer, world_size, options)
    grid = comm.GridStrides(lay.tp, lay.cp, lay.dp, lay.pp, lay.ep, lay.etp)
    passes = _stage_passes(model, parallel, lay, hardware, grid)
    slowest = passes.slowest
    pipe = pipeline_time(lay.schedule, lay.pp, lay.v, lay.num_microbatches, slowest.forward,
                         slowest.backward_input, slowest.backward_weight)
    memories = memory_per_stage(model, parallel, optimizer, lay, pipe.in_flight, hardware)
    outside = _outside_passes(model, optimizer, lay, hardware, grid, slowest, max(memories, key=lambda s: s.parameters))
    iteration = (pipe.makespan + outside.dp_exposed + outside.zero_gather + outside.embedding_sync
                 + outside.optimizer + hardware.step_overhead_s)
    breakdown = _breakdown(passes, lay, pipe.makespan, outside, hardware)
    return _prediction(model, parallel, optimizer, hardware, lay, iteration, pipe.bubble_fraction, memories, breakdown)


def _stage_passes(model: ModelConfig, parallel: ParallelConfig, lay: Layout, hardware: Hardware,
                  grid: comm.GridStrides) -> _Passes:
    """Each pipeline stage's passes for one micro-batch: compute, host overhead and communication."""
    sp = parallel.sequence_parallel
    layer = with_host_overhead(mixed_layer_times(model, lay.micro_batch, hardware, lay.dtype, tp=lay.tp, cp=lay.cp,
                                                 ep=lay.ep, etp=lay.etp, sequence_parallel=sp,
                                                 recompute=model.recompute_granularity, linear_dtype=lay.linear_dtype),
                               hardware.layer_overhead_s)
    logits = with_host_overhead(logits_times(model, lay.micro_batch, hardware, lay.dtype, tp=lay.tp, cp=lay.cp),
                                hardware.micro_batch_overhead_s)
    layer_comm_f, layer_comm_b, p2p, ends = _pass_communication(model, lay, sp, hardware, grid, layer, logits)
    pp = lay.pp
    counts = _stage_counts(model, parallel, lay)
    stages = [_stage_pass_times([counts[c * pp + r] for c in range(lay.v)], r == 0, r == pp - 1, layer, logits,
                                layer_comm_f, layer_comm_b, p2p, ends) for r in range(pp)]
    if lay.sharding == "optim_grads_params":
        stages = _with_zero3_gathers(model, parallel, lay, hardware, grid, stages)
    return _Passes(layer, logits, counts, stages)


def _with_zero3_gathers(model: ModelConfig, parallel: ParallelConfig, lay: Layout, hardware: Hardware,
                        grid: comm.GridStrides, stages: List[PassTimes]) -> List[PassTimes]:
    """Each stage's passes plus ZeRO-3's per-micro-batch traffic over DP x CP (communication.zero3_times),
    what of it the pass's compute does not hide (prefetched a layer ahead on a GPU)."""
    memories = memory_per_stage(model, parallel, None, lay, hardware=hardware)
    e, overlapped = element_size(lay.dtype), hardware.overlaps_communication
    out = []
    for stage, memory in zip(stages, memories):
        times = [comm.zero3_times(n, e, size, link) for n, size, link in _state_groups(memory, lay, hardware, grid)]
        gather_f, gather_b = sum(t[0] for t in times), sum(t[1] for t in times)
        share = hardware.overlap_sm_fraction
        out.append(stage + PassTimes(behind(gather_f, stage.forward, overlapped, share),
                                     behind(gather_b, stage.backward_input + stage.backward_weight, overlapped, share),
                                     0.0))
    return out


def _state_groups(memory: StageMemory, lay: Layout, hardware: Hardware, grid: comm.GridStrides) -> list:
    """(elements, group size, link) of a rank's gradient reductions: dense over DP x CP, experts over expert-DP."""
    return experts.state_groups(memory.parameters, memory.expert_parameters, lay.dp * lay.cp, grid.dp_link(hardware),
                                lay.edp, grid.edp_link(hardware))


def _outside_passes(model: ModelConfig, optimizer: OptimizerConfig, lay: Layout, hardware: Hardware,
                    grid: comm.GridStrides, slowest: PassTimes, heaviest: StageMemory) -> _OutsidePasses:
    """The step's costs after the pipeline: data-parallel gradient reduction (hidden behind the last
    micro-batch's backward when overlapped), tied-embedding sync, optimizer step, ZeRO-1's gather; the
    experts' part over the expert-data-parallel group."""
    tp, e = lay.tp, element_size(lay.dtype)
    groups = _state_groups(heaviest, lay, hardware, grid)
    zero1 = lay.sharding != "no_shard"
    window = slowest.backward_input + slowest.backward_weight
    dp_grad = sum(comm.dp_gradient_time(n, size, link, zero1, gap_s=window) for n, size, link in groups)
    if lay.sharding == "optim_grads_params":   # reduced and gathered with each micro-batch's passes instead
        dp_grad = 0.0
    overlapped = optimizer.overlap_grad_reduce and hardware.overlaps_communication
    dp_exposed = behind(dp_grad, window, overlapped, hardware.overlap_sm_fraction)
    embedding_sync = 0.0
    if lay.pp > 1 and not model.untie_embeddings_and_output_weights:
        embedding_bytes = 4.0 * model.padded_vocab_size(tp) * model.hidden_size / tp
        embedding_sync = comm.all_reduce_time(embedding_bytes, 2, grid.pp_link(hardware))
    state_elements = sum(n / (size if zero1 else 1) for n, size, _link in groups)
    optimizer_bytes = state_elements * (32 + e)   # grad read + norm, master, m, v read and written, half copy
    rate = hardware.optimizer_bytes_per_s or hardware.hbm_gbs * 1e9 * hardware.memory_efficiency
    optimizer_time = optimizer_bytes / rate
    zero_gather = sum(comm.zero1_gather_time(n, e, size, link, optimizer_time) for n, size, link in groups) * zero1
    if lay.sharding == "optim_grads_params":
        zero_gather = 0.0
    gather_overlapped = lay.options.overlap_param_gather and hardware.overlaps_communication
    zero_gather = behind(zero_gather, slowest.forward, gather_overlapped, hardware.overlap_sm_fraction)
    return _OutsidePasses(dp_exposed, zero_gather, embedding_sync, optimizer_time)


def _breakdown(passes: _Passes, lay: Layout, makespan: float, outside: _OutsidePasses, hardware: Hardware) -> dict:
    """The step's seconds by kind: the slowest stage's compute alone, communication not hidden, bubble,
    optimizer, host."""
    slowest, stages, pp, m = passes.slowest, passes.stages, lay.pp, lay.num_microbatches
    chunks_of_slowest = [passes.counts[c * pp + stages.index(slowest)] for c in range(lay.v)]
    compute_only = _stage_pass_times(chunks_of_slowest, slowest is stages[0], slowest is stages[-1], passes.layer,
                                     passes.logits, 0.0, 0.0, 0.0)
    compute = m * (compute_only.forward + compute_only.backward_input + compute_only.backward_weight)
    busy = m * (slowest.forward + slowest.backward_input + slowest.backward_weight)
    exposed_in_passes = busy - compute
    return {
        "compute": compute,
        "exposed_communication": exposed_in_passes + outside.dp_exposed + outside.zero_gather + outside.embedding_sync,
        "bubble": makespan - busy,
        "optimizer": outside.optimizer,
        "host_overhead": hardware.step_overhead_s,
    }


def _prediction(model: ModelConfig, parallel: ParallelConfig, optimizer: OptimizerConfig, hardware: Hardware,
                lay: Layout, iteration: float, bubble_fraction: float, memories: Sequence[StageMemory],
                breakdown: dict) -> Prediction:
    """The Prediction of one step's ``iteration`` seconds: FLOP rates, memory and the layout."""
    world, b, dtype, recompute, sp = (lay.world, lay.micro_batch, lay.dtype, model.recompute_granularity,
                                      parallel.sequence_parallel)
    model_flops = flops_per_iteration(model, lay.global_batch, tp=lay.tp)
    hw_flops = hardware_flops_per_iteration(model, lay.global_batch, recompute, tp=lay.tp)
    tflops = model_flops / iteration / world / 1e12
    heaviest = max(memories, key=lambda s: s.total)
    capacity = hardware.hbm_gb * GIB
    return Prediction(
        params=count_parameters(model, tp=lay.tp), flops_per_iteration=model_flops,
        hardware_flops_per_iteration=hw_flops,
        iteration_time_s=iteration, tflops_per_gpu=tflops, hardware_tflops_per_gpu=hw_flops / iteration / world / 1e12,
        mfu=tflops / hardware.peak(dtype), memory_gb_per_gpu=heaviest.total / GIB,
        activation_bytes_per_layer=activation_bytes(model, b, tp=lay.tp, cp=lay.cp, sequence_parallel=sp,
                                                    recompute=recompute, element_size=element_size(dtype),
                                                    dropout_fused=hardware.fused_attention_dropout,
                                                    cpu_kernels=hardware.cpu_activations),
        bubble_fraction=bubble_fraction, micro_batch_size=b, virtual_pipeline_model_parallel_size=lay.vpp,
        fits=heaviest.total <= capacity and not math.isnan(heaviest.total),
        breakdown=breakdown,
        layout=dict(tp=lay.tp, pp=lay.pp, cp=lay.cp, dp=lay.dp, vpp=lay.v, micro_batch_size=b,
                    num_microbatches=lay.num_microbatches, schedule=lay.schedule, recompute=recompute,
                    sequence_parallel=sp, dtype=dtype, world_size=world, zero1=optimizer.use_distributed_optimizer,
                    sharding=lay.sharding, ep=lay.ep),
        memory_gb_per_stage=[s.total / GIB for s in memories], hardware=hardware.name)
