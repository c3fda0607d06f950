"""The CUDA LayerNorm / RMSNorm backward in its parts, beside PyTorch's backward: each kernel's device
time per call from the profiler, so a change to one part (the row kernel, the dweight/dbias reduction)
is seen on its own.  CUDA only; on a machine without a device it says so and exits 0.

    python -m benchmarks.norm_backward_parts                  # hidden 768, 4096 and 6144, bf16
    python -m benchmarks.norm_backward_parts --rows 16384 --hidden 1024 --dtype float32

ratio = PyTorch's backward time / megalite's (> 1: megalite is faster).
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn.functional as F

from megalite.ops import layer_norm, rms_norm

PARTS = (("cached_backward_kernel", "row kernel"), ("cached_weight_grad_final_kernel", "dweight/dbias reduction"))


def parts_of(events: Iterable[Tuple[str, float]], calls: int) -> Dict[str, float]:
    """Microseconds per call of each megalite backward part, and of everything else ("other"), from
    (kernel name, device microseconds) pairs of ``calls`` backward calls."""
    totals: Dict[str, float] = defaultdict(float)
    for name, micros in events:
        part = next((label for key, label in PARTS if key in name), "other")
        totals[part] += micros
    return {part: total / calls for part, total in totals.items()}


def _device_events(fn, calls: int) -> List[Tuple[str, float]]:
    """(kernel name, device microseconds) of fn's kernels over `calls` calls.  Only device-side events:
    a host-side event (an operator, a runtime call) carries the time of the kernels it launched too,
    and summing it with them would count those kernels twice."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return [(e.key, e.self_device_time_total) for e in prof.key_averages()
            if getattr(e, "device_type", None) == DeviceType.CUDA and e.self_device_time_total > 0]


def measure(rows: int, hidden: int, dtype: torch.dtype, rms: bool, calls: int) -> Dict[str, float]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to("cuda", dtype).requires_grad_()
    dy = torch.randn(rows, hidden, generator=gen).to("cuda", dtype)
    weight = torch.randn(hidden, generator=gen).to("cuda", dtype).requires_grad_()
    bias = torch.randn(hidden, generator=gen).to("cuda", dtype).requires_grad_()
    ours_y = rms_norm(x, weight, 1e-5) if rms else layer_norm(x, weight, bias, 1e-5)
    peer_y = F.rms_norm(x, (hidden,), weight, 1e-5) if rms else F.layer_norm(x, (hidden,), weight, bias, 1e-5)
    inputs = [x, weight] if rms else [x, weight, bias]
    ours = parts_of(_device_events(lambda: torch.autograd.grad(ours_y, inputs, dy, retain_graph=True), calls), calls)
    peer = parts_of(_device_events(lambda: torch.autograd.grad(peer_y, inputs, dy, retain_graph=True), calls), calls)
    ours["total"] = sum(ours.values())
    ours["PyTorch backward"] = sum(peer.values())
    return ours


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--hidden", type=int, nargs="+", default=[768, 4096, 6144])
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the norm backward's parts are CUDA kernels; nothing measured")
        return 0
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; [{args.rows}, h] {args.dtype}, "
          f"device us per backward call, {args.calls} calls")
    print(f"{'norm':8s} {'hidden':>6s} {'row kernel':>11s} {'reduction':>10s} {'other':>8s} {'total':>8s} "
          f"{'PyTorch':>8s} {'ratio':>6s}")
    for rms in (False, True):
        for hidden in args.hidden:
            t = measure(args.rows, hidden, getattr(torch, args.dtype), rms, args.calls)
            print(f"{'RMSNorm' if rms else 'LayerNorm':8s} {hidden:6d} {t.get('row kernel', 0):11.1f} "
                  f"{t.get('dweight/dbias reduction', 0):10.1f} {t.get('other', 0):8.1f} {t['total']:8.1f} "
                  f"{t['PyTorch backward']:8.1f} {t['PyTorch backward'] / t['total']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
