"""Each published run planned on its preset, and the prediction in that run's own FLOP count.

Published throughputs are FLOPs over time, and sources count FLOPs differently; a prediction is compared
with a figure only in that figure's count (docs/scaling.md, "The FLOP conventions, source by source").
validate.py prints these comparisons; fit.py fits a preset's one fitted constant to some of them.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from megalite.model.flops import flops_per_iteration, palm_flops_per_iteration
from megalite.scaling.hardware import PRESETS, Hardware
from megalite.scaling.planner import Candidate, model_of, plan, with_flags
from megalite.scaling.published import (
    KORTHIKANTI_TABLE_3,
    NARAYANAN_TABLE_1,
    PAPER_PLANNER_FLAGS,
    KorthikantiRow,
    NarayananRow,
    PublishedRun,
    korthikanti_flags,
    later_runs,
    narayanan_flags,
)

__all__ = ["narayanan_predictions", "korthikanti_predictions", "later_predictions", "ratio", "predicted_tflops"]


def narayanan_predictions(hardware: Optional[Hardware] = None) -> List[Tuple[NarayananRow, Candidate]]:
    """Narayanan et al. 2021, Table 1, each row as the paper ran it (compared on Eq. 3's hardware FLOPs)."""
    hardware = hardware or PRESETS["a100-80gb"]
    return [(row, plan(narayanan_flags(row) + PAPER_PLANNER_FLAGS, hardware, row.gpus)) for row in NARAYANAN_TABLE_1]


def korthikanti_predictions(hardware: Optional[Hardware] = None) -> List[Tuple[KorthikantiRow, Candidate]]:
    hardware = hardware or PRESETS["a100-80gb"]
    return [(row, plan(korthikanti_flags(row) + PAPER_PLANNER_FLAGS, hardware, row.gpus))
            for row in KORTHIKANTI_TABLE_3]


def later_predictions() -> List[Tuple[PublishedRun, Candidate]]:
    """Each later run (published.later_runs) planned as published on its preset."""
    return [(run, plan(list(run.flags), PRESETS[run.gpu], run.gpus)) for run in later_runs()]


def ratio(run: PublishedRun, hardware: Optional[Hardware] = None) -> float:
    """Predicted / published TFLOP/s per GPU of a later run, in its own count, planned on ``hardware``
    (default its preset)."""
    candidate = plan(list(run.flags), hardware or PRESETS[run.gpu], run.gpus)
    return predicted_tflops(run, candidate) / run.tflops_per_gpu


def predicted_tflops(run: PublishedRun, candidate: Candidate) -> float:
    """The prediction in the run's own FLOP convention: Megatron-LM's count (the prediction's model
    TFLOP/s), Narayanan's Eq. 3 (its hardware TFLOP/s), or PaLM's ``6N + 12LHQT`` (the model TFLOP/s
    rescaled by the two counts' ratio, both linear in the batch)."""
    p = candidate.prediction
    if run.convention == "eq3":
        return p.hardware_tflops_per_gpu
    if run.convention == "palm":
        model, tp = model_of(with_flags(list(run.flags), candidate.flags), run.gpus), p.layout["tp"]
        return p.tflops_per_gpu * palm_flops_per_iteration(model, 1, tp=tp) / flops_per_iteration(model, 1, tp=tp)
    return p.tflops_per_gpu
