"""Long context on this machine: peak memory per rank and tokens/s against sequence length, at
context-parallel sizes 1, 2 and 4 and each ``--cp-comm-type``.

    python -m benchmarks.long_context                          # 2k .. 16k, CP 1/2/4, every type
    python -m benchmarks.long_context --seq 8192 --cp 2 --types p2p all_gather a2a --steps 2
    python -m benchmarks.long_context --quick                  # tiny, seconds: the smoke run of the suite
    python -m benchmarks.long_context --plot memory.png        # also memory against sequence length

Each configuration runs megalite's real training path (``setup`` + ``train_step``, mock data,
fp32, dropout off) on forked gloo ranks.  Memory is the kernel's peak resident set of each rank
during the steps (Linux: ``VmHWM``, reset just before the first step) minus that rank's resident
memory just before it: gradients, optimizer state and every activation the steps need, the
parameters and imported libraries excluded.  Step time is the median over the steps after the
first.  The ratio column is the largest rank's memory (or the tokens/s) over one rank's at the
same sequence length.

Run as a command, the benchmark restarts itself with glibc's mmap threshold fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_``; ``--default-malloc`` keeps glibc's default): by default glibc raises the
threshold after large frees and then serves big tensors from its heap, which keeps freed memory
resident, so the resident peak depends on the order of allocations more than on what is alive.
Measured at 2,048 tokens (this machine): one rank 853 MiB with the default, 685 MiB fixed; CP=2
all_gather 593 against 372 MiB.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

from megalite.calibration.allocator import ENV as MALLOC_ENV

MODEL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--vocab-size", "1024",
         "--position-embedding-type", "rope",
         "--make-vocab-size-divisible-by", "128", "--hidden-dropout", "0", "--attention-dropout", "0"]
QUICK_MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--vocab-size", "128",
               "--make-vocab-size-divisible-by", "32", "--hidden-dropout", "0", "--attention-dropout", "0"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rank(rank: int, world_size: int, argv: List[str], steps: int) -> Dict[str, float]:
    os.environ["WORLD_SIZE"] = str(world_size)
    from megalite.parallel import state
    from megalite.training.loop import setup, train_step

    run = setup(argv)
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                # the peak restarts from the current resident set
        before = _status_kib("VmRSS")
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            train_step(run)
            times.append(time.perf_counter() - start)
        peak = _status_kib("VmHWM") - before
    finally:
        state.destroy_grid()
    return {"peak_mib": peak / 1024, "step_s": statistics.median(times[1:] or times)}


def measure(seq: int, cp: int, comm: str, steps: int, micro_batch: int, quick: bool) -> Dict[str, float]:
    from megalite.parallel.testing import run_on_ranks

    argv = (QUICK_MODEL if quick else MODEL) + [
        "--seq-length", str(seq), "--max-position-embeddings", str(seq), "--micro-batch-size", str(micro_batch),
        "--global-batch-size", str(micro_batch), "--mock-data", "--train-iters", str(steps), "--eval-iters", "0",
        "--lr-decay-style", "constant", "--log-interval", str(10 ** 6), "--context-parallel-size", str(cp),
        "--cp-comm-type", comm]
    ranks = run_on_ranks(_rank, cp, argv, steps, timeout=3600)
    step_s = max(r["step_s"] for r in ranks)
    return {"peak_mib": max(r["peak_mib"] for r in ranks), "step_s": step_s,
            "tokens_per_s": micro_batch * seq / step_s}


def table(rows: List[dict]) -> str:
    lines = [f"{'seq':>6} {'CP':>3} {'type':>10} {'peak MiB/rank':>14} {'x one rank':>10} {'tokens/s':>9} "
             f"{'x one rank':>10} {'step s':>7}"]
    base = {row["seq"]: row for row in rows if row["cp"] == 1}
    for row in rows:
        one = base.get(row["seq"])
        memory_ratio = f"{row['peak_mib'] / one['peak_mib']:.2f}" if one else "-"
        speed_ratio = f"{row['tokens_per_s'] / one['tokens_per_s']:.2f}" if one else "-"
        lines.append(f"{row['seq']:>6} {row['cp']:>3} {row['type']:>10} {row['peak_mib']:>14,.0f} {memory_ratio:>10} "
                     f"{row['tokens_per_s']:>9,.0f} {speed_ratio:>10} {row['step_s']:>7.2f}")
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> None:
    from megalite.extras import require
    pyplot = require("matplotlib.pyplot", "plot")
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for key in sorted({(row["cp"], row["type"]) for row in rows}):
        points = sorted((row["seq"], row["peak_mib"]) for row in rows if (row["cp"], row["type"]) == key)
        label = "one rank" if key[0] == 1 else f"CP={key[0]} {key[1]}"
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log", base=2)
    axes.set_xlabel("sequence length (tokens)")
    axes.set_ylabel("peak memory per rank (MiB)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--types", nargs="+", default=["p2p", "all_gather", "a2a"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny model and sequences (a smoke run)")
    parser.add_argument("--plot", help="write memory against sequence length to this PNG")
    parser.add_argument("--default-malloc", action="store_true",
                        help=f"keep glibc's dynamic mmap threshold (run as a command, {MALLOC_ENV} is set otherwise)")
    args = parser.parse_args(argv)
    seqs = [64, 128] if args.quick else args.seq
    rows = []
    for seq in seqs:
        for cp in args.cp:
            for comm in (["p2p"] if cp == 1 else args.types):
                result = measure(seq, cp, comm, args.steps, args.micro_batch_size, args.quick)
                rows.append({"seq": seq, "cp": cp, "type": "-" if cp == 1 else comm, **result})
                print(table(rows).splitlines()[-1], flush=True)
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    if MALLOC_ENV not in os.environ and "--default-malloc" not in sys.argv:
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.long_context"] + sys.argv[1:],
                  {**os.environ, MALLOC_ENV: str(64 * 1024)})
    main()
