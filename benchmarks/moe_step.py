"""Mixture of experts on this machine: an MoE model's training step against the dense model of equal active
parameters, the experts' memory per rank over expert parallelism, and the grouped GEMM against the loop.

    python -m benchmarks.moe_step                        # all three parts
    python -m benchmarks.moe_step --parts experts        # one part: step, memory or experts
    python -m benchmarks.moe_step --quick                # tiny, seconds: the smoke run of the suite

step.  megalite's real training path (``setup`` + ``train_step``, mock data, fp32, dropout off) on one CPU
rank: the MoE model (``--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size f``, balancing loss on)
with and without ``--moe-grouped-gemm``, and the dense model whose MLP has ``--ffn-hidden-size`` k f, the
same attention and the same tokens.  Its MLP then has the active parameters of the k experts a token uses
(Megatron-LM's count of active parameters: each token's k experts plus the router's E h).  Each contender
runs in its own forked process, in alternating rounds; the step time is the process's CPU time for the step
(one thread, so other processes' load does not count), the median over every round's timed steps (the
warm-up step untimed).  Ratio: the step time over the dense model's.

memory.  The same MoE model on 4 gloo ranks (DP 4) at EP 1, 2 and 4: what the experts keep between steps on
each rank (parameters, gradients, Adam moments).  From the allocator: the rank's resident set after setup and
one step, less before setup, minus the same for the model with experts of width 1 (everything else equal),
so the difference is the experts' state.  Cross-checked with the optimizer's own count
(``optimizer.memory_bytes()``, the same difference) and with expert parameters x 16 bytes (fp32 parameter,
gradient and two Adam moments).  Each rank fixes glibc's mmap threshold at 64 KiB (``mallopt``; by default
glibc raises it after large frees and keeps later tensors in its heap: benchmarks/long_context.py) and calls
``malloc_trim`` before reading its resident set, so that freed tensors have left it (glibc, Linux).

experts.  megalite's ``Experts`` module alone (GELU, fp32 on the CPU, bf16 on CUDA): forward + backward of
E x t rows (t tokens per expert on average, experts drawn uniformly, so some get more and some none) through
the grouped path (``--moe-grouped-gemm``: ``torch._grouped_mm``) and the per-expert loop, timed in
alternating rounds (benchmarks/side_by_side.py; CPU time on the CPU, wall time on CUDA), medians; ratio
grouped / loop (below 1: grouped faster).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import time
from typing import Dict, List, Optional

from benchmarks.side_by_side import alternating
from megalite.calibration.allocator import fix_threshold

EXPERTS = ["--num-experts", "8", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2"]
# (model flags, micro-batch, expert width f) of the full and the quick run.
SHAPES = {
    "full": (["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "256",
              "--max-position-embeddings", "256", "--vocab-size", "1024"], 4, 512),
    "quick": (["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
               "--max-position-embeddings", "32", "--vocab-size", "128"], 2, 256),
}
COMMON = ["--make-vocab-size-divisible-by", "32", "--hidden-dropout", "0", "--attention-dropout", "0",
          "--disable-bias-linear", "--mock-data", "--eval-iters", "0", "--lr-decay-style", "constant",
          "--log-interval", str(10 ** 6), "--train-iters", "1000"]


def machine(threads: int) -> str:
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no accelerator"
    return (f"machine: {platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), {device}, "
            f"torch {torch.__version__}; ranks 1 thread each, experts part {threads}")


def _resident_bytes(libc) -> int:
    """This process's resident set once freed memory is back with the kernel (glibc's malloc_trim returns the
    free pages inside its heap too)."""
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def model_argv(shape: str, kind: str, ep: int = 1, dp: int = 1, expert_width: Optional[int] = None) -> List[str]:
    """Flags of ``kind``: dense (MLP width k f), moe or moe-grouped (experts of width f, or ``expert_width``), for
    ``dp`` data-parallel ranks (a micro-batch each) of which groups of ``ep`` split the experts."""
    flags, micro_batch, width = SHAPES[shape]
    argv = flags + COMMON + ["--micro-batch-size", str(micro_batch), "--global-batch-size", str(micro_batch * dp)]
    if kind == "dense":
        return argv + ["--ffn-hidden-size", str(2 * width)]
    argv = argv + EXPERTS + ["--moe-ffn-hidden-size", str(expert_width or width), "--expert-model-parallel-size",
                             str(ep), "--moe-token-dispatcher-type", "alltoall"]
    return argv + (["--moe-grouped-gemm"] if kind == "moe-grouped" else [])


# -- (a) the step ------------------------------------------------------------------------------------
def _active_params(model, topk: int, num_experts: int) -> int:
    from megalite.parallel.param_info import param_info
    total = 0
    for param in model.parameters():
        total += param.numel() * topk // num_experts if param_info(param).expert_parallel else param.numel()
    return total


def _step_rank(rank: int, world_size: int, argv: List[str], warmup: int, steps: int) -> Dict[str, object]:
    os.environ["WORLD_SIZE"] = str(world_size)
    from megalite.parallel import state
    from megalite.training.loop import setup, train_step

    run = setup(argv)
    try:
        for _ in range(warmup):
            train_step(run)
        times = []
        for _ in range(steps):
            start = time.process_time()
            train_step(run)
            times.append(time.process_time() - start)
        cfg = run.model_cfg
        active = _active_params(run.model[0], cfg.moe_router_topk, cfg.num_experts or 1)
    finally:
        state.destroy_grid()
    return {"times": times, "active": active}


def measure_step(shape: str, rounds: int, warmup: int, steps: int) -> List[dict]:
    import megalite.training.loop  # noqa: F401 - imported once here, not in every forked rank
    from megalite.parallel.testing import run_on_ranks

    flags, micro_batch, _ = SHAPES[shape]
    tokens = micro_batch * int(flags[flags.index("--seq-length") + 1])
    kinds = ["dense", "moe", "moe-grouped"]
    times: Dict[str, List[float]] = {kind: [] for kind in kinds}
    active = {}
    for _ in range(rounds):
        for kind in kinds:
            result = run_on_ranks(_step_rank, 1, model_argv(shape, kind), warmup, steps, timeout=3600)[0]
            times[kind] += result["times"]
            active[kind] = result["active"]
    rows = []
    for kind in kinds:
        step_s = statistics.median(times[kind])
        rows.append({"model": kind, "active_params": active[kind], "step_s": step_s, "tokens_per_s": tokens / step_s})
    for row in rows:
        row["ratio"] = row["step_s"] / rows[0]["step_s"]
    return rows


def step_table(rows: List[dict]) -> str:
    lines = [f"{'model':>12} {'active params':>14} {'step ms':>9} {'tokens/s':>9} {'x dense':>8}"]
    for row in rows:
        lines.append(f"{row['model']:>12} {row['active_params']:>14,} {row['step_s'] * 1e3:>9.1f} "
                     f"{row['tokens_per_s']:>9,.0f} {row['ratio']:>8.2f}")
    return "\n".join(lines)


# -- (b) the experts' memory per rank -------------------------------------------------------------------
def _memory_rank(rank: int, world_size: int, argv: List[str]) -> Dict[str, float]:
    os.environ["WORLD_SIZE"] = str(world_size)
    from megalite.parallel import state
    from megalite.parallel.param_info import param_info
    from megalite.training.loop import setup, train_step

    fix_threshold(64 * 1024)
    libc = ctypes.CDLL(None)
    before = _resident_bytes(libc)
    run = setup(argv)
    try:
        train_step(run)                     # gradients and Adam moments now written, activations freed
        resident = _resident_bytes(libc) - before
        counted = run.optimizer.memory_bytes()
        expert_params = sum(p.numel() for chunk in run.model for p in chunk.parameters()
                            if param_info(p).expert_parallel)
    finally:
        state.destroy_grid()
    return {"resident": resident, "optimizer": counted["params"] + counted["grads"] + counted["master"]
            + counted["adam"], "expert_params": expert_params}


def measure_memory(shape: str, eps: List[int], ranks: int) -> List[dict]:
    """Per EP: the experts' bytes on the largest rank, three ways (module docstring)."""
    import megalite.training.loop  # noqa: F401 - imported once here, not in every forked rank
    from megalite.parallel.testing import run_on_ranks

    width = SHAPES[shape][2]
    rows = []
    for ep in eps:
        full, narrow = (run_on_ranks(_memory_rank, ranks, model_argv(shape, "moe", ep, ranks, expert_width),
                                     timeout=3600) for expert_width in (width, 1))
        experts = [{key: f[key] - n[key] for key in f} for f, n in zip(full, narrow)]
        rows.append({"ep": ep, "expert_dp": ranks // ep,
                     "allocator": max(e["resident"] for e in experts),
                     "optimizer": max(e["optimizer"] for e in experts),
                     "counted": 16 * max(e["expert_params"] for e in experts)})
    for row in rows:
        row["ratio"] = row["allocator"] / rows[0]["allocator"]
    return rows


