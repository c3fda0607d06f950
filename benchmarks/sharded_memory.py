"""Sharded data parallelism on this machine: memory per rank and step time of ZeRO-1/2/3 against no sharding.

    python -m benchmarks.sharded_memory                     # 8 layers x 1024, DP=4, every strategy, fp32
    python -m benchmarks.sharded_memory --bf16              # bf16 parameters, fp32 masters and grads
    python -m benchmarks.sharded_memory --quick --dp 2      # tiny model, seconds: the smoke run of the suite

Each configuration (a strategy of ``--data-parallel-sharding-strategy``, and ZeRO-3 once more with
``--overlap-param-gather``) runs megalite's real training path -- ``megalite.training.loop.setup`` with
Megatron flags, then ``train_step`` (mock data, dropout off) -- on DP freshly forked gloo ranks, so that no
configuration's memory mixes with another's.  Per rank:

- resident: glibc's bytes in use (``mallinfo2``: ``uordblks``, the heap's allocated chunks, plus ``hblkhd``,
  the mmapped ones) after the warm-up steps, minus the same figure just before ``setup``: parameters,
  gradients, masters and Adam moments as the allocator holds them between steps, plus whatever else the run
  keeps (the mock data set, the groups' buffers: the ``other`` column, resident less ``optimizer.memory_bytes()``).
- peak: the kernel's peak resident set of the process during one step (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the step) minus its resident set just before ``setup``.  Each rank
  sets glibc's mmap threshold to 64 KiB first (``mallopt``; the threshold no longer moves after large
  frees), so every tensor over 64 KiB is its own mapping, given back to the kernel when freed: the resident
  set then follows what is alive, not the history of the heap.
- step: the median wall time of the measured steps (the slowest rank's).  busy: the CPU time (user + system,
  every thread: compute, gloo's threads, the kernel's copies through loopback sockets) of all ranks in a
  step over step x cores: near 1, the ranks kept every core busy, and no overlap can shorten the step.
- gather wait (ZeRO-3): seconds per step that the rank waits in the all-gathers of the parameters, timed
  around the ``wait()`` of each all-gather that parallel/param_gather.py launches.  Without prefetch a gather
  is waited for as soon as it is launched, so this is the all-gather time; with ``--overlap-param-gather``
  it is what compute did not hide.  ``hidden`` = 1 - (wait with prefetch) / (wait without).
- reduce wait: seconds per step the rank waits for the gradient collectives (all-reduce, or reduce-scatter
  into shards) that parallel/data_parallel.py launches, timed around each ``wait()``.  With ``--grad-overlap``
  ZeRO-1 runs once more with ``--overlap-grad-reduce`` (its buckets launched from the backward hooks instead
  of after backward): ``reduce hidden`` = 1 - (wait with) / (wait without).  ZeRO-2/3 always launch from the
  hooks.

Ratios: resident and peak over no_shard's, and ZeRO-2's resident over ZeRO-1's (the largest rank of each).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import time
from typing import Dict, List, Optional

from megalite.calibration.allocator import fix_threshold

MODEL = ["--num-layers", "8", "--hidden-size", "1024", "--num-attention-heads", "16", "--vocab-size", "8192",
         "--seq-length", "64", "--max-position-embeddings", "64"]
QUICK_MODEL = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--vocab-size", "512",
               "--seq-length", "16", "--max-position-embeddings", "16"]
STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
NAMES = {"no_shard": "no_shard", "optim": "ZeRO-1", "optim_grads": "ZeRO-2", "optim_grads_params": "ZeRO-3"}
MIB = 2 ** 20
CORES = len(os.sched_getaffinity(0))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc


def measurable() -> bool:
    """Whether this machine has what the benchmark reads: glibc >= 2.33 (mallinfo2) and Linux's peak-RSS reset."""
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2") and os.path.exists("/proc/self/clear_refs")
    except OSError:
        return False


