"""The one fitted constant of a GPU preset: the share of its tensor-core rates kept through whole steps.

``python -m megalite.scaling.fit [PRESET ...] [--each]`` prints it (``--each``: how it moves with the runs
that set it -- each fit run left out in turn, each held-out run and source fitted alone).  A kernel
benchmark or a vendor's guide sets ``gemm_efficiency`` and ``attention_efficiency`` (hardware.py, each with
its public source); what such a figure does not see -- the clock a GPU holds at its power limit over hours
of training, the gaps between kernels, the small kernels the model does not list -- is
``sustained_fraction``.  No public measurement of those exists (docs/scaling.md, Validation), so it is
fitted, once per chip, to one source of published end-to-end runs on that chip:

    the fraction f at which the median, over the fit set, of predicted / published TFLOP/s per GPU is 1,

found by bisection (every ratio grows with f: only the tensor-core work is scaled by it).  The fit sets:

    a100-80gb (and a100-40gb, the same chip)   Narayanan et al. 2021, Table 1 (ten runs, Eq. 3 FLOPs)
    h100-sxm (and h200, the same chip)         Megatron-LM's H100 weak-scaling table (published.MEGATRON_README,
                                               nine runs)

Every other published run on the chip is held out of its fit and checks it: Korthikanti et al. 2022 and
OPT-175B on the A100; the README's strong scaling, Llama 3 405B and Mixtral 8x7B on the H100
(tests/scaling/test_validate.py, tests/scaling/test_published_runs.py).
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence

from megalite.scaling.compare import narayanan_predictions, ratio
from megalite.scaling.hardware import PRESETS, Hardware
from megalite.scaling.published import MEGATRON_README, PublishedRun, later_runs

__all__ = ["NARAYANAN_SOURCE", "FIT_SOURCES", "is_fit_run", "fit_ratios", "median_ratio_at", "fit_sustained_fraction",
           "fit_to",
           "sensitivity", "main"]

NARAYANAN_SOURCE = "Narayanan et al. 2021, Table 1"
# The source each chip's fraction is fitted to, by the preset it is fitted on.
FIT_SOURCES: Dict[str, str] = {"a100-80gb": NARAYANAN_SOURCE, "h100-sxm": MEGATRON_README}


def is_fit_run(run: PublishedRun) -> bool:
    """Whether a later run is in its preset's fit set (else it is held out)."""
    return FIT_SOURCES.get(run.gpu) == run.source


def fit_ratios(preset: str, hardware: Optional[Hardware] = None) -> List[float]:
    """Predicted / published TFLOP/s per GPU of ``preset``'s fit set, each in its source's FLOP count,
    planned on ``hardware`` (default the preset)."""
    hardware = hardware or PRESETS[preset]
    if FIT_SOURCES.get(preset) == NARAYANAN_SOURCE:
        return [c.prediction.hardware_tflops_per_gpu / row.tflops_per_gpu for row, c in narayanan_predictions(hardware)]
    if preset not in FIT_SOURCES:
        raise ValueError(f"{preset} has no fit set; fitted presets: {', '.join(FIT_SOURCES)}")
    return [ratio(run, hardware) for run in later_runs() if run.gpu == preset and is_fit_run(run)]


def _bisect(median_at: Callable[[float], float], tolerance: float) -> float:
    """The fraction in [0.3, 1] at which ``median_at`` (growing with it) is 1."""
    low, high = 0.3, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        if median_at(middle) > 1:
            high = middle
        else:
            low = middle
    return (low + high) / 2


def median_ratio_at(preset: str, fraction: float) -> float:
    """The fit set's median ratio with ``preset``'s fraction set to ``fraction``."""
    return statistics.median(fit_ratios(preset, dataclasses.replace(PRESETS[preset], sustained_fraction=fraction)))


def fit_sustained_fraction(preset: str = "h100-sxm", tolerance: float = 1e-3) -> float:
    """The fraction at which the fit set's median ratio is 1."""
    return _bisect(lambda f: median_ratio_at(preset, f), tolerance)


def fit_to(runs: Sequence[PublishedRun], preset: str, tolerance: float = 1e-3) -> float:
    """The fraction at which the median ratio of ``runs`` (later runs on ``preset``) would be 1."""
    return _bisect(lambda f: statistics.median(
        ratio(run, dataclasses.replace(PRESETS[preset], sustained_fraction=f)) for run in runs), tolerance)


def sensitivity(preset: str = "h100-sxm") -> None:
    """How much the fraction depends on which runs set it: each fit run left out in turn (the others' fit,
    and the left-out run's ratio at it), then each held-out run and each held-out source fitted alone."""
    runs = [run for run in later_runs() if run.gpu == preset]
    fitted = [run for run in runs if is_fit_run(run)]
    if not fitted:
        raise ValueError(f"{preset}'s fit set is not among the later runs; --each takes h100-sxm")
    print(f"{preset}, each fit run left out: the other runs' fraction, the left-out run's ratio at it")
    for run in fitted:
        fraction = fit_to([other for other in fitted if other is not run], preset)
        left_out = ratio(run, dataclasses.replace(PRESETS[preset], sustained_fraction=fraction))
        print(f"  {run.name}: {fraction:.3f}, {left_out:.3f}")
    held_out = [run for run in runs if not is_fit_run(run)]
    print("each held-out run alone, then each held-out source")
    for run in held_out:
        print(f"  {run.name}: {fit_to([run], preset):.3f}")
    for source in dict.fromkeys(run.source for run in held_out):
        group = [run for run in held_out if run.source == source]
        print(f"  {', '.join(run.name for run in group)}: {fit_to(group, preset):.3f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    each = "--each" in argv
    presets = [arg for arg in argv if arg != "--each"] or list(FIT_SOURCES)
    for preset in presets:
        if preset not in FIT_SOURCES:
            print(f"fit: {preset} has no fit set; choose from {', '.join(FIT_SOURCES)}", file=sys.stderr)
            return 2
        fraction = fit_sustained_fraction(preset)
        print(f"{preset}: sustained_fraction {fraction:.3f} (median ratio 1 over {len(fit_ratios(preset))} runs of "
              f"{FIT_SOURCES[preset].split(',')[0]})")
        if each:
            try:
                sensitivity(preset)
            except ValueError as error:
                print(f"fit: {error}", file=sys.stderr)
                return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
