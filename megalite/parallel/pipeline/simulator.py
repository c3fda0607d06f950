"""Run a schedule's order with unit costs, without a model: when each pass starts and ends.

Dependencies between passes (virtual stage s = chunk * p + rank, S = p * v stages):

- ``F(mb)`` at stage s waits for ``F(mb)`` at stage s - 1 (its input activation);
- ``B(mb)`` at stage s waits for ``B(mb)`` at stage s + 1 (its output gradient) -- the last
  stage's backward starts from its own loss;
- ``W(mb)`` runs after ``B(mb)`` of the same stage (it uses the gradient B computed);
- each rank runs its passes one at a time, in its order.  Messages take no time.

A chunk costs 1/v of a stage: ``t_f / v`` forward, ``t_b / v`` input gradient, ``t_w / v`` weight
gradient (a backward that is not split costs ``(t_b + t_w) / v``).  The result is a list of
:class:`~megalite.parallel.pipeline.timeline.Span`, the same record a real run makes, and the
messages each pass sends, which the executor uses to pair sends with receives.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Tuple

from .orders import Pass, ScheduleOrder
from .timeline import Span


class Message(NamedTuple):
    """A tensor from one rank to another, ready when its producing pass ends at ``time``."""
    time: float
    kind: str          # "activation" (forward output) or "grad" (input gradient)
    microbatch: int
    virtual_stage: int  # virtual stage that consumes it
    src: int
    dst: int


def stage_of(order: ScheduleOrder, rank: int, chunk: int) -> int:
    return chunk * order.pp_size + rank


def simulate(order: ScheduleOrder, t_f: float = 1.0, t_b: float = 1.0, t_w: float = 1.0) -> List[Span]:
    """Start and end of every pass, each as early as its dependencies and its rank allow.

    Raises RuntimeError if the order deadlocks (a rank waits for a pass that waits for it).
    """
    p, v = order.pp_size, order.virtual_pp_size
    cost = {"F": t_f / v, "B": (t_b if order.split_backward else t_b + t_w) / v, "W": t_w / v}
    last_stage = p * v - 1
    end: Dict[Tuple[str, int, int], float] = {}   # (kind, micro-batch, stage) -> end time
    position = [0] * p
    rank_free = [0.0] * p
    spans: List[Span] = []
    while any(position[r] < len(order.per_rank[r]) for r in range(p)):
        progressed = False
        for rank in range(p):
            while position[rank] < len(order.per_rank[rank]):
                step: Pass = order.per_rank[rank][position[rank]]
                stage = stage_of(order, rank, step.chunk)
                needs = [dependency(step, stage, last_stage)]
                if step.kind != "F":
                    needs.append(("F", step.microbatch, stage))
                if any(n is not None and n not in end for n in needs):
                    break
                start = max([rank_free[rank]] + [end[n] for n in needs if n is not None])
                finish = start + cost[step.kind]
                end[(step.kind, step.microbatch, stage)] = finish
                rank_free[rank] = finish
                spans.append(Span(rank, step.kind, step.microbatch, step.chunk, start, finish))
                position[rank] += 1
                progressed = True
        if not progressed:
            waiting = {r: order.per_rank[r][position[r]] for r in range(p) if position[r] < len(order.per_rank[r])}
            raise RuntimeError(f"schedule {order.name} deadlocks: ranks wait on {waiting}")
    return spans


def dependency(step: Pass, stage: int, last_stage: int):
    """The pass on another stage that ``step`` waits for, or None."""
    if step.kind == "F":
        return ("F", step.microbatch, stage - 1) if stage > 0 else None
    if step.kind == "B":
        return ("B", step.microbatch, stage + 1) if stage < last_stage else None
    return ("B", step.microbatch, stage)   # W waits for its own B


def messages(order: ScheduleOrder, spans: List[Span]) -> List[Message]:
    """Every point-to-point message of the schedule: forward outputs go to the next virtual stage,
    input gradients to the previous one, sent when the producing pass ends."""
    p, last_stage = order.pp_size, order.pp_size * order.virtual_pp_size - 1
    out = []
    for s in spans:
        stage = s.chunk * p + s.pp_rank
        if s.kind == "F" and stage < last_stage:
            out.append(Message(s.end, "activation", s.microbatch, stage + 1, s.pp_rank, (stage + 1) % p))
        elif s.kind == "B" and stage > 0:
            out.append(Message(s.end, "grad", s.microbatch, stage - 1, s.pp_rank, (stage - 1) % p))
    return sorted(out)


def peak_in_flight(order: ScheduleOrder) -> List[int]:
    """Per rank, the most (micro-batch, chunk) activations held at once: from F until the pass
    that frees them (B, or W when the backward is split)."""
    frees = "W" if order.split_backward else "B"
    peaks = []
    for passes in order.per_rank:
        live = peak = 0
        for step in passes:
            live += (step.kind == "F") - (step.kind == frees)
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


def bubble_time(spans: List[Span]) -> Dict[int, float]:
    """Per rank, idle time within the makespan."""
    makespan = max(s.end for s in spans) - min(s.start for s in spans)
    busy: Dict[int, float] = {}
    for s in spans:
        busy[s.pp_rank] = busy.get(s.pp_rank, 0.0) + s.end - s.start
    return {rank: makespan - b for rank, b in busy.items()}
