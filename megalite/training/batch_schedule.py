"""The global batch size of each step: fixed, ramped up as Megatron-LM's --rampup-batch-size does, or
stepped as its --step-batch-size-schedule does.

``--rampup-batch-size START INCR SAMPLES`` starts at START sequences per step and adds INCR each
time another ``SAMPLES / ((GLOBAL - START) / INCR)`` samples have been consumed, until the step
holds ``--global-batch-size`` (Brown et al. 2020 ramp the batch over the first 4-12B tokens).  The
size depends only on the samples consumed, so a resumed run continues the ramp where it stood.

    >>> ramp = BatchSchedule(8, micro_batch_size=1, data_parallel_size=2, rampup=(2, 2, 12))
    >>> [ramp.global_batch_size(consumed) for consumed in (0, 2, 4, 6, 8, 12, 100)]
    [2, 2, 4, 4, 6, 8, 8]
    >>> ramp.num_iterations(30)
    6

``--step-batch-size-schedule "0:16 2.4B:320 ..."`` gives the size from a count of consumed TOKENS on;
Megatron turns each threshold into samples as ``tokens // seq_length`` and takes, for a step, the size
of the last threshold reached by the samples consumed before it::

    >>> steps = BatchSchedule.from_step_schedule([(0, 2), (64, 4), (128, 8)], seq_length=16,
    ...                                          micro_batch_size=2, data_parallel_size=1)
    >>> [steps.global_batch_size(consumed) for consumed in (0, 2, 4, 6, 8, 100)]
    [2, 2, 4, 4, 8, 8]
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from megalite.config.training_settings import TrainingConfig, step_schedule

__all__ = ["BatchSchedule", "run_batch_schedule"]


class BatchSchedule:
    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int,
                 rampup: Optional[Sequence[int]] = None):
        self.final, self.per_microbatch = global_batch_size, micro_batch_size * data_parallel_size
        self.rampup = tuple(rampup) if rampup else None
        self.steps: Optional[List[Tuple[int, int]]] = None   # (samples consumed, size), a step schedule
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

    @classmethod
    def from_step_schedule(cls, schedule: Sequence[Tuple[int, int]], seq_length: int, micro_batch_size: int,
                           data_parallel_size: int) -> "BatchSchedule":
        """``schedule``: (tokens, size) pairs from ``config.training_settings.step_schedule``; every size must
        split into micro-batches (checked here, before any step, where Megatron checks each size as it comes)."""
        steps = [(tokens // seq_length, size) for tokens, size in schedule]
        for i in range(1, len(steps)):
            if steps[i][0] <= steps[i - 1][0]:
                raise ValueError(f"thresholds {schedule[i - 1][0]} and {schedule[i][0]} tokens fall in the same "
                                 f"sample of {seq_length} tokens; space them at least a sequence apart")
        batches = cls(steps[-1][1], micro_batch_size, data_parallel_size)
        for _, size in steps:
            if size % batches.per_microbatch:
                raise ValueError(f"size {size} is not a multiple of micro batch x data-parallel size "
                                 f"{batches.per_microbatch}, so its steps would not split into micro-batches")
        batches.steps = steps
        return batches

    def global_batch_size(self, consumed_samples: int) -> int:
        """Sequences in the step that starts after ``consumed_samples``."""
        if self.steps is not None:
            return [size for threshold, size in self.steps if threshold <= consumed_samples][-1]
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
        if self.steps is not None:    # Megatron's count: whole steps until the samples are reached
            while consumed < train_samples:
                consumed += self.global_batch_size(consumed)
                iterations += 1
            return iterations
        while consumed < train_samples and self.global_batch_size(consumed) < self.final:
            consumed += self.global_batch_size(consumed)
            iterations += 1
        return iterations + max(0, math.ceil((train_samples - consumed) / self.final))


def run_batch_schedule(training: TrainingConfig, seq_length: int, data_parallel_size: int) -> BatchSchedule:
    """The run's schedule from its flags; a refusal names the flags."""
    if training.step_batch_size_schedule is not None:
        try:
            return BatchSchedule.from_step_schedule(step_schedule(training.step_batch_size_schedule), seq_length,
                                                    training.micro_batch_size, data_parallel_size)
        except ValueError as error:
            raise ValueError(f"--step-batch-size-schedule {training.step_batch_size_schedule!r} with --seq-length "
                             f"{seq_length}: {error}") from None
    try:
        return BatchSchedule(training.global_batch_size, training.micro_batch_size, data_parallel_size,
                             training.rampup_batch_size)
    except ValueError as error:
        raise ValueError(f"--rampup-batch-size {' '.join(map(str, training.rampup_batch_size))} with "
                         f"--global-batch-size {training.global_batch_size}: {error}") from None
