"""The time a small operation costs its core: the median of repeats after one untimed call.

Shared by the calibration's measurements (``calibration/calibrate.py``, ``calibration/ops.py``).  At one torch
thread the clock is the calling thread's CPU time (``time.thread_time``: an op runs inline in that
thread), so other processes on the cores do not count -- the figures are the idle machine's, which
is what the performance model predicts; they still share caches and memory bandwidth.  With more
threads the op's work spreads over a pool and the clock is the wall clock (``time.perf_counter``).

Every call's result (tensors, or lists of them) is kept until the measurement ends, so each call
writes memory the process has not touched yet, as a training step's ops do (their outputs are kept
for backward): on a CPU, faulting in fresh pages costs about as much as the arithmetic of an
elementwise op, and an op timed on a recycled output buffer runs several times faster than it
does in a layer.  Repeats stop once ``keep_bytes`` are held (after the first 3).  megalite's own CPU
norms are the exception: their outputs come from a cache of blocks a step reuses
(``csrc/cpu/output_cache.h``), so they are timed with ``keep=False``.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional

import torch

__all__ = ["median_seconds", "clock"]


def clock() -> Callable[[], float]:
    """The clock ``median_seconds`` reads at the current torch thread count."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _nbytes(result) -> int:
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, (list, tuple)):
        return sum(_nbytes(r) for r in result)
    return 0


def median_seconds(fn: Callable[..., object], min_time: float = 0.05, max_repeats: int = 50,
                   keep_bytes: int = 256 << 20, setup: Optional[Callable[[], tuple]] = None,
                   keep: bool = True) -> float:
    """Median time of ``fn`` (``clock()``) after one untimed call; repeats until ``min_time`` wall seconds
    have passed (at least 3, at most ``max_repeats``, fewer once ``keep_bytes`` of results are kept).
    ``setup``, when given, runs untimed before each call and its result is ``fn``'s arguments (the
    forward a backward needs).  ``keep=False`` drops each result before the next call (for ops whose
    outputs come from a cache that training reuses every step, as megalite's CPU norms' do)."""
    fn(*(setup() if setup else ()))
    now = clock()
    times: List[float] = []
    kept: List[object] = []
    held = 0
    started = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - started < min_time and len(times) < max_repeats
                             and held < keep_bytes):
        arguments = setup() if setup else ()
        t0 = now()
        result = fn(*arguments)
        times.append(now() - t0)
        if keep:
            kept.append((arguments, result))
            held += _nbytes(result) + _nbytes(arguments)
        del arguments, result
    return statistics.median(times)