def allocated_bytes() -> int:
    """glibc's bytes in use: allocated heap chunks of every arena plus mmapped chunks."""
    info = _libc().mallinfo2()
    return info.uordblks + info.hblkhd


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class GatherClock:
    """Seconds spent in the ``wait()`` of ZeRO-3's parameter all-gathers, and how many were launched."""

    def __init__(self):
        self.waited, self.launched = 0.0, 0

    def install(self) -> None:
        from megalite.parallel import param_gather
        launch = param_gather.all_gather_into
        clock = self

        class TimedWork:
            def __init__(self, work):
                self.work = work

            def wait(self):
                start = time.perf_counter()
                self.work.wait()
                clock.waited += time.perf_counter() - start

        def timed_all_gather(*args, **kwargs):
            clock.launched += 1
            work = launch(*args, **kwargs)
            return TimedWork(work) if work is not None else None
        param_gather.all_gather_into = timed_all_gather


class ReduceClock(GatherClock):
    """Seconds spent in the ``wait()`` of DDP's gradient collectives (data_parallel.py's all-reduce and
    reduce-scatter), and how many were launched."""

    def install(self) -> None:
        import torch.distributed as dist

        from megalite.parallel import data_parallel
        clock, reduce_scatter = self, data_parallel.reduce_scatter_into

        def timed(launch):
            def launch_timed(*args, **kwargs):
                work = launch(*args, **kwargs)
                if work is None:
                    return None
                clock.launched += 1
                return _TimedWork(work, clock)
            return launch_timed

        class _Dist:   # torch.distributed as data_parallel.py sees it, its all-reduce timed
            all_reduce = staticmethod(timed(dist.all_reduce))

            def __getattr__(self, name):
                return getattr(dist, name)
        data_parallel.reduce_scatter_into = timed(reduce_scatter)
        data_parallel.dist = _Dist()


class _TimedWork:
    def __init__(self, work, clock):
        self.work, self.clock = work, clock

    def wait(self):
        start = time.perf_counter()
        self.work.wait()
        self.clock.waited += time.perf_counter() - start


def _rank(rank: int, world_size: int, argv: List[str], warmup: int, steps: int) -> Dict[str, float]:
    os.environ["WORLD_SIZE"] = str(world_size)
    fix_threshold(64 * 1024)
    from megalite.parallel import state
    from megalite.training.loop import setup, train_step

    clock, reduce_clock = GatherClock(), ReduceClock()
    clock.install()
    reduce_clock.install()
    gc.collect()
    base_alloc, base_rss = allocated_bytes(), _status_bytes("VmRSS")
    run = setup(argv)
    try:
        for _ in range(warmup):
            train_step(run)
        gc.collect()
        resident = allocated_bytes() - base_alloc
        resident_rss = _status_bytes("VmRSS") - base_rss
        accounted = run.optimizer.memory_bytes()
        times, peaks, waits, launched, cpu, reduce_waits = [], [], [], [], [], []
        for _ in range(steps):
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                    # the peak restarts from the current resident set
            clock.waited, clock.launched, reduce_clock.waited = 0.0, 0, 0.0
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(run)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            peaks.append(_status_bytes("VmHWM") - base_rss)
            waits.append(clock.waited)
            launched.append(clock.launched)
            reduce_waits.append(reduce_clock.waited)
    finally:
        state.destroy_grid()
    model_state = sum(accounted[k] for k in ("params", "grads", "master", "adam"))
    return {"resident": resident, "resident_rss": resident_rss, "peak": max(peaks),
            "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "gather_wait_s": statistics.median(waits), "reduce_wait_s": statistics.median(reduce_waits),
            "gathers": max(launched), "accounted": model_state, "num_params": accounted["num_params"],
            **{f"accounted_{k}": accounted[k] for k in ("params", "grads", "master", "adam")}}


def flags(args, strategy: str, overlap: bool, grad_overlap: bool = False) -> List[str]:
    micro_batch = str(args.micro_batch_size)
    argv = (QUICK_MODEL if args.quick else MODEL) + [
        "--micro-batch-size", micro_batch, "--global-batch-size", str(args.micro_batch_size * args.dp),
        "--mock-data", "--train-iters", "1000", "--eval-iters", "0", "--lr-decay-style", "constant",
        "--log-interval", str(10 ** 6), "--hidden-dropout", "0", "--attention-dropout", "0",
        "--data-parallel-sharding-strategy", strategy]
    if args.bucket_size:
        argv += ["--ddp-bucket-size", str(args.bucket_size)]
    return argv + (["--overlap-param-gather"] if overlap else []) + (["--bf16"] if args.bf16 else []) + \
        (["--overlap-grad-reduce"] if grad_overlap else [])


