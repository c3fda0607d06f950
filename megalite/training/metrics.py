"""What a run tells its user: Megatron-LM's log line every --log-interval, a JSON record per
iteration in --log-json, and the same scalars in TensorBoard and Weights & Biases (``metric_writers``).

The log line keeps Megatron's fields, order and number formats, so parsers written for Megatron's
logs read megalite's, then adds megalite's own (tokens/s, MFU, peak memory, ETA)::

     [2026-11-30 02:00:00] iteration       20/     200 | consumed samples:          320 | elapsed time per
     iteration (ms): 180.3 | learning rate: 2.000000E-03 | global batch size:    16 | lm loss: 6.651268E+00 |
     loss scale: 1.0 | grad norm: 0.912 | number of skipped iterations:   0 | number of nan iterations:   0 |
     tokens/s: 11,361 | TFLOP/s/device: 0.013 | MFU: 2.41% | peak memory (MB): 359 | ETA: 00:32 |

(one line), printed through megalite/log.py.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import resource
import time
from typing import List, Optional

import torch

from megalite.config.settings import ModelConfig, TrainingConfig
from megalite.log import print_rank0
from megalite.model import flops
from megalite.training.metric_writers import MetricWriter

__all__ = ["Logger", "peak_memory_mb"]


# The routers' auxiliary losses, logged after the lm loss when the model has experts (training/moe_step.py).
MOE_LOSSES = ("load_balancing_loss", "z_loss")


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
    """Completes each iteration's record with its timing figures, prints the log line every
    --log-interval (rank 0) and hands every record to --log-json and the metric writers."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainingConfig, *, rank: int, world_size: int, tp: int,
                 device: torch.device, half_precision: bool, start_iteration: int,
                 writers: Optional[List[MetricWriter]] = None):
        self.model_cfg, self.train_cfg, self.world_size, self.device = model_cfg, train_cfg, world_size, device
        self.tp = tp
        self.peak_tflops = train_cfg.peak_tflops or flops.default_peak_tflops(half_precision, device)
        self.writers = list(writers or [])
        self.json_file = None
        if rank == 0 and train_cfg.log_json:
            os.makedirs(os.path.dirname(os.path.abspath(train_cfg.log_json)), exist_ok=True)
            if train_cfg.load:
                keep_records_up_to(train_cfg.log_json, start_iteration)
            # Appending keeps the earlier records of a resumed run.
            self.json_file = open(train_cfg.log_json, "a" if train_cfg.load else "w")
        self.window: List[dict] = []
        self.start_time = time.perf_counter()
        self.start_iteration = start_iteration

    def record(self, record: dict, step_seconds: float) -> dict:
        """Add elapsed time, tokens/s, TFLOP/s, MFU and peak memory to ``record``; log it; return it."""
        batch = record["global_batch_size"]
        tflops = flops.flops_per_iteration(self.model_cfg, batch, tp=self.tp) / step_seconds / self.world_size / 1e12
        record.update(elapsed_ms=step_seconds * 1e3, tokens_per_sec=batch * self.model_cfg.seq_length / step_seconds,
                      tflops_per_device=tflops, mfu=flops.mfu(tflops, self.peak_tflops),
                      peak_memory_mb=peak_memory_mb(self.device))
        self.window.append(record)
        if self.json_file is not None:
            self.json_file.write(json.dumps(record) + "\n")
            self.json_file.flush()
        for writer in self.writers:
            writer.write(record)
        if record["iteration"] % self.train_cfg.log_interval == 0 or record["iteration"] == self.train_cfg.train_iters:
            self.print_window()
        return record

    def print_window(self) -> None:
        """Megatron's line for the iterations since the last one: mean loss and time, last lr and norm."""
        if not self.window:
            return
        w, last = self.window, self.window[-1]
        done = last["iteration"] - self.start_iteration
        eta = (time.perf_counter() - self.start_time) / max(done, 1) * (self.train_cfg.train_iters - last["iteration"])
        first_skipped = w[0]["skipped_steps"] - (1 if w[0]["grad_norm"] is None else 0)
        nan_iterations = sum(1 for r in w if not math.isfinite(r["loss"]))
        grad_norm = 0.0 if last["grad_norm"] is None else last["grad_norm"]
        tokens_per_sec = sum(r["global_batch_size"] for r in w) * self.model_cfg.seq_length / _mean(w, "elapsed_ms") \
            / len(w) * 1e3
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        line = (f" [{stamp}] iteration {last['iteration']:8d}/{self.train_cfg.train_iters:8d} | "
                f"consumed samples: {last['consumed_samples']:12d} | "
                f"elapsed time per iteration (ms): {_mean(w, 'elapsed_ms'):.1f} | ")
        if self.train_cfg.log_throughput:
            line += f"throughput per GPU (TFLOP/s/GPU): {_mean(w, 'tflops_per_device'):.1f} | "
        line += (f"learning rate: {last['lr']:.6E} | global batch size: {last['global_batch_size']:5d} | "
                 f"lm loss: {_mean(w, 'loss'):.6E} | ")
        line += "".join(f"{name}: {_mean(w, name):.6E} | " for name in MOE_LOSSES if name in last)
        line += (f"loss scale: {last['loss_scale']:.1f} | "
                 f"grad norm: {grad_norm:.3f} | "
                 f"number of skipped iterations: {last['skipped_steps'] - first_skipped:3d} | "
                 f"number of nan iterations: {nan_iterations:3d} | "
                 f"tokens/s: {tokens_per_sec:,.0f} | "
                 f"TFLOP/s/device: {_mean(w, 'tflops_per_device'):.3f} | MFU: {100 * _mean(w, 'mfu'):.2f}% | "
                 f"peak memory (MB): {last['peak_memory_mb']:.0f} | ETA: {format_eta(eta)} |")
        print_rank0(line)
        if "eval_loss" in last:
            text = (f" validation loss at iteration {last['iteration']} | lm loss value: {last['eval_loss']:.6E} | "
                    f"lm loss PPL: {last['eval_ppl']:.6E} |")
            print_rank0("-" * len(text) + "\n" + text + "\n" + "-" * len(text))
        self.window = []

    def close(self) -> None:
        if self.json_file is not None:
            self.json_file.close()
        for writer in self.writers:
            writer.close()


def keep_records_up_to(path: str, iteration: int) -> None:
    """Drop --log-json records past ``iteration`` (written after the checkpoint a run resumes from,
    before it stopped), so that each iteration appears once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["iteration"] <= iteration]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _mean(records: List[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)
