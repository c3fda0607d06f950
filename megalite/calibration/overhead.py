"""Measure the host's fixed cost of a training step: what a CPU pays besides the arithmetic.

Each op a step runs costs its dispatch, and a step runs many ops no table covers: views, reshapes,
autograd's bookkeeping and gradient accumulation, the module calls, the schedule's loop, the loss
reduction, the optimizer's per-tensor work.  On a GPU launches are asynchronous and hide behind
longer kernels; on a CPU every one runs in line, and at small widths they add up (~0.6 ms per
layer and micro-batch on a 2-core x86 machine, beside a layer of ~10 ms at hidden 256).

So the calibration runs megalite's real training step (``training.setup`` / ``train_step``, one
rank, mock data) at a width where the arithmetic all but vanishes (hidden 64, sequence 32,
micro-batch 1), with L = 1 and 3 layers and m = 1 and 3 micro-batches, and splits the step's time
``T(L, m) = step + m (micro_batch + L layer)``::

    layer       = (T(3, 3) - T(1, 3) - T(3, 1) + T(1, 1)) / 4      per layer and micro-batch
    micro_batch = (T(1, 3) - T(1, 1)) / 2 - layer                  per micro-batch (embedding, output
                                                                   layer, loss, schedule)
    step        = T(1, 1) - micro_batch - layer                    per step (optimizer, bookkeeping)

on the measured step less what the performance model already predicts for the same tiny runs from
the measured tables (so the few microseconds the tables' own calls include are not counted twice
at these sizes; at real sizes each table op's own dispatch stays in both, a few percent of this).
Each is clamped at zero.  Each ``T`` is the median thread CPU time of the timed steps.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence, Tuple

__all__ = ["measure_overhead", "split_overhead", "TINY_LAYERS", "TINY_MICRO_BATCHES"]

TINY_LAYERS = (1, 3)
TINY_MICRO_BATCHES = (1, 3)
_WARMUP, _STEPS = 3, 15


def tiny_argv(layers: int, micro_batches: int) -> List[str]:
    return ["--mock-data", "--num-layers", str(layers), "--hidden-size", "64", "--num-attention-heads", "2",
            "--seq-length", "32", "--max-position-embeddings", "32", "--vocab-size", "128",
            "--make-vocab-size-divisible-by", "128", "--micro-batch-size", "1",
            "--global-batch-size", str(micro_batches), "--hidden-dropout", "0", "--attention-dropout", "0",
            "--lr", "1e-4", "--eval-iters", "0", "--log-interval", "1000000", "--seed", "7",
            "--train-iters", str(_WARMUP + _STEPS)]


def _step_seconds(rank: int, world_size: int, argv: Sequence[str], steps: int, threads: int) -> float:
    """On one forked rank at ``threads`` torch threads (the tables' count): the median thread CPU time of
    ``steps`` training steps after a warm-up."""
    import torch

    from megalite.training.loop import setup, train_step

    torch.set_num_threads(threads)
    run = setup(list(argv), world_size=world_size)
    for _ in range(_WARMUP):
        train_step(run)
    times = []
    for _ in range(steps):
        t0 = time.thread_time()
        train_step(run)
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def split_overhead(times: Dict[Tuple[int, int], float]) -> Dict[str, float]:
    """(layer, micro_batch, step) seconds from ``times[(L, m)]`` at L, m in {1, 3}, each at least 0."""
    layer = (times[3, 3] - times[1, 3] - times[3, 1] + times[1, 1]) / 4
    micro_batch = (times[1, 3] - times[1, 1]) / 2 - layer
    step = times[1, 1] - micro_batch - layer
    return {"layer_s": max(0.0, layer), "micro_batch_s": max(0.0, micro_batch), "step_s": max(0.0, step)}


def measure_overhead(document: dict, quick: bool = False) -> Dict[str, float]:
    """The host overhead (``split_overhead``'s keys) of megalite's step on this machine, beyond what
    the tables already in ``document`` (a calibration being written) predict for the same runs."""
    from megalite.parallel.testing import run_on_ranks
    from megalite.scaling.hardware import from_calibration
    from megalite.scaling.predict import predict
    from megalite.training.arguments import parse_args

    hardware = from_calibration(document)
    excess = {}
    for layers in TINY_LAYERS:
        for micro_batches in TINY_MICRO_BATCHES:
            argv = tiny_argv(layers, micro_batches)
            measured = run_on_ranks(_step_seconds, 1, argv, 3 if quick else _STEPS,
                                    int(document.get("threads_per_rank", 1)), timeout=300)[0]
            model, parallel, optimizer, _data, training = parse_args(argv, world_size=1)
            predicted = predict(model, parallel, training, optimizer, hardware, 1).iteration_time_s
            excess[layers, micro_batches] = measured - predicted
    return split_overhead(excess)
