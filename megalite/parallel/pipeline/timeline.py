"""What each pipeline stage ran, and when: recording, gathering, bubble fraction and a Gantt chart.

Every rank records one :class:`Span` per pass it runs (``F`` forward, ``B`` backward -- the input
gradient only when the schedule splits the backward -- and ``W`` weight gradient), with the
micro-batch, the model chunk and wall-clock start/end.  :func:`gather_spans` brings them to rank 0 of
the pipeline group; :func:`draw_timeline` draws them like the figures of the pipeline papers
(stages as rows, time to the right, a colour per pass, the micro-batch number on each box).  The
unit-cost simulator (``simulator.py``) emits the same spans, so a real run and the algebra of its
schedule can be drawn and compared the same way.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megalite.parallel.state import ProcessGrid


@dataclass(frozen=True)
class Span:
    pp_rank: int        # pipeline rank (row of the chart)
    kind: str           # "F", "B" or "W"
    microbatch: int
    chunk: int          # virtual chunk (0 without a virtual pipeline)
    start: float
    end: float


class Timeline:
    """Records this rank's passes; pass it to a schedule as ``timeline=``."""

    def __init__(self, pp_rank: int = 0, clock=time.perf_counter):
        self.pp_rank = pp_rank
        self.clock = clock
        self.spans: List[Span] = []

    @contextlib.contextmanager
    def span(self, kind: str, microbatch: int, chunk: int = 0):
        start = self.clock()
        yield
        self.spans.append(Span(self.pp_rank, kind, microbatch, chunk, start, self.clock()))

    def clear(self) -> None:
        self.spans.clear()


def record(timeline: Optional[Timeline], kind: str, microbatch: int, chunk: int = 0):
    """``timeline.span(...)``, or nothing when no timeline is kept."""
    return timeline.span(kind, microbatch, chunk) if timeline is not None else contextlib.nullcontext()


def gather_spans(timeline: Timeline, grid: ProcessGrid) -> Optional[List[Span]]:
    """All stages' spans on pipeline rank 0 (None elsewhere), times relative to the earliest start.

    Collective over the pipeline group.  Clocks of different processes on one machine share
    ``perf_counter``'s epoch; across machines the offsets are unknown, so draw per-machine runs only.
    """
    gathered: List[Optional[List[Span]]] = [None] * grid.pp_size
    dist.all_gather_object(gathered, timeline.spans, group=grid.pp_group)
    if grid.pp_rank != 0:
        return None
    spans = [s for stage_spans in gathered for s in stage_spans]
    t0 = min((s.start for s in spans), default=0.0)
    return [Span(s.pp_rank, s.kind, s.microbatch, s.chunk, s.start - t0, s.end - t0) for s in spans]


def bubble_fraction(spans: Sequence[Span]) -> float:
    """Idle time over busy time, averaged over stages: (p-1)/m for 1F1B with equal stages.

    Per stage, idle = makespan - busy, where the makespan runs from the first start to the last end
    of the whole pipeline: the ratio the pipeline papers call the bubble fraction.
    """
    if not spans:
        return 0.0
    makespan = max(s.end for s in spans) - min(s.start for s in spans)
    busy: Dict[int, float] = {}
    for s in spans:
        busy[s.pp_rank] = busy.get(s.pp_rank, 0.0) + (s.end - s.start)
    return sum((makespan - b) / b for b in busy.values()) / len(busy)


COLOURS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868"}


def draw_timeline(spans: Sequence[Span], path: str, title: str = "") -> str:
    """Draw the spans as a Gantt chart PNG at ``path`` (matplotlib, Agg); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    stages = sorted({s.pp_rank for s in spans})
    makespan = max(s.end for s in spans) if spans else 1.0
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, len(spans) / len(stages) * 0.45)), 0.6 * len(stages) + 1.4))
    for s in spans:
        shade = 1.0 - 0.35 * s.chunk  # later virtual chunks drawn lighter
        ax.barh(s.pp_rank, s.end - s.start, left=s.start, height=0.8, color=COLOURS[s.kind],
                alpha=max(0.35, shade), edgecolor="black", linewidth=0.4)
        label = str(s.microbatch) if s.chunk == 0 else f"{s.microbatch}.{s.chunk}"
        ax.text(s.start + (s.end - s.start) / 2, s.pp_rank, label, ha="center", va="center", fontsize=7)
    ax.set_yticks(stages)
    ax.set_yticklabels([f"stage {p}" for p in stages])
    ax.invert_yaxis()
    ax.set_xlim(0, makespan)
    ax.set_xlabel("time (s)" if makespan > 0 and not float(makespan).is_integer() else "time (unit passes)")
    kinds = sorted({s.kind for s in spans}, key="FBW".index)
    names = {"F": "forward", "B": "backward" if "W" not in kinds else "backward (input grad)", "W": "weight grad"}
    # Outside the axes: inside, it hides the last passes of stage 0.
    ax.legend(handles=[Patch(color=COLOURS[k], label=names[k]) for k in kinds], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(f"{title}  bubble {bubble_fraction(spans):.3f}" if title else f"bubble {bubble_fraction(spans):.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_step_timeline(timeline: Timeline, grid: ProcessGrid, path: str, title: str,
                       device: torch.device) -> float:
    """Gather one step's spans over the pipeline, draw them to ``path`` (global rank 0) and return
    the bubble fraction, known on every rank of the pipeline.  Collective over the pipeline group."""
    spans = gather_spans(timeline, grid) if grid.pp_size > 1 else list(timeline.spans)
    bubble = torch.tensor([bubble_fraction(spans) if spans is not None else 0.0], dtype=torch.float64, device=device)
    if grid.pp_size > 1:  # pipeline rank 0 has the number; make it known to the whole pipeline
        dist.broadcast(bubble, src=grid.ranks["pp"][0], group=grid.pp_group)
    if grid.rank == 0:
        draw_timeline(spans, path, title=title)
    return float(bubble)
