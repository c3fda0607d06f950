"""--manual-gc / --manual-gc-interval and --empty-unused-memory-level, as Megatron-LM does them."""
import gc

import pytest

from megalite.parallel.testing import run_on_ranks
from megalite.training import memory_hygiene
from megalite.training.arguments import parse_args

TINY = ["--mock-data", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
        "--seq-length", "8", "--max-position-embeddings", "8", "--vocab-size", "64", "--make-vocab-size-divisible-by",
        "64", "--micro-batch-size", "1", "--log-interval", "1000", "--eval-iters", "1"]


def _train_recording(rank, world_size, argv):
    from megalite.training import loop
    collections, memory_calls, enabled_in_steps = [], [], []
    real_collect, real_step = gc.collect, loop.train_step

    def step(run, *args, **kwargs):
        enabled_in_steps.append(gc.isenabled())
        return real_step(run, *args, **kwargs)

    gc.collect = lambda *a: collections.append(1) or real_collect(*a)
    loop.train_step = step
    loop.empty_unused_memory = lambda level, at_least: memory_calls.append((level, at_least))
    try:
        loop.pretrain(argv)
    finally:
        gc.collect = real_collect
    return len(collections), memory_calls, enabled_in_steps, gc.isenabled()


def test_manual_gc_collects_between_steps_and_around_evaluation_only():
    argv = TINY + ["--train-iters", "4", "--eval-interval", "2", "--manual-gc", "--manual-gc-interval", "2",
                   "--empty-unused-memory-level", "2"]
    collections, memory_calls, enabled, enabled_after = run_on_ranks(_train_recording, 1, argv, timeout=120)[0]
    assert enabled == [False] * 4 and enabled_after          # off during the run, restored after it
    # One at the start, after steps 2 and 4, and before and after the evaluations at steps 2 and 4.
    assert collections == 1 + 2 + 4
    # After forward/backward and after the step; after each evaluation (steps 2 and 4), as Megatron-LM does.
    step, evaluation = [(2, 1), (2, 2)], [(2, 1)]
    assert memory_calls == (step * 2 + evaluation) * 2


def test_without_manual_gc_the_collector_stays_on():
    collections, _, enabled, _ = run_on_ranks(_train_recording, 1, TINY + ["--train-iters", "2"], timeout=120)[0]
    assert enabled == [True, True] and collections == 0


def test_empty_unused_memory_empties_cuda_cache_from_its_level(monkeypatch):
    calls = []
    monkeypatch.setattr(memory_hygiene.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory_hygiene.torch.cuda, "empty_cache", lambda: calls.append(1))
    for level, at_least in ((0, 1), (1, 1), (1, 2), (2, 2)):
        memory_hygiene.empty_unused_memory(level, at_least)
    assert len(calls) == 2


def test_interval_needs_the_switch():
    with pytest.raises(ValueError, match="--manual-gc-interval 5 takes effect only with --manual-gc"):
        parse_args(TINY + ["--manual-gc-interval", "5"], world_size=1)
