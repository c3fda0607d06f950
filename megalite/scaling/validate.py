"""The performance model against published runs: ``python -m megalite.scaling.validate``.

Narayanan et al. 2021, Table 1 (published.py): each row's flags as the paper ran it -- fp16, full
recompute, the interleaved schedule where there is a pipeline -- on the ``a100-80gb`` preset, with the
micro-batch and virtual pipeline sizes (which the table does not give) chosen by the planner.  The
compared figure is the hardware TFLOP/s per GPU, FLOPs counted as the paper's Eq. 3 does (recompute
included).  Korthikanti et al. 2022, Table 3: the four configurations with sequence parallelism and
selective recompute, model FLOPs utilization.  The later runs (published.later_runs: Megatron-LM's
H100 scaling, Llama 3 405B, OPT-175B), each as published on its preset, compared in its source's FLOP
convention.  Each chip's one fitted constant (``sustained_fraction``, fit.py) is fitted to one of these
sources -- the A100's to Narayanan's table, the H100's to Megatron-LM's README table -- and the tables say
which rows are in-sample.  Prints Markdown tables (docs/scaling.md pastes them).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from megalite.scaling.compare import korthikanti_predictions, later_predictions, narayanan_predictions, predicted_tflops
from megalite.scaling.fit import is_fit_run
from megalite.scaling.hardware import PRESETS

__all__ = ["narayanan_predictions", "korthikanti_predictions", "later_predictions", "main"]


def _print_later() -> None:
    print("\nLater runs, each as published (TFLOP/s per GPU in the source's convention; set 'fit': the runs "
          "the preset's sustained_fraction is fitted to, scaling/fit.py)\n")
    print("| run | preset | GPUs | published | predicted | ratio | mbs | vpp | GiB/GPU | fits | set |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run, candidate in later_predictions():
        p, predicted = candidate.prediction, predicted_tflops(run, candidate)
        role = "fit" if is_fit_run(run) else "held out"
        print(f"| {run.name} | {run.gpu} | {run.gpus} | {run.tflops_per_gpu:.1f} | {predicted:.1f} | "
              f"{predicted / run.tflops_per_gpu:.3f} | {p.micro_batch_size} | {p.layout['vpp']} | "
              f"{p.memory_gb_per_gpu:.1f} | {'yes' if p.fits else 'NO'} | {role} |")


def main(argv: Optional[Sequence[str]] = None) -> int:
    hardware = PRESETS["a100-80gb"]
    print(f"Narayanan et al. 2021, Table 1, on the {hardware.name} preset (TFLOP/s per GPU, Eq. 3 FLOPs; the A100's "
          f"fit set: its median sets sustained_fraction, scaling/fit.py)\n")
    print("| params | GPUs | TP | PP | batch | paper | predicted | ratio | mbs | vpp | bubble | GiB/GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row, candidate in narayanan_predictions(hardware):
        p = candidate.prediction
        print(f"| {row.params_billion}B | {row.gpus} | {row.tp} | {row.pp} | {row.batch} | {row.tflops_per_gpu:g} | "
              f"{p.hardware_tflops_per_gpu:.1f} | {p.hardware_tflops_per_gpu / row.tflops_per_gpu:.3f} | "
              f"{p.micro_batch_size} | {p.layout['vpp']} | {p.bubble_fraction:.3f} | {p.memory_gb_per_gpu:.1f} |")
    print(f"\nKorthikanti et al. 2022, Table 3 (sequence parallel + selective recompute), on {hardware.name}\n")
    print("| model | GPUs | TP | PP | batch | mbs | paper MFU | predicted MFU | paper HFU | predicted HFU | vpp "
          "| GiB/GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row, candidate in korthikanti_predictions(hardware):
        p = candidate.prediction
        hfu = p.hardware_tflops_per_gpu / hardware.peak("float16")
        print(f"| {row.name} | {row.gpus} | {row.tp} | {row.pp} | {row.batch} | {row.micro_batch} | "
              f"{row.mfu_percent:g}% | {100 * p.mfu:.1f}% | {row.hfu_percent:g}% | {100 * hfu:.1f}% | "
              f"{p.layout['vpp']} | {p.memory_gb_per_gpu:.1f} |")
    _print_later()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
