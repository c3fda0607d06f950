"""The ``megalite-plan`` command: predict a run from the trainer's own flags before launching it.

    megalite-plan --world-size 3072 --gpu a100-80gb --num-layers 128 --hidden-size 25600 \\
        --num-attention-heads 160 --seq-length 2048 --max-position-embeddings 2048 --vocab-size 51200 \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 64 --global-batch-size 3072 \\
        --fp16 --recompute-granularity full --recompute-method uniform [--json]
    megalite-plan --search --world-size 64 --gpu h100-sxm <model flags>     # every layout, ranked
    megalite-plan --validate                                                # every published run, with ratios
    megalite-plan --calibrate cpu.json                                      # measure this machine

Every flag ``megalite-train`` takes means the same here (they are parsed by ``arguments.parse_args``);
the planner adds the machine (``--world-size``, ``--gpu``, ``--gpus-per-node``, ``--cluster``,
``--calibration``) and Megatron-LM's flags that change only time or memory (scaling/options.py:
``--tp-comm-overlap``, ``--overlap-param-gather``, ``--no-overlap-p2p-communication``,
``--account-for-embedding-in-pipeline-split``, ``--account-for-loss-in-pipeline-split``, ``--fp8-format``,
``--data-parallel-sharding-strategy``).  A micro-batch or virtual pipeline size left out is chosen (planner.py) and
reported.  Bad input is one line, ``megalite-plan: error: ...``, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

from megalite.scaling.hardware import PRESETS, load_hardware
from megalite.scaling.planner import describe, plan, search
from megalite.scaling.predict import Prediction

PROG = "megalite-plan"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, add_help=False, allow_abbrev=False,
                     description="Predict step time, throughput and memory of a megalite-train command line on a "
                                 "cluster; the trainer's flags are accepted unchanged.")
    parser.add_argument("--world-size", type=int, default=None, help="GPUs of the run (default $WORLD_SIZE or 1)")
    parser.add_argument("--gpu", default="a100-80gb", help=f"{', '.join(PRESETS)} or cpu (with --calibration)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="devices per node (default: the preset's, 8)")
    parser.add_argument("--cluster", metavar="FILE.yaml", help="override hardware fields (peak_tflops, hbm_gb, "
                        "hbm_gbs, intra_node / inter_node bandwidth_gbs and latency_us, ...)")
    parser.add_argument("--calibration", metavar="FILE.json", help="measured figures of a machine, for --gpu cpu")
    parser.add_argument("--calibrate", metavar="OUT.json", help="measure this machine and write the calibration file")
    parser.add_argument("--search", action="store_true", help="list every layout that fits, ranked, and why the "
                        "others do not")
    parser.add_argument("--validate", action="store_true", help="print every published run against its "
                        "prediction (scaling/published.py), with the ratios")
    parser.add_argument("--json", action="store_true", help="end with one JSON object on the last line")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def summary(prediction: Prediction) -> dict:
    """The JSON fields of a prediction (``--json``)."""
    return prediction.to_dict()


def format_prediction(prediction: Prediction, chosen: Sequence[str] = ()) -> str:
    p, layout = prediction, prediction.layout
    tag = {name: " (chosen)" if name in chosen else "" for name in
           ("micro_batch_size", "virtual_pipeline_model_parallel_size")}
    total = p.iteration_time_s
    lines = [
        f"{p.params / 1e9:.2f}B parameters on {layout['world_size']} x {p.hardware}: TP {layout['tp']}, "
        f"PP {layout['pp']}, CP {layout['cp']}, DP {layout['dp']}"
        f"{', EP %d' % layout['ep'] if layout.get('ep', 1) > 1 else ''}, {layout['dtype']}",
        f"  micro-batch size        {p.micro_batch_size}{tag['micro_batch_size']}, "
        f"{layout['num_microbatches']} micro-batches per step",
        f"  virtual pipeline size   {layout['vpp']}{tag['virtual_pipeline_model_parallel_size']}, "
        f"schedule {layout['schedule'] or 'none'}, recompute {layout['recompute'] or 'none'}"
        f"{', sequence parallel' if layout['sequence_parallel'] else ''}",
        f"  iteration time          {total:.3f} s",
        f"  model TFLOP/s per GPU   {p.tflops_per_gpu:.1f}  (MFU {100 * p.mfu:.1f}%; with recompute "
        f"{p.hardware_tflops_per_gpu:.1f})",
        f"  bubble fraction         {p.bubble_fraction:.3f}",
        f"  memory per GPU          {p.memory_gb_per_gpu:.1f} GiB on the most loaded stage "
        f"({'fits' if p.fits else 'DOES NOT FIT'}); activations {p.activation_bytes_per_layer / 2 ** 20:.1f} MiB "
        f"per layer and micro-batch",
        "  time breakdown          " + ", ".join(f"{name.replace('_', ' ')} {seconds:.3f} s "
                                                 f"({100 * seconds / total:.1f}%)"
                                                 for name, seconds in p.breakdown.items()
                                                 if seconds or name != "host_overhead"),
    ]
    return "\n".join(lines)


def _calibrate(path: str) -> int:
    try:
        from megalite.calibration.calibrate import calibrate
    except ImportError:
        raise ValueError("--calibrate needs megalite.calibration.calibrate, which this installation lacks") from None
    calibrate(path)
    print(f"wrote {path}")
    return 0


def _allocator_note(calibration: Optional[str]) -> None:
    """Under a CPU calibration's prediction: the allocator setting its figures hold for."""
    if calibration:
        from megalite.calibration.allocator import plan_note
        with open(calibration) as f:
            print(plan_note(json.load(f).get("malloc_mmap_threshold")))


