"""Measure the runtime's own memory: what a rank holds beside its model's bytes.

A CPU rank's peak resident set (``training/metrics.peak_memory_mb``: ``ru_maxrss``) counts the
interpreter, torch's and megalite's code and import-time data, the process group's buffers and
threads, and what a first training step makes lazily (kernels' code and tables, the autograd
engine, the optimizer's first call) -- several hundred MiB that no tensor of the model accounts for.
The calibration measures it the way ``tools/scaling_sweep.py`` measures a run's peak, on this machine,
at the calibration's threads per rank:

- ``import_mib``: ranks under ``torch.distributed.run`` that import the trainer, meet in a gloo
  group and run one all-reduce, nothing else (``python -m megalite.calibration.baseline OUT``; not
  measured by a quick calibration, which records None);
- ``step_mib``: megalite's own training run (``megalite.train`` under ``torch.distributed.run``, data
  parallel over the ranks) at a width where the model's bytes all but vanish (hidden 64, one layer,
  sequence 32, micro-batch 1: the host-overhead run of ``overhead.py``), its rank 0's peak as
  ``--log-json`` records it;
- ``mib``: ``step_mib`` less what the memory model counts for that tiny run (well under 1 MiB):
  the baseline ``predict`` adds to a CPU rank's memory (``Hardware.runtime_bytes``).

On a GPU the equivalent is the CUDA context (a few hundred MiB of device memory per process, outside
torch's allocator); the GPU presets do not count it, as ``torch.cuda.max_memory_allocated`` -- what
megalite reports there -- does not either.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

__all__ = ["measure_runtime_baseline"]


def _rank_main(out: str) -> None:
    """One rank under torch.distributed.run: the trainer imported, gloo up, rank 0's peak RSS to ``out``."""

    import torch
    import torch.distributed as dist

    import megalite.training.loop  # noqa: F401  (what a run's process imports before its model exists)
    from megalite.parallel.launch import init_distributed, shut_down_distributed
    from megalite.training.metrics import peak_memory_mb

    init_distributed("gloo")
    dist.all_reduce(torch.ones(1024))
    peak_mib = peak_memory_mb(torch.device("cpu"))     # what a run's log reports as its peak
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"peak_mib": peak_mib, "threads": torch.get_num_threads()}, f)
    shut_down_distributed()


def _launch(module_argv: List[str], ranks: int, threads: int, folder: str, timeout: float) -> None:
    """``python -m torch.distributed.run`` of ``module_argv`` on ``ranks`` ranks at ``threads`` threads each."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m"] + module_argv
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=folder)
    if done.returncode != 0:
        raise RuntimeError(f"runtime baseline: {module_argv[0]} on {ranks} ranks exited {done.returncode}:\n"
                           f"{done.stderr[-2000:]}")


def measure_runtime_baseline(document: dict, ranks: int, quick: bool = False,
                             timeout: float = 300.0) -> Dict[str, Optional[float]]:
    """``{"import_mib", "step_mib", "mib"}`` (module docstring) at ``document``'s threads per rank, where
    ``document`` is the calibration being written (its tables predict the tiny run's own bytes)."""
    from megalite.calibration.overhead import tiny_argv
    from megalite.scaling.hardware import from_calibration
    from megalite.scaling.predict import predict
    from megalite.training.arguments import parse_args

    threads = int(document.get("threads_per_rank", 1))
    with tempfile.TemporaryDirectory(prefix="megalite-baseline-") as folder:
        out, log = os.path.join(folder, "baseline.json"), os.path.join(folder, "tiny.jsonl")
        import_mib = None
        if not quick:
            _launch(["megalite.calibration.baseline", out], ranks, threads, folder, timeout)
            with open(out) as f:
                import_mib = float(json.load(f)["peak_mib"])
        argv = tiny_argv(1, ranks)   # micro-batch 1, one per rank: data parallel over the ranks
        argv[argv.index("--train-iters") + 1] = "3" if quick else "6"
        _launch(["megalite.train"] + argv + ["--log-json", log], ranks, threads, folder, timeout)
        with open(log) as f:
            step_mib = max(json.loads(line)["peak_memory_mb"] for line in f if line.strip())
    model, parallel, optimizer, _data, training = parse_args(argv, world_size=ranks)
    model_only = from_calibration({k: v for k, v in document.items() if k != "runtime_baseline"})   # no baseline yet
    tiny = predict(model, parallel, training, optimizer, model_only, ranks).memory_gb_per_gpu * 1024
    return {"import_mib": import_mib, "step_mib": step_mib, "mib": step_mib - tiny}


if __name__ == "__main__":
    _rank_main(sys.argv[1])
