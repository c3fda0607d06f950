"""The pipeline bubble of every schedule: measured on gloo CPU ranks, against its formula and the simulator.

    python -m benchmarks.pipeline_bubble                       # PP=2, m = 2, 4, 8, every schedule
    python -m benchmarks.pipeline_bubble --pp 4 --microbatches 4 8 --steps 3

Each row trains a GPTModel (fp32, dropout off; tools/draw_pipeline.py's real run: the training
loop's schedule, finalize_model_grads and AdamW) on ``--pp`` forked gloo ranks, for 2 warm-up steps
and ``--steps`` measured ones, and reports the median over the measured steps of the bubble
fraction (idle over busy time, averaged over stages; pipeline/timeline.py).  Columns:

- formula: (p-1)/m for GPipe and 1F1B, (p-1)/(v*m) for interleaved 1F1B, and for ZB-H1
  (p-1)(T_F+T_B-T_W)/(m(T_F+T_B+T_W)) (Qi et al. 2023) at the measured mean pass times;
- sim unit: the unit-cost simulator (simulator.py: F = B = W = 1 per stage);
- sim measured: the simulator with this run's mean F, B and W times, so the difference from the
  measured column is what the simulator leaves out (stages of unequal cost -- the first holds the
  embedding, the last the output layer and loss --, message latency, ranks sharing cores).

Ranks share this machine's cores (and, on a shared machine, with other work), so a pass slows
while other ranks are busy: medians over steps, and the spread (min-max) beside them.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
from typing import Dict, List, Sequence

import torch

from megalite.parallel.pipeline.orders import SCHEDULES, build_order
from megalite.parallel.pipeline.simulator import simulate
from megalite.parallel.pipeline.timeline import Span, bubble_fraction
from megalite.parallel.testing import run_on_ranks
from tools.draw_pipeline import model_config, real_run


def formula(schedule: str, p: int, m: int, v: int, times: Dict[str, float]) -> float:
    """The bubble fraction the schedule's algebra predicts."""
    if schedule == "interleaved":
        return (p - 1) / (v * m)
    if schedule == "zb-h1":
        t_f, t_b, t_w = (times[k] for k in "FBW")
        return (p - 1) * (t_f + t_b - t_w) / (m * (t_f + t_b + t_w))
    return (p - 1) / m


def mean_pass_times(spans: Sequence[Span]) -> Dict[str, float]:
    """{"F" | "B" | "W": mean duration of that kind of pass}, over every stage and chunk."""
    durations: Dict[str, List[float]] = {}
    for s in spans:
        durations.setdefault(s.kind, []).append(s.end - s.start)
    return {kind: statistics.mean(d) for kind, d in durations.items()}


def simulated_bubble(schedule: str, p: int, m: int, v: int, times: Dict[str, float] = None) -> float:
    """The simulator's bubble with unit costs, or with the mean per-chunk pass times ``times``
    (the simulator takes per-stage costs and charges a chunk 1/v of them)."""
    order = build_order(schedule, p, m, v)
    if times is None:
        return bubble_fraction(simulate(order))
    if order.split_backward:
        return bubble_fraction(simulate(order, times["F"] * v, times["B"] * v, times["W"] * v))
    return bubble_fraction(simulate(order, times["F"] * v, times["B"] * v, 0.0))


def measure(schedule: str, p: int, m: int, v: int, steps: int, config) -> dict:
    """One row: the real run's bubble per measured step, its pass times, the formula and simulator."""
    per_step = run_on_ranks(real_run, p, schedule, m, v, config, steps, timeout=600)[0]
    bubbles = [bubble_fraction(spans) for spans in per_step]
    times = mean_pass_times([s for spans in per_step for s in spans])
    return {"schedule": schedule, "p": p, "v": v, "m": m, "measured": statistics.median(bubbles),
            "min": min(bubbles), "max": max(bubbles), "formula": formula(schedule, p, m, v, times),
            "sim_unit": simulated_bubble(schedule, p, m, v),
            "sim_measured": simulated_bubble(schedule, p, m, v, times),
            "pass_ms": {k: 1e3 * t for k, t in times.items()}}


def print_table(rows: Sequence[dict]) -> None:
    print(f"{'schedule':12s} {'p':>2s} {'v':>2s} {'m':>3s}  {'measured':>8s} {'(min-max)':>13s}  {'formula':>7s}  "
          f"{'sim unit':>8s}  {'sim measured':>12s}  pass ms F/B/W")
    for r in rows:
        passes = "/".join(f"{r['pass_ms'][k]:.1f}" for k in "FBW" if k in r["pass_ms"])
        print(f"{r['schedule']:12s} {r['p']:2d} {r['v']:2d} {r['m']:3d}  {r['measured']:8.3f} "
              f"({r['min']:.3f}-{r['max']:.3f})  {r['formula']:7.3f}  {r['sim_unit']:8.3f}  {r['sim_measured']:12.3f}  "
              f"{passes}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--virtual", type=int, default=2, help="virtual size of the interleaved schedule")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per row (after 2 warm-up steps)")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    args = parser.parse_args(argv)
    if args.pp < 2:
        parser.error(f"--pp {args.pp}: a pipeline bubble needs at least 2 stages")
    config = model_config(args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length)
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, "
          f"{args.pp} gloo ranks; GPTModel {args.num_layers} layers, hidden {args.hidden_size}, "
          f"seq {args.seq_length}, micro-batch 2, fp32")
    rows = []
    for schedule in args.schedules:
        v = args.virtual if schedule == "interleaved" else 1
        for m in args.microbatches:
            build_order(schedule, args.pp, m, v)   # a bad layout is refused here, before forking
            rows.append(measure(schedule, args.pp, m, v, args.steps, config))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
