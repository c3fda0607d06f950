"""Draw a pipeline schedule's timeline: a real CPU run of GPTModel on forked gloo ranks, or the simulator.

    python tools/draw_pipeline.py --pp 4 --schedule 1f1b --microbatches 8 --num-layers 16 --hidden-size 512 \\
        --seq-length 64 --out docs/images/pipeline_timeline.png
    python tools/draw_pipeline.py --pp 4 --schedule zb-h1 --microbatches 8 --simulate --out /tmp/zb.png
    python tools/draw_pipeline.py --pp 4 --all --microbatches 8 --out /tmp/timeline.png   # every schedule

Prints the measured bubble fraction next to the schedule's formula: (p-1)/m for GPipe and 1F1B,
(p-1)/(v*m) for interleaved 1F1B, and for ZB-H1 (p-1)(T_F+T_B-T_W) / (m(T_F+T_B+T_W)), evaluated
with the mean pass times this run measured.  The real run trains a GPTModel (dropout off, fp32) with
the training loop's step (schedule, finalize_model_grads, AdamW) for a few steps and draws the last:
the first steps warm up allocators and gloo connections.  Its ranks share this machine's cores: with
fewer cores than --pp, pass times depend on how many ranks are busy at once, and so does the bubble.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Optional, Sequence

from megalite.parallel.pipeline.orders import (
    SCHEDULES,
    build_order,
)
from megalite.parallel.pipeline.simulator import simulate
from megalite.parallel.pipeline.stages import virtual_stage_layer_counts
from megalite.parallel.pipeline.timeline import Span, bubble_fraction, draw_timeline

WARMUP_STEPS = 2
MICRO_BATCH = 2


def mean_pass_times(spans: Sequence[Span]) -> Dict[str, float]:
    """{"F" | "B" | "W": mean duration of that kind of pass}."""
    totals: Dict[str, list] = {}
    for s in spans:
        totals.setdefault(s.kind, []).append(s.end - s.start)
    return {kind: sum(times) / len(times) for kind, times in totals.items()}


def formula(schedule: str, p: int, m: int, v: int, spans: Optional[Sequence[Span]] = None) -> str:
    """The bubble fraction the schedule's algebra predicts, as text."""
    if schedule == "interleaved":
        return f"(p-1)/(v*m) = {(p - 1) / (v * m):.3f}"
    if schedule == "zb-h1":
        times = mean_pass_times(spans or [])
        t_f, t_b, t_w = (times.get(k, 1.0) for k in "FBW")
        where = f"T_F,T_B,T_W = {t_f * 1e3:.1f},{t_b * 1e3:.1f},{t_w * 1e3:.1f} ms" if spans else "T_F=T_B=T_W"
        return f"(p-1)(T_F+T_B-T_W)/(m(T_F+T_B+T_W)) = {(p - 1) * (t_f + t_b - t_w) / (m * (t_f + t_b + t_w)):.3f} " \
               f"at {where}"
    return f"(p-1)/m = {(p - 1) / m:.3f}"


def model_config(layers: int, hidden: int, heads: int, seq: int):
    from megalite.config.settings import ModelConfig
    return ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, seq_length=seq,
                       vocab_size=256, hidden_dropout=0.0, attention_dropout=0.0)


def real_run(rank, world_size, schedule, m, v, config, measured_steps=1):
    """Train WARMUP_STEPS + ``measured_steps`` steps on pipeline rank ``rank``; on rank 0, the spans of
    every stage for each measured step (a list of ``measured_steps`` span lists)."""
    import torch

    from megalite.config.settings import OptimizerConfig
    from megalite.model.build import build_model_chunks
    from megalite.model.loss import language_model_loss
    from megalite.optim import build_optimizer
    from megalite.parallel.grads import finalize_model_grads
    from megalite.parallel.pipeline.schedules import get_forward_backward_func
    from megalite.parallel.pipeline.timeline import Timeline, gather_spans
    from megalite.parallel.state import initialize_grid

    seq = config.seq_length
    grid = initialize_grid(pp=world_size, virtual_pp=v if v > 1 else None)
    chunks = build_model_chunks(config, grid)  # GPTModel
    forward_backward = get_forward_backward_func(world_size, grid.virtual_pp_size, schedule)
    optimizer = build_optimizer(chunks, OptimizerConfig(lr=1e-3), grid)

    def forward_step(data_iterator, chunk):
        tokens = next(data_iterator)  # [b, s + 1]
        per_token_loss = chunk(tokens[:, :-1], labels=tokens[:, 1:])

        def loss_func(output):
            loss = language_model_loss(output, torch.ones_like(output)).loss
            return loss, {"lm loss": loss.detach()}
        return per_token_loss, loss_func

    timeline = Timeline(grid.pp_rank)
    measured = []
    for step in range(WARMUP_STEPS + measured_steps):
        timeline.clear()
        g = torch.Generator().manual_seed(step)
        data = [torch.randint(0, config.vocab_size, (MICRO_BATCH, seq + 1), generator=g) for _ in range(m)]
        optimizer.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=iter(data), model=chunks, num_microbatches=m,
                         seq_length=seq, micro_batch_size=MICRO_BATCH, grid=grid, timeline=timeline)
        finalize_model_grads(chunks, grid)
        optimizer.step()
        if step >= WARMUP_STEPS:
            measured.append(gather_spans(timeline, grid))
    return measured


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    parser.add_argument("--all", action="store_true", help="run every schedule; --out gets a suffix per schedule")
    parser.add_argument("--virtual", type=int, default=2, help="virtual size for the interleaved schedule")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--simulate", action="store_true", help="unit-cost simulator instead of a real run")
    parser.add_argument("--out", default="pipeline_timeline.png")
    args = parser.parse_args(argv)
    if args.pp < 2:
        parser.error(f"--pp {args.pp}: a pipeline timeline needs at least 2 stages")

    from megalite.parallel.testing import run_on_ranks

    cores = os.cpu_count() or 1
    if not args.simulate and cores < args.pp:
        print(f"note: {args.pp} ranks share {cores} cores: a pass takes longer while more ranks are busy (and under "
              f"other load), so the measured bubble may land a few hundredths either side of the formula")

    schedules = list(SCHEDULES) if args.all else [args.schedule]
    for schedule in schedules:
        v = args.virtual if schedule == "interleaved" else 1
        order = build_order(schedule, args.pp, args.microbatches, v)  # refuses a bad layout before forking
        if args.simulate:
            spans = simulate(order)
        else:
            # Sizes that do not divide or layers that do not split are refused here, not in a forked rank.
            config = model_config(args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length)
            virtual_stage_layer_counts(args.num_layers, args.pp, v if v > 1 else None)
            spans = run_on_ranks(real_run, args.pp, schedule, args.microbatches, v, config, timeout=600)[0][-1]
        out = args.out if not args.all else args.out.replace(".png", f"_{schedule}.png")
        kind = "simulated" if args.simulate else "measured"
        title = f"{schedule}, p={args.pp}, m={args.microbatches}" + (f", v={v}" if v > 1 else "") + f" ({kind})"
        draw_timeline(spans, out, title)
        print(f"{schedule:12s} {kind} bubble {bubble_fraction(spans):.3f}   "
              f"formula {formula(schedule, args.pp, args.microbatches, v, None if args.simulate else spans)}"
              f"   -> {out}")


if __name__ == "__main__":
    main()
