"""What a run tells its user: a line every --log-interval on global rank 0, a JSON record per
iteration in --log-json, with throughput, TFLOP/s, MFU and peak memory (``scaling/flops.py``)."""
from __future__ import annotations

import json
import os
import resource
import time
from typing import List

import torch
import torch.distributed as dist

from megalite.config import ModelConfig, TrainingConfig
from megalite.scaling import flops

__all__ = ["Logger", "print_rank0", "peak_memory_mb"]


def print_rank0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated by torch; CPU: the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class Logger:
    """Prints a line every --log-interval (rank 0) and writes every iteration to --log-json.

    ``record()`` completes an iteration's record (loss, lr, grad norm, ...) with its timing figures
    and returns it.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainingConfig, *, rank: int, world_size: int,
                 device: torch.device, half_precision: bool, start_iteration: int):
        self.train_cfg, self.world_size, self.device = train_cfg, world_size, device
        self.flops_per_iter = flops.flops_per_iteration(model_cfg, train_cfg.global_batch_size)
        self.peak_tflops = train_cfg.peak_tflops or flops.default_peak_tflops(half_precision, device)
        self.tokens_per_iter = train_cfg.global_batch_size * model_cfg.seq_length
        self.json_file = None
        if rank == 0 and train_cfg.log_json:
            os.makedirs(os.path.dirname(os.path.abspath(train_cfg.log_json)), exist_ok=True)
            # Appending keeps the earlier records of a resumed run.
            self.json_file = open(train_cfg.log_json, "a" if train_cfg.load else "w")
        self.window: List[dict] = []
        self.start_time = time.perf_counter()
        self.start_iteration = start_iteration

    def record(self, record: dict, step_seconds: float) -> dict:
        tflops = self.flops_per_iter / step_seconds / self.world_size / 1e12
        record.update(elapsed_ms=step_seconds * 1e3, tokens_per_sec=self.tokens_per_iter / step_seconds,
                      tflops_per_device=tflops, mfu=flops.mfu(tflops, self.peak_tflops),
                      peak_memory_mb=peak_memory_mb(self.device))
        self.window.append(record)
        if self.json_file is not None:
            self.json_file.write(json.dumps(record) + "\n")
            self.json_file.flush()
        if record["iteration"] % self.train_cfg.log_interval == 0 or record["iteration"] == self.train_cfg.train_iters:
            self.print_window()
        return record

    def print_window(self) -> None:
        if not self.window:
            return
        w, train_iters = self.window, self.train_cfg.train_iters
        last = w[-1]
        seconds = sum(r["elapsed_ms"] for r in w) / 1e3
        done = last["iteration"] - self.start_iteration
        eta = (time.perf_counter() - self.start_time) / max(done, 1) * (train_iters - last["iteration"])
        grad_norm = "n/a" if last["grad_norm"] is None else f"{last['grad_norm']:.3f}"
        line = (f"iteration {last['iteration']:>6}/{train_iters} | "
                f"loss {sum(r['loss'] for r in w) / len(w):.4f} | lr {last['lr']:.3e} | grad norm {grad_norm} | "
                f"tokens/s {self.tokens_per_iter * len(w) / seconds:,.0f} | "
                f"TFLOP/s/device {sum(r['tflops_per_device'] for r in w) / len(w):.3f} | "
                f"MFU {100 * sum(r['mfu'] for r in w) / len(w):.2f}% | "
                f"peak mem {last['peak_memory_mb']:.0f} MB | skipped {last['skipped_steps']} | ETA {format_eta(eta)}")
        if "eval_loss" in last:
            line += f" | eval loss {last['eval_loss']:.4f} ppl {last['eval_ppl']:.2f}"
        print_rank0(line)
        self.window = []

    def close(self) -> None:
        if self.json_file is not None:
            self.json_file.close()
