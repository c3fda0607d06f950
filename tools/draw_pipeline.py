"""Draw a pipeline schedule's timeline: a real CPU run on forked gloo ranks, or the unit-cost simulator.

    python tools/draw_pipeline.py --pp 4 --schedule 1f1b --microbatches 8 --out docs/images/pipeline_timeline.png
    python tools/draw_pipeline.py --pp 4 --schedule zb-h1 --microbatches 8 --simulate --out /tmp/zb.png
    python tools/draw_pipeline.py --pp 4 --all --microbatches 8      # measured bubble of every schedule

Prints the measured bubble fraction next to the schedule's formula.  The real run trains a small
GPTModel (the test suite's toy stack when megalite.model.gpt is not available) for a few steps and
draws the last one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megalite.parallel.pipeline.orders import build_order  # noqa: E402
from megalite.parallel.pipeline.simulator import simulate  # noqa: E402
from megalite.parallel.pipeline.timeline import bubble_fraction, draw_timeline  # noqa: E402


def formula(schedule: str, p: int, m: int, v: int) -> str:
    if schedule == "interleaved":
        return f"(p-1)/(v*m) = {(p - 1) / (v * m):.3f}"
    if schedule == "zb-h1":
        return "(p-1)(T_F+T_B-T_W) / (m(T_F+T_B+T_W)) = " + f"{(p - 1) / (3 * m):.3f} at equal T"
    return f"(p-1)/m = {(p - 1) / m:.3f}"


def model_and_config(layers: int, hidden: int, seq: int):
    try:
        from megalite.config import ModelConfig
        from megalite.model.gpt import GPTModel
        config = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4, seq_length=seq,
                             vocab_size=256, hidden_dropout=0.0, attention_dropout=0.0)
        return GPTModel, config
    except ImportError:
        from tests.parallel.pipeline.toy_model import ToyConfig, ToyModel
        return ToyModel, ToyConfig(num_layers=layers, hidden_size=hidden, seq_length=seq, vocab_size=256)


def real_run(rank, world_size, schedule, m, v, layers, hidden, seq):
    import torch

    from megalite.parallel.grads import finalize_model_grads
    from megalite.parallel.pipeline.schedules import get_forward_backward_func
    from megalite.parallel.pipeline.stages import build_model_chunks
    from megalite.parallel.pipeline.timeline import Timeline, gather_spans
    from megalite.parallel.state import initialize_grid

    model_cls, config = model_and_config(layers, hidden, seq)
    grid = initialize_grid(pp=world_size, virtual_pp=v if v > 1 else None)
    chunks = build_model_chunks(config, grid, model_cls)
    forward_backward = get_forward_backward_func(world_size, grid.virtual_pp_size, schedule)
    optimizer = torch.optim.SGD([p for c in chunks for p in c.parameters()], lr=0.01)

    def forward_step(data_iterator, chunk):
        tokens = next(data_iterator)
        per_token = chunk(tokens[:, :-1], labels=tokens[:, 1:])
        return per_token, lambda out: (out.mean(), {"lm loss": out.mean().detach()})

    timeline = Timeline(grid.pp_rank)
    for step in range(3):  # the first steps warm up allocators and gloo connections
        timeline.clear()
        g = torch.Generator().manual_seed(step)
        data = [torch.randint(0, 256, (2, seq + 1), generator=g) for _ in range(m)]
        forward_backward(forward_step_func=forward_step, data_iterator=iter(data), model=chunks, num_microbatches=m,
                         seq_length=seq, micro_batch_size=2, grid=grid, timeline=timeline)
        finalize_model_grads(chunks, grid)
        optimizer.step()
        optimizer.zero_grad()
    return gather_spans(timeline, grid)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved", "zb-h1"])
    parser.add_argument("--all", action="store_true", help="run every schedule; --out gets a suffix per schedule")
    parser.add_argument("--virtual", type=int, default=2, help="virtual size for the interleaved schedule")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--simulate", action="store_true", help="unit-cost simulator instead of a real run")
    parser.add_argument("--out", default="pipeline_timeline.png")
    args = parser.parse_args(argv)

    from megalite.testing import run_on_ranks

    schedules = ["gpipe", "1f1b", "interleaved", "zb-h1"] if args.all else [args.schedule]
    for schedule in schedules:
        v = args.virtual if schedule == "interleaved" else 1
        if args.simulate:
            spans = simulate(build_order(schedule, args.pp, args.microbatches, v))
        else:
            spans = run_on_ranks(real_run, args.pp, schedule, args.microbatches, v, args.num_layers,
                                 args.hidden_size, args.seq_length, timeout=600)[0]
        out = args.out if not args.all else args.out.replace(".png", f"_{schedule}.png")
        kind = "simulated" if args.simulate else "measured"
        title = f"{schedule}, p={args.pp}, m={args.microbatches}" + (f", v={v}" if v > 1 else "") + f" ({kind})"
        draw_timeline(spans, out, title)
        print(f"{schedule:12s} {kind} bubble {bubble_fraction(spans):.3f}   formula {formula(schedule, args.pp, args.microbatches, v)}"
              f"   -> {out}")


if __name__ == "__main__":
    main()
