"""Where a megalite training step spends its device time: a torch.profiler table of the top kernels.

    python -m benchmarks.profile_step                       # LLaMA ~0.85B, bf16, on CUDA
    python -m benchmarks.profile_step --models gpt2 --compile
    python -m benchmarks.profile_step --quick               # toy shapes, fp32: a smoke run on a CPU

The model shapes are benchmarks/train_throughput.py's.  After --warmup untimed steps (compilation
happens there with --compile), --steps steps run under torch.profiler; the table lists the kernels
(CUDA) or operators (CPU) with the most self time, each with its share of the total, then the same
time summed by kind (matrix multiply, attention, norm, optimizer, copy/cast/cat, reduction,
elementwise, cross-entropy, other) -- the rollup a before/after comparison reads first.  The kinds are matched on
kernel names, which differ between torch versions and libraries: "other" collects what no pattern
names, so the shares always add up to 100%.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

from benchmarks.train_throughput import megalite_argv

# (kind, pattern on the lower-cased kernel/operator name), first match wins.
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|sdp)"),
    ("matrix multiply", r"gemm|matmul|mm\b|aten::mm|aten::bmm|aten::addmm|cutlass|nvjet|sm\d+_xmma|ampere_|hopper_"),
    ("optimizer", r"adam|multi_tensor|_foreach"),
    ("norm", r"norm"),
    ("cross-entropy", r"cross_entropy|log_softmax|nll_loss|softmax"),
    ("copy/cast/cat", r"copy|\bcat|stack|contiguous|aten::to\b|_to_copy|unbind|cast|clone"),
    ("reduction", r"reduce|aten::sum|aten::max|aten::mean"),
    ("elementwise", r"elementwise|vectorized|mul|add|sub|silu|gelu|sigmoid|neg|sin|cos|exp|pow|sqrt|div|fill|where|"
                    r"triton_"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def profile(argv, warmup: int, steps: int, top: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from megalite.training.loop import setup, train_step
    run = setup(argv)
    on_cuda = run.device.type == "cuda"
    for _ in range(warmup):
        train_step(run)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(run)
        if on_cuda:
            torch.cuda.synchronize(run.device)
    if on_cuda:   # kernels: device-side events only
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        self_us = {e.key: e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
                   for e in events}
        counts = {e.key: e.count for e in events}
    else:         # operators: self CPU time of torch's and megalite's operators
        events = [e for e in prof.key_averages() if e.key.startswith(("aten::", "megalite::"))]
        self_us = {e.key: e.self_cpu_time_total for e in events}
        counts = {e.key: e.count for e in events}
    total = sum(self_us.values()) or 1.0
    where = "GPU kernel" if on_cuda else "CPU operator"
    lines = [f"{steps} steps, {total / 1e3:.1f} ms of {where} self time ({total / 1e3 / steps:.1f} ms per step)",
             f"{'share':>6}  {'ms':>9}  {'calls':>6}  kind              name"]
    for name, us in sorted(self_us.items(), key=lambda item: -item[1])[:top]:
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"{100 * us / total:5.1f}%  {us / 1e3:9.2f}  {counts[name]:6d}  {kind_of(name):16s}  {short}")
    by_kind = defaultdict(float)
    for name, us in self_us.items():
        by_kind[kind_of(name)] += us
    lines.append("by kind: " + ", ".join(f"{kind} {100 * us / total:.1f}%"
                                          for kind, us in sorted(by_kind.items(), key=lambda item: -item[1])))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama", help="comma-separated: gpt2, llama")
    parser.add_argument("--compile", action="store_true", help="megalite with --compile (inductor per layer)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 5 with --compile)")
    parser.add_argument("--top", type=int, default=25, help="rows of the table")
    parser.add_argument("--quick", action="store_true", help="toy shapes in fp32: a smoke run")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (5 if args.compile else 3)

    import torch
    bf16 = not args.quick or torch.cuda.is_available()
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        flags = megalite_argv(model, args.quick, warmup + args.steps, bf16) + (["--compile"] if args.compile else [])
        print(f"== {model}{' --compile' if args.compile else ''}, {'bf16' if bf16 else 'fp32'}, "
              f"torch {torch.__version__}")
        print(profile(flags, warmup, args.steps, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
