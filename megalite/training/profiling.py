"""Megatron's profiling flags: ``--profile --use-pytorch-profiler --profile-step-start N
--profile-step-end M`` record steps N..M-1 of the chosen ranks (``--profile-ranks``, default 0)
with ``torch.profiler`` and write one Chrome/Perfetto trace per rank under ``--profile-dir`` (or
``--tensorboard-dir``); open it in chrome://tracing or ui.perfetto.dev.

``--profile`` without ``--use-pytorch-profiler`` is Megatron's nsys mode: the same window is opened and
closed with the CUDA profiler API, for ``nsys profile --capture-range=cudaProfilerApi``.  It needs CUDA;
``arguments.check_machine`` refuses it on a machine without."""
from __future__ import annotations

import os
from typing import Optional

import torch

from megalite.config.settings import TrainingConfig
from megalite.log import print_rank

__all__ = ["StepProfiler"]


class StepProfiler:
    """``before_step(n)`` / ``after_step(n)`` around step n; a no-op unless this rank profiles."""

    def __init__(self, cfg: TrainingConfig, rank: int):
        ranks = cfg.profile_ranks if cfg.profile_ranks is not None else [0]
        self.active = cfg.profile and rank in ranks
        self.nsys = not cfg.use_pytorch_profiler   # capture by the CUDA profiler API (nsys), not torch.profiler
        self.capturing = False
        self.start, self.end, self.rank = cfg.profile_step_start, cfg.profile_step_end, rank
        self.folder = cfg.profile_dir or cfg.tensorboard_dir or "profile"
        self.profiler: Optional[torch.profiler.profile] = None

    def before_step(self, step: int) -> None:
        if self.active and self.nsys and step == self.start:
            torch.cuda.cudart().cudaProfilerStart()
            self.capturing = True
        elif self.active and step == self.start and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()

    def after_step(self, step: int, last: bool = False) -> None:
        """Stops after step end-1 (or at the run's last step, when it ends inside the window)."""
        if self.capturing and (step + 1 >= self.end or last):
            torch.cuda.cudart().cudaProfilerStop()
            self.capturing = self.active = False
            print_rank(f"nsys capture (CUDA profiler API) of steps {self.start}-{step} ended")
        if self.profiler is None or (step + 1 < self.end and not last):
            return
        self.profiler.__exit__(None, None, None)
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"trace_rank{self.rank}_steps{self.start}-{step}.json")
        self.profiler.export_chrome_trace(path)
        self.profiler, self.active = None, False
        print_rank(f"profiler trace of steps {self.start}-{step}: {path}")
