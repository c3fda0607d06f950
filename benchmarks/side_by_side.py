"""Timing shared by the benchmark scripts: megalite and its peer in alternating rounds."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence


def alternating(fns: Sequence[Callable[[], object]], rounds: int, warmup: int = 0,
                synchronize: Callable[[], None] = lambda: None,
                clock: Callable[[], float] = time.perf_counter) -> List[float]:
    """Median seconds of each fn, timed in rounds (fn 0, fn 1, ..., fn 0, fn 1, ...), so that a
    change of load on a shared machine hits every side alike instead of skewing the ratio.
    ``warmup`` untimed calls of each fn come first; ``synchronize`` waits for queued device work; ``clock``
    reads the time (``time.process_time``: this process's CPU time, which other processes' load does not
    inflate)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, fn_times in zip(fns, times):
            synchronize()
            start = clock()
            fn()
            synchronize()
            fn_times.append(clock() - start)
    return [statistics.median(t) for t in times]
