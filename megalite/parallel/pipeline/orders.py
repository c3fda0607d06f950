"""The order of passes each pipeline rank runs, for every schedule: pure Python, no torch.

An order is, per pipeline rank, a list of :class:`Pass` — ``F`` (forward), ``B`` (backward; only
the input gradient when the schedule splits the backward) and ``W`` (weight gradient) — of one
(micro-batch, chunk).  The same orders drive the real run (``executor.py``) and the unit-cost
simulator (``simulator.py``), so the algebra tests test the order that trains.

Virtual stage ``chunk * p + rank`` is chunk ``chunk`` of rank ``rank`` (see ``stages.py``); a
micro-batch's forward visits virtual stages 0, 1, ..., p*v-1 and its backward the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, NamedTuple, Optional, Tuple, get_args

# The schedules, defined once: the config's --pipeline-schedule choices come from here.
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved", "zb-h1"]
SCHEDULES: Tuple[str, ...] = get_args(PipelineSchedule)


class Pass(NamedTuple):
    kind: str         # "F", "B" or "W"
    microbatch: int
    chunk: int = 0


@dataclass
class ScheduleOrder:
    name: str
    pp_size: int
    virtual_pp_size: int
    num_microbatches: int
    split_backward: bool          # True: B is the input gradient only and W passes exist
    per_rank: List[List[Pass]]


def gpipe(p: int, rank: int, m: int) -> List[Pass]:
    """All forwards, then all backwards (Huang et al. 2019): m micro-batches in flight."""
    return [Pass("F", i) for i in range(m)] + [Pass("B", i) for i in range(m)]


def one_f_one_b(p: int, rank: int, m: int) -> List[Pass]:
    """1F1B (PipeDream-flush; Narayanan et al. 2021): at most p - rank micro-batches in flight.

    Rank r fills the pipe with p - r - 1 forwards, then alternates one forward with one backward,
    then drains the backwards it still owes.
    """
    num_warmup = min(p - rank - 1, m)
    num_steady = m - num_warmup
    order = []
    for i in range(num_warmup):                       # warm-up
        order.append(Pass("F", i))
    for i in range(num_steady):                       # steady state: 1F1B
        order.append(Pass("F", num_warmup + i))
        order.append(Pass("B", i))
    for i in range(num_steady, m):                    # cool-down
        order.append(Pass("B", i))
    return order


def zb_h1(p: int, rank: int, m: int) -> List[Pass]:
    """ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", Sec. 3.1): 1F1B with the backward
    split into B (input gradient, on the critical path) and W (weight gradient, off it).

    Rank r runs 1F1B's warm-up, then F, B pairs, but defers its first r weight passes: each W
    runs after the B of r micro-batches later, so W fills the cool-down bubble that 1F1B leaves.
    A micro-batch's activations live from F to W, so rank r holds at most (p - r) + r = p of them:
    1F1B's peak.  The bubble shrinks from (p-1)(T_F+T_B+T_W) to (p-1)(T_F+T_B-T_W).
    """
    num_warmup = min(p - rank - 1, m)
    num_steady = m - num_warmup
    num_deferred = min(rank, m)
    order, next_w = [], 0

    def weight_pass_if_due(num_backwards_done):
        nonlocal next_w
        if num_backwards_done - next_w > num_deferred:
            order.append(Pass("W", next_w))
            next_w += 1

    for i in range(num_warmup):                       # warm-up
        order.append(Pass("F", i))
    for i in range(num_steady):                       # steady state: F, B, and the W now due
        order.append(Pass("F", num_warmup + i))
        order.append(Pass("B", i))
        weight_pass_if_due(i + 1)
    for i in range(num_steady, m):                    # cool-down: B, and the W now due
        order.append(Pass("B", i))
        weight_pass_if_due(i + 1)
    for i in range(next_w, m):                        # the deferred W passes fill the tail
        order.append(Pass("W", i))
    return order


def interleaved_table(p: int, v: int, m: int) -> List[Tuple[int, int]]:
    """The (micro-batch, chunk) sequence every rank runs forwards in, for interleaved 1F1B.

    Micro-batches go in groups of p: chunk 0 runs the group, then chunk 1 the same group, ...
    (Narayanan et al. 2021, Sec. 2.2).  Backwards run the same table with chunks reversed.
    Example p=2, v=2, m=4::

        (0,0) (1,0) (0,1) (1,1) (2,0) (3,0) (2,1) (3,1)
    """
    check_interleaved_microbatches(p, v, m)
    table = []
    for group_start in range(0, m, p):
        for chunk in range(v):
            for microbatch in range(group_start, group_start + p):
                table.append((microbatch, chunk))
    return table


def check_interleaved_microbatches(p: int, v: int, m: int) -> None:
    if m % p:
        lower, upper = max(p, m // p * p), (m // p + 1) * p
        raise ValueError(f"the interleaved schedule runs micro-batches in groups of the pipeline size "
                         f"{p}, so {m} micro-batches per step do not fit; use a multiple of {p} "
                         f"(e.g. {lower} or {upper}) via the global batch size, or a non-interleaved schedule")


def interleaved(p: int, rank: int, m: int, v: int) -> List[Pass]:
    """Interleaved 1F1B: warm-up, steady 1F1B and cool-down over the (micro-batch, chunk) table.

    Warm-up is (p - rank - 1) * 2 + (v - 1) * p forwards (Megatron-LM's count: enough for the
    first backward of the last chunk to come back), all forwards when m == p.
    """
    table = interleaved_table(p, v, m)
    forwards = [Pass("F", mb, chunk) for mb, chunk in table]
    backwards = [Pass("B", mb, v - 1 - chunk) for mb, chunk in table]
    total = m * v
    num_warmup = total if m == p else min((p - rank - 1) * 2 + (v - 1) * p, total)
    num_steady = total - num_warmup
    order = []
    for k in range(num_warmup):                       # warm-up
        order.append(forwards[k])
    for k in range(num_steady):                       # steady state: 1F1B
        order.append(forwards[num_warmup + k])
        order.append(backwards[k])
    for k in range(num_steady, total):                # cool-down
        order.append(backwards[k])
    return order


def forward_only(p: int, rank: int, m: int, v: int = 1) -> List[Pass]:
    """Evaluation: every forward, in the training order of chunks, nothing kept for backward."""
    if v == 1:
        return [Pass("F", i) for i in range(m)]
    return [Pass("F", mb, chunk) for mb, chunk in interleaved_table(p, v, m)]


def default_schedule(pp_size: int, virtual_pp_size: Optional[int] = None) -> Optional[str]:
    """None (no pipelining) for one stage, interleaved 1F1B with a virtual pipeline, else 1F1B."""
    if pp_size == 1:
        return None
    return "interleaved" if (virtual_pp_size or 1) > 1 else "1f1b"


def check_schedule(schedule: str, pp_size: int, virtual_pp_size: Optional[int] = None) -> None:
    """The one rule of which schedule runs which layout; raises ValueError saying what would run."""
    v = virtual_pp_size or 1
    if v > 1 and pp_size == 1:
        raise ValueError(f"a virtual pipeline of size {v} needs a pipeline size > 1")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if v > 1 and schedule != "interleaved":
        raise ValueError(f"the {schedule} schedule runs one chunk per rank but the virtual pipeline size is {v}; "
                         f"use the interleaved schedule or drop the virtual pipeline")
    if schedule == "interleaved" and v == 1:
        raise ValueError("the interleaved schedule needs a virtual pipeline size > 1")


def build_order(schedule: str, p: int, m: int, v: Optional[int] = None, forward_only_: bool = False) -> ScheduleOrder:
    """Every rank's order for ``schedule`` in gpipe, 1f1b, interleaved, zb-h1."""
    v = v or 1
    if m < 1:
        raise ValueError(f"num_microbatches must be at least 1, got {m}")
    check_schedule(schedule, p, v)
    if forward_only_:
        return ScheduleOrder(schedule, p, v, m, False, [forward_only(p, r, m, v) for r in range(p)])
    builders = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zb_h1,
                "interleaved": lambda p, r, m: interleaved(p, r, m, v)}
    per_rank = [builders[schedule](p, r, m) for r in range(p)]
    return ScheduleOrder(schedule, p, v, m, schedule == "zb-h1", per_rank)
