"""Measure this machine for the performance model: GEMMs, memory bandwidth, collectives, the Adam step.

    python -m megalite.calibration.calibrate OUT.json [--ranks 2] [--quick]

writes the calibration file that ``hardware.from_calibration`` reads (``megalite-plan --gpu cpu
--calibration OUT.json``)::

    {"name": str, "peak_tflops": {"float32": f, "bfloat16": f},
     "matmul": [{"m": int, "n": int, "k": int, "dtype": "float32"|"bfloat16", "layout": "nn"|"nt"|"tn",
                 "tflops": f}, ...],
     "memory_bandwidth_gbs": f,
     "network": {"intra_node": {"bandwidth_gbs": f, "latency_us": f}, "inter_node": {...}},
     "gpus_per_node": int, "optimizer_bytes_per_s": f,
     "attention": [{"heads", "s", "d", "dtype", "forward_tflops", "backward_tflops"}, ...],
     "elementwise": [{"op", "dtype", "bytes", "forward_gbs", "backward_gbs"}, ...],
     "collectives": {name: [{"gap_s": f, "bandwidth_gbs": f, "latency_us": f}, ...], ...},
     "host_overhead": {"layer_s": f, "micro_batch_s": f, "step_s": f},
     "runtime_baseline": {"import_mib": f, "step_mib": f, "mib": f},
     "malloc_mmap_threshold": int | null}

plus what was measured to get there ("threads_per_rank", "samples": every collective timing).
What each figure is:

- GEMM: ``[m, k] x [k, n]`` timed (median of repeats) at ``2 m n k / t``, in each operand layout a
  linear layer runs (``x @ W^T`` forward, ``g @ W``, ``g^T @ x`` backward), its operands fetched
  from memory each call (``_cold_operands``); ``peak_tflops[dtype]`` is the best of the grid.
  The grid spans the shapes of small models' layers (tokens ``m`` = b*s,
  widths and head dimensions ``n``, ``k``), from 32 to 2048.
- Memory bandwidth: ``c = a + b`` over tensors far larger than the caches, ``3 x bytes / t`` (two
  reads, one write): what the model's memory-bound passes (norms, softmax, GELU) see.
- Network: all-reduce, all-gather, reduce-scatter, a send/recv pair and an all-to-all (the expert
  dispatch) over ``ranks`` forked gloo ranks on this machine, each at several sizes and each call
  after 2 ms, then 8 ms, of compute (as in a step: ``time_collectives``), fitted to the alpha-beta
  ring model of ``communication.py`` (``t = hops x alpha + bytes_factor x B / bw``, hops = 2(n-1),
  n-1, n-1, 1, n-1 and bytes_factor = 2(n-1)/n, (n-1)/n, (n-1)/n, 1, (n-1)/n) by least squares on
  relative error: all five together at 2 ms (``network``) and each alone at each gap
  (``collectives``, what the model uses).  One machine
  has one network: ``inter_node`` = ``intra_node``, ``gpus_per_node`` = ranks.
- Attention core and elementwise ops (``calibration/ops.py``): SDPA with megalite's head copies by
  (heads, s, d) and LayerNorm, GELU, the residual add and the cross-entropy by size, forward and
  backward, as effective rates on what ``compute.py`` counts for them.
- Host overhead (``calibration/overhead.py``): megalite's real training step at a vanishing width, split
  into a fixed cost per layer and micro-batch, per micro-batch and per step, less what the tables
  predict for the same runs.
- Runtime baseline (``calibration/baseline.py``): rank 0's peak resident set, measured as the sweep
  measures a run's, of ranks that only import the trainer and meet in a gloo group, and of
  megalite's own run at a vanishing width: the memory a CPU rank holds beside its model's bytes.
- Allocator: glibc's mmap threshold the measurements ran under (``MALLOC_MMAP_THRESHOLD_``; null: glibc's
  default, which raises it as blocks are freed): it changes both the peak resident set and what a step's
  allocations cost, so runs compared with the file share it (``calibration/allocator.py``).
- Optimizer: megalite's fused AdamW on fp32 pieces, in the bytes ``predict`` charges per state
  element (``32 + e``: gradient read, master, both moments read and written, the parameter copy)
  per second.

Every rank of a run on this machine shares its cores: the measurements run at
``threads_per_rank = cores // ranks`` torch threads, what each of ``ranks`` ranks gets when they run
at once (megalite's multi-rank runs here set one thread per rank on two cores).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from megalite.calibration.allocator import fix_threshold, threshold_from_env
from megalite.calibration.baseline import measure_runtime_baseline
from megalite.calibration.ops import measure_attention, measure_elementwise
from megalite.calibration.overhead import measure_overhead
from megalite.calibration.timing import median_seconds

__all__ = ["calibrate", "fit_alpha_beta", "COLLECTIVES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GEMM_SIZES = (32, 128, 256, 512, 1024, 2048)          # m, n and k each
GEMM_SIZES_QUICK = (32, 256)
GEMM_LAYOUTS = ("nn", "nt", "tn")   # compute.Gemm.layout: A @ B, A @ B^T, A^T @ B
GEMM_POOL_BYTES = 64 << 20          # the operands rotate through this much memory (_cold_operands)
MESSAGE_BYTES = (4 << 10, 64 << 10, 256 << 10, 1 << 20, 8 << 20)
MESSAGE_BYTES_QUICK = (4 << 10, 256 << 10)
# (seconds of compute before each timed collective, calls per chain): a step never calls them back to
# back, and the ranks drift apart the longer they compute (on a 2-core machine a 2 MiB all-reduce
# costs ~2.9 ms after 1 ms of GEMMs, ~3.9 ms after 8 to 32 ms); the model reads the fits in between.
COMPUTE_GAPS = ((0.002, 20), (0.008, 10))
CHAINS = 5              # chains of (compute, collective) per measurement; the median chain counts

# name -> (latency hops, bandwidth factor) for n ranks: the ring model of communication.py.
COLLECTIVES: Dict[str, Callable[[int], Tuple[float, float]]] = {
    "all_reduce": lambda n: (2.0 * (n - 1), 2.0 * (n - 1) / n),
    "all_gather": lambda n: (float(n - 1), (n - 1) / n),
    "reduce_scatter": lambda n: (float(n - 1), (n - 1) / n),
    "send_recv": lambda n: (1.0, 1.0),
    "all_to_all": lambda n: (float(n - 1), (n - 1) / n),   # the expert dispatch (B: what one rank sends)
}


def _cold_operands(layout: str, m: int, n: int, k: int,
                   pool: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """A function returning A [m, k] and B [k, n] laid out as ``layout`` says ("nt": B is a transposed
    [n, k], a linear layer's weight; "tn": A is a transposed [k, m], the tokens-major input of a
    weight gradient), each call the next slices of ``pool``: far larger than a core's private caches,
    so the operands come from memory, as a step's do (written by other ops, or last read a micro-batch
    ago).  Timed on one cached pair instead, a GEMM here runs ~10% faster than in a training step."""
    size = m * k + k * n
    slots = max(1, pool.numel() // size)
    calls = itertools.count()

    def operands():
        base = (next(calls) % slots) * size
        a, b = pool[base:base + m * k], pool[base + m * k:base + size]
        a = a.view(k, m).t() if layout == "tn" else a.view(m, k)
        b = b.view(n, k).t() if layout == "nt" else b.view(k, n)
        return a, b
    return operands


def measure_matmul(sizes: Sequence[int], min_time: float) -> List[dict]:
    rows = []
    for dtype_name, dtype in DTYPES.items():
        pool = torch.full((GEMM_POOL_BYTES * 8 // torch.finfo(dtype).bits,), 0.5, dtype=dtype)
        for layout in GEMM_LAYOUTS:
            for m in sizes:
                for n in sizes:
                    for k in sizes:
                        operands = _cold_operands(layout, m, n, k, pool)
                        seconds = median_seconds(lambda: torch.mm(*operands()), min_time)
                        rows.append({"m": m, "n": n, "k": k, "dtype": dtype_name, "layout": layout,
                                     "tflops": 2.0 * m * n * k / seconds / 1e12})
    return rows


def measure_memory_bandwidth(elements: int, min_time: float) -> float:
    """GB/s of ``c = a + b`` in fp32: two tensors read, one written."""
    a, b, c = torch.rand(elements), torch.rand(elements), torch.empty(elements)
    seconds = median_seconds(lambda: torch.add(a, b, out=c), min_time)
    return 3 * 4 * elements / seconds / 1e9


def measure_optimizer(elements: int, min_time: float) -> float:
    """Bytes of optimizer state per second of megalite's fused AdamW (fp32: 32 + 4 bytes per element)."""
    from megalite.optim.adam import adam_step

    params, grads = [torch.randn(elements)], [torch.randn(elements) * 1e-3]
    exp_avgs, exp_avg_sqs = [torch.zeros(elements)], [torch.zeros(elements)]
    step = [0]

    def one_step():
        step[0] += 1
        adam_step(params, grads, exp_avgs, exp_avg_sqs, step=step[0], lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.01)
    return (32 + 4) * elements / median_seconds(one_step, min_time)


