"""Megatron's memory-hygiene switches: ``--manual-gc`` (Python's garbage collector off, run by hand between
steps, so no rank pauses for a collection at a moment of its own while the others wait on it in a
collective) and ``--empty-unused-memory-level`` (hand the CUDA caching allocator's unused blocks back:
1 after each forward/backward, 2 also after each optimizer step; nothing to do on a CPU)."""
from __future__ import annotations

import gc

import torch

from megalite.config.settings import TrainingConfig

__all__ = ["ManualGarbageCollection", "empty_unused_memory"]


class ManualGarbageCollection:
    """With --manual-gc: automatic collection off for the run; a full collection every --manual-gc-interval
    steps (0: none between steps) and before and after each evaluation; ``close()`` restores the collector."""

    def __init__(self, cfg: TrainingConfig):
        self.enabled, self.interval = cfg.manual_gc, cfg.manual_gc_interval
        self.was_enabled = gc.isenabled()
        if self.enabled:
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def around_evaluation(self) -> None:
        if self.enabled:
            gc.collect()

    def close(self) -> None:
        if self.enabled and self.was_enabled:
            gc.enable()


def empty_unused_memory(level: int, at_least: int) -> None:
    """Empty CUDA's cache when --empty-unused-memory-level ``level`` reaches ``at_least``."""
    if level >= at_least and torch.cuda.is_available():
        torch.cuda.empty_cache()