def measure(args, strategy: str, overlap: bool, grad_overlap: bool = False) -> dict:
    from megalite.parallel.testing import run_on_ranks

    ranks = run_on_ranks(_rank, args.dp, flags(args, strategy, overlap, grad_overlap), args.warmup, args.steps,
                         timeout=3600)
    row = {key: max(r[key] for r in ranks) for key in ranks[0]}    # the largest rank of each figure
    row["cpu_s"] = sum(r["cpu_s"] for r in ranks)                  # but CPU time of every rank together
    return {"strategy": strategy, "overlap": overlap, "grad_overlap": grad_overlap, **row}


def _ratio(value: float, base: Optional[dict], key: str) -> str:
    return f"{value / base[key]:.2f}" if base and base[key] > 0 else "-"


def table(rows: List[dict]) -> str:
    base = next((r for r in rows if r["strategy"] == "no_shard"), None)
    lines = [f"{'strategy':<22} {'resident MiB':>12} {'x none':>6} {'accounted':>9} {'other':>6} {'B/param':>7} "
             f"{'peak MiB':>9} {'x none':>6} {'step s':>7} {'busy':>5} {'gathers':>7} {'wait s':>7} {'reduce s':>8}"]
    for row in rows:
        name = NAMES[row["strategy"]] + (" +overlap" if row["overlap"] else "") + \
            (" +grad overlap" if row.get("grad_overlap") else "")
        per_param = row["resident"] / row["num_params"]
        lines.append(
            f"{name:<22} {row['resident'] / MIB:>12,.1f} {_ratio(row['resident'], base, 'resident'):>6} "
            f"{row['accounted'] / MIB:>9,.1f} {(row['resident'] - row['accounted']) / MIB:>6,.1f} {per_param:>7.2f} "
            f"{row['peak'] / MIB:>9,.1f} {_ratio(row['peak'], base, 'peak'):>6} {row['step_s']:>7.3f} "
            f"{row['cpu_s'] / (row['step_s'] * CORES):>5.2f} "
            f"{row['gathers']:>7} {row['gather_wait_s']:>7.3f} {row['reduce_wait_s']:>8.3f}")
    return "\n".join(lines)


def summary(rows: List[dict]) -> Dict[str, float]:
    """The ratios the targets name (those whose rows were measured)."""
    plain = {r["strategy"]: r for r in rows if not r["overlap"] and not r.get("grad_overlap")}
    out = {}
    if "optim" in plain and "optim_grads" in plain:
        out["zero2_over_zero1_resident"] = plain["optim_grads"]["resident"] / plain["optim"]["resident"]
    if "no_shard" in plain and "optim_grads_params" in plain:
        out["zero3_over_none_resident"] = plain["optim_grads_params"]["resident"] / plain["no_shard"]["resident"]
        out["zero3_over_none_peak"] = plain["optim_grads_params"]["peak"] / plain["no_shard"]["peak"]
    grad = next((r for r in rows if r.get("grad_overlap")), None)
    if grad and grad["strategy"] in plain and plain[grad["strategy"]]["reduce_wait_s"] > 0:
        out["reduce_wait_hidden"] = 1 - grad["reduce_wait_s"] / plain[grad["strategy"]]["reduce_wait_s"]
    overlapped = next((r for r in rows if r["overlap"]), None)
    if overlapped and "optim_grads_params" in plain and plain["optim_grads_params"]["gather_wait_s"] > 0:
        out["gather_wait_hidden"] = 1 - overlapped["gather_wait_s"] / plain["optim_grads_params"]["gather_wait_s"]
    return out