def _step_work(seconds: float) -> Callable[[], None]:
    """A fixed amount of GEMM work taking about ``seconds`` on this rank, the same on every rank (the
    largest count any rank needs): as in a step, ranks do equal work, not equal time, so a collective
    after it also waits for the slower peer."""
    import torch.distributed as dist

    a = torch.ones(256, 256)
    torch.mm(a, a)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.mm(a, a)
    count = torch.tensor([max(1, round(seconds / ((time.perf_counter() - t0) / 10)))])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)

    def work():
        for _ in range(int(count)):
            torch.mm(a, a)
    return work


def time_collectives(rank: int, world_size: int, sizes: Sequence[int], repeats: int,
                     gap: float = COMPUTE_GAPS[0][0]) -> List[tuple]:
    """On each of ``world_size`` gloo ranks: (collective, bytes B of the ring model, seconds) per size,
    on the slowest rank (a collective ends when its last rank does).

    A step issues its collectives between stretches of compute, one after another with no barrier
    between them, and pays for each on average.  So each is timed the same way: a chain of
    ``repeats`` (compute of about ``gap`` seconds, then the call), its mean per call less that of the
    same chain without the calls, the median of ``CHAINS`` chains.  That counts what calls timed
    back to back miss: the wake-up of gloo's threads, a peer arriving late (the ranks drift apart
    between synchronizations) and what the collective's threads take from the compute (on a 2-core
    machine, a 512 KiB all-reduce: ~0.8 ms back to back, ~1.6-2 ms in such a chain)."""
    import torch.distributed as dist

    from megalite.parallel.collectives import all_gather_into, reduce_scatter_into

    work = _step_work(gap)
    samples = []
    for nbytes in sizes:
        elements = max(world_size, nbytes // 4 // world_size * world_size)
        full, part = torch.ones(elements), torch.ones(elements // world_size)
        peer = rank ^ 1   # ranks pair up 0-1, 2-3, ...; an unpaired last rank sits the send/recv out

        def send_recv():
            if peer >= world_size:
                return
            if rank % 2 == 0:
                dist.send(full, peer)
                dist.recv(full, peer)
            else:
                dist.recv(full, peer)
                dist.send(full, peer)
        exchanged = torch.empty_like(full)
        ops = {"all_reduce": (lambda: dist.all_reduce(full)),
               "all_gather": (lambda: all_gather_into(full, part)),
               "reduce_scatter": (lambda: reduce_scatter_into(part, full)),
               "send_recv": send_recv,
               "all_to_all": (lambda: dist.all_to_all_single(exchanged, full))}
        def after_work(op: Callable[[], object]) -> float:
            op()
            chains = []
            for _ in range(CHAINS):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(repeats):
                    work()
                    op()
                chains.append((time.perf_counter() - t0) / repeats)
            return statistics.median(chains)
        work_alone = after_work(lambda: None)
        for name, op in ops.items():
            seconds = max(1e-6, after_work(op) - work_alone)
            if name == "send_recv":
                seconds /= 2   # a round trip: two one-way messages
            slowest = torch.tensor([seconds], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            samples.append((name, 4 * elements, float(slowest)))
    return samples


def fit_alpha_beta(samples: Sequence[tuple], n: int) -> Tuple[float, float]:
    """(bandwidth GB/s, latency us) minimizing sum(((hops alpha + factor B / bw) - t) / t)^2 over
    ``samples`` of (collective, B, t), collective a key of COLLECTIVES (its hops and factor at n ranks)."""
    # Weighted linear least squares in (alpha, 1/bw): rows (hops/t, factor B/t) against 1.
    s_aa = s_ab = s_bb = s_a = s_b = 0.0
    for name, nbytes, seconds in samples:
        hops, factor = COLLECTIVES[name](n)
        x_a, x_b = hops / seconds, factor * nbytes / seconds
        s_aa, s_ab, s_bb, s_a, s_b = s_aa + x_a * x_a, s_ab + x_a * x_b, s_bb + x_b * x_b, s_a + x_a, s_b + x_b
    determinant = s_aa * s_bb - s_ab * s_ab
    alpha = (s_a * s_bb - s_b * s_ab) / determinant if determinant > 0 else 0.0
    inverse_bw = (s_b * s_aa - s_a * s_ab) / determinant if determinant > 0 else 0.0
    if alpha <= 0:          # latency not resolvable: a pure-bandwidth fit
        alpha, inverse_bw = 0.0, s_b / s_bb
    if inverse_bw <= 0:     # bandwidth not resolvable: a pure-latency fit
        alpha, inverse_bw = s_a / s_aa, 1e-12
    return 1.0 / inverse_bw / 1e9, alpha * 1e6


def calibrate(path: str, ranks: int = 2, quick: bool = False) -> dict:
    """Measure this machine, write the calibration JSON to ``path`` and return it.

    ``ranks``: gloo ranks of the collective measurements (and the ranks that share the cores);
    ``quick``: tiny sizes and short timings (seconds), for a test of the file, not for planning.
    """
    if ranks < 2:
        raise ValueError(f"--ranks {ranks}: collectives need at least 2 ranks")
    mmap_threshold = threshold_from_env()
    from megalite.parallel.testing import run_on_ranks

    cores = os.cpu_count() or 1
    threads = max(1, cores // ranks)
    min_time = 0.005 if quick else 0.05
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        matmul = measure_matmul(GEMM_SIZES_QUICK if quick else GEMM_SIZES, min_time)
        bandwidth = measure_memory_bandwidth((1 << 20) if quick else (32 << 20), min_time)
        optimizer = measure_optimizer((1 << 18) if quick else (8 << 20), min_time)
        attention = measure_attention(DTYPES, quick, min_time)
        elementwise = measure_elementwise(DTYPES, quick, min_time)
    finally:
        torch.set_num_threads(previous_threads)
    sizes = MESSAGE_BYTES_QUICK if quick else MESSAGE_BYTES
    by_gap = {gap: run_on_ranks(time_collectives, ranks, sizes, 3 if quick else repeats, gap, timeout=300)[0]
              for gap, repeats in COMPUTE_GAPS}
    network_bw, network_latency = fit_alpha_beta(by_gap[COMPUTE_GAPS[0][0]], ranks)
    per_collective = {name: [] for name in COLLECTIVES}
    for gap, samples in by_gap.items():
        for name in COLLECTIVES:
            bw, latency = fit_alpha_beta([s for s in samples if s[0] == name], ranks)
            per_collective[name].append({"gap_s": gap, "bandwidth_gbs": bw, "latency_us": latency})
    link = {"bandwidth_gbs": network_bw, "latency_us": network_latency}
    document = {
        "name": f"cpu: {platform.processor() or platform.machine()}, {cores} cores, {threads} thread(s) per rank",
        "peak_tflops": {dtype: max(r["tflops"] for r in matmul if r["dtype"] == dtype) for dtype in DTYPES},
        "matmul": matmul,
        "memory_bandwidth_gbs": bandwidth,
        "network": {"intra_node": dict(link), "inter_node": dict(link)},
        "gpus_per_node": ranks,
        "optimizer_bytes_per_s": optimizer,
        "attention": attention,
        "elementwise": elementwise,
        "threads_per_rank": threads,
        "collectives": per_collective,
        "samples": [{"collective": name, "gap_s": gap, "bytes": nbytes, "seconds": seconds}
                    for gap, samples in by_gap.items() for name, nbytes, seconds in samples],
        "torch": torch.__version__,
        "malloc_mmap_threshold": mmap_threshold,
    }
    document["host_overhead"] = measure_overhead(document, quick)
    document["runtime_baseline"] = measure_runtime_baseline(document, ranks, quick)
    _check_positive(document)
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
    return document


def _check_positive(document: dict) -> None:
    """A RuntimeError naming the first figures a calibration measured as zero, negative or not finite."""
    bad = [key for key in ("memory_bandwidth_gbs", "optimizer_bytes_per_s") if not document[key] > 0]
    bad += [f"matmul {r}" for r in document["matmul"] if not (r["tflops"] > 0 and math.isfinite(r["tflops"]))]
    bad += [f"{table} {r}" for table in ("attention", "elementwise") for r in document[table]
            if not all(v > 0 and math.isfinite(v) for k, v in r.items() if k.endswith(("tflops", "gbs")))]
    if bad:
        raise RuntimeError(f"calibration measured non-positive figures: {bad[:3]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Measure this machine for megalite's performance model.")
    parser.add_argument("path", help="the calibration JSON to write")
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks of the collective measurements")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds: checks the file, not the machine")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="fix glibc's mmap threshold while measuring, as MALLOC_MMAP_THRESHOLD_=BYTES would: the "
                             "runs planned with the file should run under the same setting (docs/scaling.md)")
    args = parser.parse_args(argv)
    try:
        if args.malloc_mmap_threshold is not None:
            fix_threshold(args.malloc_mmap_threshold)
        document = calibrate(args.path, args.ranks, args.quick)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    link = document["network"]["intra_node"]
    print(f"{document['name']}: peak {document['peak_tflops']['float32']:.3f} TFLOP/s fp32, "
          f"{document['peak_tflops']['bfloat16']:.3f} bf16; memory {document['memory_bandwidth_gbs']:.1f} GB/s; "
          f"gloo {link['bandwidth_gbs']:.2f} GB/s, {link['latency_us']:.0f} us; "
          f"Adam {document['optimizer_bytes_per_s'] / 1e9:.2f} GB/s -> {args.path}")


if __name__ == "__main__":
    main()
