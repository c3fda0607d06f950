"""The pipeline's time for one step: the schedule's order run by the simulator with modelled pass times.

The pass times of a stage (all its chunks; the simulator gives a chunk ``1/v`` of each) are

    t_f = forward compute + forward communication          (TP collectives, the stage's p2p receives)
    t_b = input-gradient compute + its communication       (+ the recomputed forward)
    t_w = weight-gradient compute                          (its own pass only in ZB-H1)

and the makespan is the simulated span from the first forward to the last backward
(``simulator.simulate`` on ``orders.build_order``).  With unit costs it reproduces the closed forms:
bubble fraction ``(p-1)/m`` for 1F1B (Narayanan et al. 2021, Sec. 2.2.1) and ``(p-1)/(v m)`` for the
interleaved schedule (Sec. 2.2.2), i.e. a makespan of ``(m + p - 1)(t_f + t_b)`` for 1F1B.
Without pipelining (``p = 1``) the step is ``m`` forward-backward passes in a row.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

from megalite.parallel.pipeline.orders import build_order
from megalite.parallel.pipeline.simulator import peak_in_flight, simulate
from megalite.parallel.pipeline.timeline import bubble_fraction

__all__ = ["PipelineTime", "pipeline_time"]


@dataclass(frozen=True)
class PipelineTime:
    schedule: Optional[str]
    makespan: float                 # seconds from the first forward to the last backward
    bubble_fraction: float          # idle over busy, averaged over stages (timeline.bubble_fraction)
    in_flight: Tuple[int, ...]      # per pipeline rank: (micro-batch, chunk) activations held at the peak


@lru_cache(maxsize=1024)
def pipeline_time(schedule: Optional[str], p: int, v: int, m: int, t_f: float, t_b: float,
                  t_w: float) -> PipelineTime:
    """Simulate ``schedule`` on ``p`` stages of ``v`` chunks with ``m`` micro-batches and these stage times."""
    if p == 1 or schedule is None:
        return PipelineTime(None, m * (t_f + t_b + t_w), 0.0, (1,))
    order = build_order(schedule, p, m, v)
    spans = simulate(order, t_f, t_b, t_w)
    makespan = max(s.end for s in spans) - min(s.start for s in spans)
    return PipelineTime(schedule, makespan, bubble_fraction(spans), tuple(peak_in_flight(order)))
