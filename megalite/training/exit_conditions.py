"""When a run stops before --train-iters: a scheduler's SIGTERM (--exit-signal-handler) or its time
budget (--exit-duration-in-mins); every rank must agree, or some would wait forever in a collective."""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megalite.config.settings import TrainingConfig

__all__ = ["ExitSignal", "exit_reason"]


class ExitSignal:
    """--exit-signal-handler: SIGTERM (what SLURM sends before preemption, with ``#SBATCH --signal``)
    only marks the run; it saves and stops at the end of the current iteration."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._mark)

    def _mark(self, signum, frame) -> None:
        self.received = True


def exit_reason(cfg: TrainingConfig, started_at: float, device: torch.device,
                exit_signal: ExitSignal) -> Optional[str]:
    """Why the run stops now (a signal, --exit-duration-in-mins), agreed by every rank with one
    all-reduce; None to go on.  No collective when neither is asked for."""
    if cfg.exit_duration_in_mins is None and not cfg.exit_signal_handler:
        return None
    late = cfg.exit_duration_in_mins is not None and time.time() - started_at > cfg.exit_duration_in_mins * 60
    flags = torch.tensor([float(exit_signal.received), float(late)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0]:
        return "SIGTERM (--exit-signal-handler)"
    if flags[1]:
        return f"--exit-duration-in-mins {cfg.exit_duration_in_mins:g}"
    return None
