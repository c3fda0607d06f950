"""The global batch size of each step: fixed, or ramped up as Megatron-LM's --rampup-batch-size does.

``--rampup-batch-size START INCR SAMPLES`` starts at START sequences per step and adds INCR each
time another ``SAMPLES / ((GLOBAL - START) / INCR)`` samples have been consumed, until the step
holds ``--global-batch-size`` (Brown et al. 2020 ramp the batch over the first 4-12B tokens).  The
size depends only on the samples consumed, so a resumed run continues the ramp where it stood.

    >>> ramp = BatchSchedule(8, micro_batch_size=1, data_parallel_size=2, rampup=(2, 2, 12))
    >>> [ramp.global_batch_size(consumed) for consumed in (0, 2, 4, 6, 8, 12, 100)]
    [2, 2, 4, 4, 6, 8, 8]
    >>> ramp.num_iterations(30)
    6
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

__all__ = ["BatchSchedule"]


class BatchSchedule:
    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int,
                 rampup: Optional[Sequence[int]] = None):
        self.final, self.per_microbatch = global_batch_size, micro_batch_size * data_parallel_size
        self.rampup = tuple(rampup) if rampup else None
        if self.rampup is None:
            return
        if len(self.rampup) != 3:
            raise ValueError(f"a batch ramp takes START INCREMENT SAMPLES, got {list(self.rampup)}")
        start, increment, samples = self.rampup
        if start < 1 or increment < 1 or samples < 0:
            raise ValueError(f"batch ramp {start} {increment} {samples}: START and INCREMENT must be at least 1 "
                             f"and SAMPLES at least 0")
        if start > global_batch_size or (global_batch_size - start) % increment:
            raise ValueError(f"batch ramp from {start} by {increment} does not reach the global batch size "
                             f"{global_batch_size}; use a START and INCREMENT that step onto it")
        for size in (start, increment):
            if size % self.per_microbatch:
                raise ValueError(f"batch ramp size {size} is not a multiple of micro batch x data-parallel size "
                                 f"{self.per_microbatch}, so some steps would not split into micro-batches")
        steps = (global_batch_size - start) // increment
        self.samples_per_increment = samples / steps if steps else 0.0

    def global_batch_size(self, consumed_samples: int) -> int:
        """Sequences in the step that starts after ``consumed_samples``."""
        if self.rampup is None or not self.samples_per_increment:
            return self.final
        start, increment, _ = self.rampup
        return min(self.final, start + int(consumed_samples // self.samples_per_increment) * increment)

    def num_microbatches(self, consumed_samples: int) -> int:
        """Micro-batches per data-parallel rank in the step that starts after ``consumed_samples``."""
        return self.global_batch_size(consumed_samples) // self.per_microbatch

    def num_iterations(self, train_samples: int) -> int:
        """Steps needed to consume ``train_samples`` (Megatron's --train-samples), the ramp included."""
        consumed = iterations = 0
        while consumed < train_samples and self.global_batch_size(consumed) < self.final:
            consumed += self.global_batch_size(consumed)
            iterations += 1
        return iterations + max(0, math.ceil((train_samples - consumed) / self.final))
