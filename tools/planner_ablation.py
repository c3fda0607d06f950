"""What moved each later published run's ratio: the model with one of its effects turned back.

    python -m tools.planner_ablation            # a Markdown table, docs/scaling.md "The later runs, row by row"

Each column re-plans every run of published.later_runs with one change and prints predicted / published
TFLOP/s per GPU in the run's own FLOP count (``refused``: no micro-batch and virtual size fits then, or
the run's own sizes do not):

    sustained 1         the preset's fitted ``sustained_fraction`` set to 1 (kernel-benchmark rates alone)
    unfused attention   ``--attention-backend unfused``: the scores computed and kept (the papers' path)
    overlaps off        without ``--tp-comm-overlap`` and ``--overlap-param-gather``, and pipeline messages
                        blocking (``--no-overlap-p2p-communication``)
    no SM share         an overlapped collective takes no SMs from the compute beside it
    CP ring             ``--cp-comm-type p2p`` (runs with context parallelism only)
    cuDNN attention     the device's default fused attention kernel for FlashAttention-2 (runs that name
                        ``--attention-backend flash`` only)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

from megalite.scaling.compare import predicted_tflops
from megalite.scaling.hardware import PRESETS, Hardware
from megalite.scaling.planner import plan
from megalite.scaling.published import PublishedRun, later_runs

OVERLAPS = ("--tp-comm-overlap", "--overlap-param-gather")


def _without_overlaps(flags: List[str]) -> List[str]:
    return [flag for flag in flags if flag not in OVERLAPS] + ["--no-overlap-p2p-communication"]


def _cp_ring(flags: List[str]) -> Optional[List[str]]:
    if "--cp-comm-type" not in flags:
        return None
    index = flags.index("--cp-comm-type")
    return flags[:index] + flags[index + 2:]


def _default_kernel(flags: List[str]) -> Optional[List[str]]:
    backends = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == "--attention-backend"]
    if backends[-1:] != ["flash"]:
        return None
    return flags + ["--attention-backend", "auto"]


Change = Tuple[str, Callable[[List[str]], Optional[List[str]]], Callable[[Hardware], Hardware]]
CHANGES: List[Change] = [
    ("sustained 1", lambda flags: flags, lambda hw: dataclasses.replace(hw, sustained_fraction=1.0)),
    ("unfused attention", lambda flags: flags + ["--attention-backend", "unfused"], lambda hw: hw),
    ("overlaps off", _without_overlaps, lambda hw: hw),
    ("no SM share", lambda flags: flags, lambda hw: dataclasses.replace(hw, overlap_sm_fraction=0.0)),
    ("CP ring", _cp_ring, lambda hw: hw),
    ("cuDNN attention", _default_kernel, lambda hw: hw),
]


def ratio(run: PublishedRun, flags: Optional[List[str]], hardware: Hardware) -> str:
    if flags is None:
        return "-"
    try:
        candidate = plan(flags, hardware, run.gpus)
    except ValueError:
        return "refused"
    if not candidate.prediction.fits:
        return "refused"
    return f"{predicted_tflops(run, candidate) / run.tflops_per_gpu:.2f}"


def row(run: PublishedRun) -> List[str]:
    """The run's ratio as modelled, then with each change of CHANGES."""
    hardware, flags = PRESETS[run.gpu], list(run.flags)
    return [ratio(run, flags, hardware)] + [ratio(run, change(flags), alter(hardware))
                                            for _name, change, alter in CHANGES]


def main() -> int:
    print("| run | model | " + " | ".join(name for name, _flags, _hw in CHANGES) + " |")
    print("|---|---|" + "---|" * len(CHANGES))
    for run in later_runs():
        print(f"| {run.name} | " + " | ".join(row(run)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
