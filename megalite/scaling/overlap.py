"""Communication that runs beside compute: what of it a step still waits for.

Each overlap is a choice of the run (options.py, and the trainer's --overlap-grad-reduce) and holds only
on hardware whose collectives run beside compute (``Hardware.overlaps_communication``: a GPU's copy
engines and communication SMs; not a CPU, whose gloo threads share the ranks' cores).  The models:

    --tp-comm-overlap        a layer's TP collectives (sequence parallel: all-gathers before QKV and
                             fc1, reduce-scatters after the projection and fc2) are cut into TP chunks
                             and pipelined with the GEMMs they feed or drain; the first chunk of a gather
                             (last of a scatter) has nothing to hide behind, so per pass
                             exposed = max(T / t, T - G)        T: the TP time, G: the linear GEMMs' time
    --overlap-grad-reduce    gradient buckets are reduced while the last micro-batch's backward runs:
                             exposed = max(0, T_dp - that backward)         (predict.py)
    --overlap-param-gather   the sharded parameters' all-gather (ZeRO) runs bucket by bucket ahead of the
                             next step's first forward: exposed = max(0, T_gather - that forward)
    pipeline messages        with the interleaved schedule a stage posts its send and receive beside its
                             next chunk's pass (Megatron's default there; --no-overlap-p2p-communication
                             turns it off): a message costs the stage max(0, T_p2p - one chunk's
                             forward); 1F1B exchanges block.

What overlapping costs: a communication kernel runs its channels as thread blocks on SMs of their own
(NCCL: one block per channel; Transformer Engine's pipelined reduce-scatter likewise), so the compute
beside it runs on the other SMs.  With ``f`` the fraction it holds (``Hardware.overlap_sm_fraction``),
the ``H`` seconds of communication hidden behind compute stretch that compute by ``H f / (1 - f)``,
added to what is exposed.  Not modelled: contention between overlapped collectives on one link.
"""
from __future__ import annotations

from megalite.scaling.options import PlanOptions

__all__ = ["tp_exposed", "p2p_exposed", "behind", "check_options"]


def _with_sm_share(communication: float, exposed: float, sm_fraction: float) -> float:
    """``exposed`` plus the compute stretch of the ``communication - exposed`` seconds hidden beside it."""
    return exposed + (communication - exposed) * sm_fraction / (1.0 - sm_fraction)


def tp_exposed(tp_seconds: float, linear_seconds: float, tp: int, overlapped: bool, sm_fraction: float = 0.0) -> float:
    """A pass's TP communication left on the critical path (all of it unless ``overlapped``)."""
    if not overlapped or tp <= 1:
        return tp_seconds
    return _with_sm_share(tp_seconds, max(tp_seconds / tp, tp_seconds - linear_seconds), sm_fraction)


def p2p_exposed(p2p_seconds: float, chunk_pass_seconds: float, overlapped: bool, sm_fraction: float = 0.0) -> float:
    """A pipeline message's cost to the stage: all of it, or what the next chunk's pass does not hide."""
    return behind(p2p_seconds, chunk_pass_seconds, overlapped, sm_fraction)


def behind(communication_seconds: float, window_seconds: float, overlapped: bool, sm_fraction: float = 0.0) -> float:
    """A collective run beside ``window_seconds`` of compute: what outlasts the window."""
    if not overlapped:
        return communication_seconds
    return _with_sm_share(communication_seconds, max(0.0, communication_seconds - window_seconds), sm_fraction)


def check_options(options: PlanOptions, sequence_parallel: bool, tp: int, sharding: str,
                  overlap_grad_reduce: bool) -> None:
    """The planner flags that need others, refused as Megatron refuses them (one line each)."""
    if options.tp_comm_overlap and tp > 1 and not sequence_parallel:
        raise ValueError("--tp-comm-overlap overlaps sequence parallelism's all-gathers and reduce-scatters: "
                         "add --sequence-parallel")
    if options.overlap_param_gather and sharding == "no_shard":
        raise ValueError("--overlap-param-gather gathers sharded parameters: add --use-distributed-optimizer "
                         "or a --data-parallel-sharding-strategy")
    if options.overlap_param_gather and not overlap_grad_reduce:
        raise ValueError("--overlap-param-gather needs --overlap-grad-reduce (Megatron requires both)")