def run(argv: List[str], prog: str) -> int:
    ours, rest = build_parser(prog).parse_known_args(argv)
    if ours.help:
        from megalite.training.arguments import build_parser as trainer_parser
        build_parser(prog).print_help()
        from megalite.scaling import options
        print("\n" + options.__doc__.split("\n\n")[2].rstrip() + "\n")
        print("and every megalite-train flag:\n")
        trainer_parser().print_help()
        return 0
    if ours.calibrate:
        return _calibrate(ours.calibrate)
    if ours.validate:
        from megalite.scaling.validate import main as validate
        return validate([])
    world = ours.world_size if ours.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise ValueError(f"--world-size {world} must be at least 1")
    hardware = load_hardware(ours.gpu, ours.gpus_per_node, ours.cluster, ours.calibration)
    if ours.search:
        candidates = search(rest, hardware, world)
        fitting = [c for c in candidates if not c.reason]
        print(f"{len(fitting)} of {len(candidates)} layouts fit on {world} x {hardware.name}, fastest first:")
        print(f"  {'layout':<62} {'TFLOP/s':>8} {'MFU':>6} {'iter s':>8} {'GiB':>6} {'bubble':>7}")
        for c in fitting:
            p = c.prediction
            print(f"  {describe(c):<62} {p.tflops_per_gpu:8.1f} {100 * p.mfu:5.1f}% {p.iteration_time_s:8.3f} "
                  f"{p.memory_gb_per_gpu:6.1f} {p.bubble_fraction:7.3f}")
        print("rejected:")
        for c in candidates[len(fitting):]:
            print(f"  {describe(c):<62} {c.reason}")
        _allocator_note(ours.calibration)
        if ours.json:
            print(json.dumps({"fits": [dict(summary(c.prediction), description=describe(c)) for c in fitting],
                              "rejected": [{"description": describe(c), "reason": c.reason}
                                           for c in candidates[len(fitting):]]}))
        return 0
    best = plan(rest, hardware, world)
    print(format_prediction(best.prediction, best.chosen))
    _allocator_note(ours.calibration)
    if ours.json:
        print(json.dumps(dict(summary(best.prediction), chosen=best.chosen)))
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv, prog)
    except ValueError as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else "invalid input"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