def memory_table(rows: List[dict]) -> str:
    mib = 2 ** 20
    lines = [f"{'EP':>3} {'expert DP':>9} {'allocator MiB':>14} {'memory_bytes MiB':>17} {'16 B/param MiB':>15} "
             f"{'x EP=1':>7}"]
    for row in rows:
        lines.append(f"{row['ep']:>3} {row['expert_dp']:>9} {row['allocator'] / mib:>14.2f} "
                     f"{row['optimizer'] / mib:>17.2f} {row['counted'] / mib:>15.2f} {row['ratio']:>7.2f}")
    return "\n".join(lines)


# -- (c) the experts alone: grouped GEMM against the loop ----------------------------------------------------
def measure_experts(num_experts: List[int], tokens_per_expert: List[int], hidden: int, width: int,
                    rounds: int) -> List[dict]:
    import torch

    from megalite.config.settings import ModelConfig
    from megalite.model.moe.experts import Experts

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    rows = []
    for experts in num_experts:
        config = ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1, add_bias_linear=False,
                             num_experts=experts, moe_ffn_hidden_size=width, moe_grouped_gemm=True)
        torch.manual_seed(0)
        module = Experts(config, output_init_std=0.02)
        for weight in module.parameters():      # new_parameter leaves them empty: the model draws them
            torch.nn.init.normal_(weight, std=0.02)
        module = module.to(device, dtype)
        for per_expert in tokens_per_expert:
            choice = torch.randint(0, experts, (experts * per_expert,), generator=torch.Generator().manual_seed(1))
            counts = torch.bincount(choice, minlength=experts).to(device)
            rows_in = torch.randn(experts * per_expert, hidden, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(rows_in)

            def step(fused: bool):
                module.fused = fused
                module(rows_in, counts).backward(grad)
            grouped_s, loop_s = alternating([lambda: step(True), lambda: step(False)], rounds, warmup=1,
                                            synchronize=synchronize, clock=clock)
            rows.append({"experts": experts, "tokens_per_expert": per_expert, "grouped_s": grouped_s,
                         "loop_s": loop_s, "ratio": grouped_s / loop_s, "empty": int((counts == 0).sum())})
    return rows


def experts_table(rows: List[dict]) -> str:
    lines = [f"{'E':>3} {'tokens/expert':>13} {'empty':>5} {'grouped ms':>11} {'loop ms':>9} {'grouped/loop':>12}"]
    for row in rows:
        lines.append(f"{row['experts']:>3} {row['tokens_per_expert']:>13} {row['empty']:>5} "
                     f"{row['grouped_s'] * 1e3:>11.2f} {row['loop_s'] * 1e3:>9.2f} {row['ratio']:>12.2f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, List[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["step", "memory", "experts"],
                        default=["step", "memory", "experts"])
    parser.add_argument("--rounds", type=int, default=3, help="step: rounds of every contender")
    parser.add_argument("--steps", type=int, default=3, help="step: timed steps per round (after one warm-up)")
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4], help="memory: expert-parallel sizes")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="experts: E")
    parser.add_argument("--tokens-per-expert", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--expert-rounds", type=int, default=7, help="experts: timed rounds of each path")
    parser.add_argument("--threads", type=int, default=1, help="experts: torch threads (each rank of the other "
                        "parts runs one)")
    parser.add_argument("--quick", action="store_true", help="tiny model and shapes (a smoke run)")
    args = parser.parse_args(argv)
    shape = "quick" if args.quick else "full"
    print(machine(args.threads), flush=True)
    results: Dict[str, List[dict]] = {}
    if "step" in args.parts:
        results["step"] = measure_step(shape, 1 if args.quick else args.rounds, 1, 2 if args.quick else args.steps)
        print(step_table(results["step"]), flush=True)
    if "memory" in args.parts:
        results["memory"] = measure_memory(shape, args.ep, 4)
        print(memory_table(results["memory"]), flush=True)
    if "experts" in args.parts:
        import torch
        torch.set_num_threads(args.threads)
        hidden, width = (32, 64) if args.quick else (256, 512)
        per_expert = [4, 16] if args.quick else args.tokens_per_expert
        results["experts"] = measure_experts(args.experts, per_expert, hidden, width, 3 if args.quick
                                             else args.expert_rounds)
        print(experts_table(results["experts"]), flush=True)
    return results


if __name__ == "__main__":
    main()