# -- can gloo's all-gather run behind compute here? ------------------------------------------------------------
def _probe_rank(rank: int, world_size: int, numel: int, repeats: int) -> Dict[str, float]:
    """One all-gather of ``numel`` elements alone, a matmul loop alone, then the loop while the all-gather runs."""
    import torch
    import torch.distributed as dist

    from megalite.parallel.collectives import all_gather_into

    shard, whole = torch.randn(numel // world_size), torch.empty(numel)
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)

    def timed(comm: bool, compute: int) -> tuple:
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        work = all_gather_into(whole, shard, async_op=True) if comm else None
        for _ in range(compute):
            torch.mm(a, b)
        if work is not None:
            work.wait()
        return time.perf_counter() - start, time.process_time() - start_cpu

    timed(True, 1)                                           # warm-up: connections, first touch
    comm = min((timed(True, 0) for _ in range(repeats)), key=lambda t: t[0])
    per_mm = min(timed(False, 10)[0] for _ in range(repeats)) / 10
    loops = max(1, round(comm[0] / per_mm))                  # compute about as long as the all-gather
    compute = min((timed(False, loops) for _ in range(repeats)), key=lambda t: t[0])
    both = min((timed(True, loops) for _ in range(repeats)), key=lambda t: t[0])
    return {"comm_s": comm[0], "comm_cpu_s": comm[1], "compute_s": compute[0], "both_s": both[0]}


def probe(world_size: int, numel: int, repeats: int = 3) -> Dict[str, float]:
    """hidden: the share of the shorter of (all-gather, compute) that running them together saved."""
    from megalite.parallel.testing import run_on_ranks

    ranks = run_on_ranks(_probe_rank, world_size, numel, repeats, timeout=3600)
    row = {key: max(r[key] for r in ranks) for key in ranks[0]}
    row["comm_cpu_s"] = sum(r["comm_cpu_s"] for r in ranks)
    saved = row["comm_s"] + row["compute_s"] - row["both_s"]
    row["hidden"] = saved / min(row["comm_s"], row["compute_s"])
    print(f"probe: all-gather of {numel * 4 / MIB:,.0f} MiB over {world_size} gloo ranks alone {row['comm_s']:.3f} s "
          f"(CPU of all ranks {row['comm_cpu_s']:.3f} s = {row['comm_cpu_s'] / (row['comm_s'] * CORES):.2f} of "
          f"{CORES} cores); matmuls alone {row['compute_s']:.3f} s; both at once {row['both_s']:.3f} s: "
          f"{row['hidden']:.0%} of the shorter hidden", flush=True)
    return row


def machine_load() -> str:
    """The load average and, where the kernel reports it, the share of time some task waited for a CPU: the
    step times and overlap figures are only this machine's when nothing else runs on it."""
    line = f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {CORES} cores"
    if os.path.exists("/proc/pressure/cpu"):
        with open("/proc/pressure/cpu") as f:
            line += f"; CPU pressure (some, avg60) {f.readline().split()[2].split('=')[1]}%"
    return line


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dp", type=int, default=4, help="data-parallel ranks (gloo, forked)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--no-overlap", action="store_true", help="skip ZeRO-3 with --overlap-param-gather")
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters (fp32 masters and gradients)")
    parser.add_argument("--grad-overlap", action="store_true",
                        help="also ZeRO-1 with --overlap-grad-reduce (the gradient reductions' hidden share)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--bucket-size", type=int, help="--ddp-bucket-size (default megalite's)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before anything is measured")
    parser.add_argument("--steps", type=int, default=3, help="measured steps")
    parser.add_argument("--quick", action="store_true", help="tiny model (a smoke run)")
    parser.add_argument("--probe-mib", type=float, default=0.0,
                        help="also time an all-gather of this many MiB alone, beside matmuls, and both at once")
    args = parser.parse_args(argv)
    configs = [(s, False, False) for s in args.strategies]
    if "optim_grads_params" in args.strategies and not args.no_overlap:
        configs.append(("optim_grads_params", True, False))
    if args.grad_overlap and "optim" in args.strategies:
        configs.append(("optim", False, True))
    print(f"# DP={args.dp} {'bf16' if args.bf16 else 'fp32'} {' '.join(QUICK_MODEL if args.quick else MODEL)} "
          f"--micro-batch-size {args.micro_batch_size}", flush=True)
    print(f"# before: {machine_load()}", flush=True)
    rows = []
    for strategy, overlap, grad_overlap in configs:
        rows.append(measure(args, strategy, overlap, grad_overlap))
        print(table(rows).splitlines()[-1], flush=True)
    print(table(rows))
    print(f"# after: {machine_load()}")
    ratios = summary(rows)
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    if args.probe_mib:
        ratios["probe_hidden"] = probe(args.dp, int(args.probe_mib * MIB / 4) // args.dp * args.dp)["hidden"]
    return {"rows": rows, "summary": ratios}


if __name__ == "__main__":
    main()
