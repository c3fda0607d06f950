"""megalite's fused kernels against PyTorch's own, side by side in one process.

    python -m benchmarks.kernel_speed                 # CPU (2 threads), and CUDA when present
    python -m benchmarks.kernel_speed --device cpu --threads 2 --repeats 7
    python -m benchmarks.kernel_speed --quick         # 3 timed rounds, 1 warm-up: a smoke run, ~1 minute on CPU
    python -m benchmarks.kernel_speed --device cpu --isa avx2   # megalite's AVX2 table on an AVX-512 CPU

Prints one table: what, shape, megalite ms, peer, peer ms, speedup (peer time / megalite time, >1
means megalite is faster), and megalite's achieved bandwidth against a measured copy bandwidth --
the ceiling for these memory-bound kernels.  "GB/s" counts the bytes each operation must move at
least (every input read once, every output written once), the same for both sides.  Adam can show
more than 100% of copy: a copy's stores into a buffer it never read also cost a read of each line
(write-allocate), which copy's GB/s does not count, while Adam stores only into lines it just read.

On the CPU each norm row also counts page faults per call (both sides).  A fresh multi-MiB output
from malloc is a new mmap whose 4 KiB pages fault on first write: on the 2-core CI VM, writing a
fresh 32 MiB buffer costs ~21 ms that way against ~1.7 ms for memory written before.  megalite's
norm outputs of 4 MiB and more come from a cache of kept blocks (csrc/cpu/output_cache.h, what
CUDA's caching allocator does on the GPU), so after the warm-up they fault no more; PyTorch's CPU
outputs come from malloc.  Part of the LayerNorm ratio is therefore allocation, not arithmetic: the
"of copy" column shows how close megalite's kernels themselves come to the memory's speed.  Whether
PyTorch's outputs fault depends on the process's history: glibc raises its mmap threshold (up to
32 MiB) after a large free, so in a full run, after the Adam rows, they usually do not; with
MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 they never do (kernel against
kernel).  megalite's norm outputs of 16 MiB and more are written with streaming stores, which skip
the read of each line a store into uncached memory costs (write-allocate): kernel against kernel,
that is most of the fp32 LayerNorm's lead.

megalite and its peers are timed in alternating rounds (ours, peer, ours, peer, ...), so that on a
machine shared with other work a change of load hits both sides instead of skewing the ratio.

The optimizer rows use GPT-2 small's 148 parameter tensors (124,439,808 parameters: wte, wpe, 12
blocks of ln_1/attn.c_attn/attn.c_proj/ln_2/mlp.c_fc/mlp.c_proj weights and biases, ln_f).  The
mixed-precision peer is what a PyTorch user would run for the same inputs and outputs: convert the
bf16 grads to fp32, torch.optim.AdamW(fused=True) on the fp32 masters, copy masters into the bf16
params (with fp32 grads, as in Megatron's main_grad, the conversion is left out on both sides).
Ours also checks every gradient for inf/nan first (the found_inf flag); the peer does not.
"""
from __future__ import annotations

import argparse
import gc
import platform
import resource
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from benchmarks.side_by_side import alternating
from megalite.ops import backend_name, layer_norm, reference, rms_norm, swiglu
from megalite.optim.adam import FusedAdam, adam_step_master

WARMUP = 2   # untimed runs of each function before its timed rounds (--quick: 1)
NORM_ROUNDS = 3   # the norm rows take 5-50 ms a call: 3x the rounds for a steadier median on a shared machine


def gpt2_small_shapes(vocab: int = 50257, positions: int = 1024, hidden: int = 768, layers: int = 12) -> List[tuple]:
    shapes = [(vocab, hidden), (positions, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,),                          # ln_1 weight, bias
                   (hidden, 3 * hidden), (3 * hidden,),           # attn.c_attn (fused qkv)
                   (hidden, hidden), (hidden,),                   # attn.c_proj
                   (hidden,), (hidden,),                          # ln_2
                   (hidden, 4 * hidden), (4 * hidden,),           # mlp.c_fc
                   (4 * hidden, hidden), (hidden,)]               # mlp.c_proj
    shapes += [(hidden,), (hidden,)]                              # ln_f
    return shapes


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(fns: List[Callable[[], None]], device: torch.device, repeats: int) -> List[float]:
    """Median ms of each fn, timed in alternating rounds after WARMUP untimed calls."""
    return [1e3 * t for t in alternating(fns, repeats, WARMUP, lambda: synchronize(device))]


def page_faults_per_call(fn: Callable[[], None], calls: int = 3) -> float:
    """Minor page faults of this process per call of fn (CPU only)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """GB/s of dst.copy_(src) over 256 MiB fp32 (bytes read + bytes written)."""
    src = torch.randn(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    [ms] = interleaved_ms([lambda: dst.copy_(src)], device, repeats)
    return 2 * src.numel() * 4 / ms / 1e6


class Table:
    def __init__(self, header: str, copy_gbps: float):
        self.header, self.copy_gbps, self.rows, self.notes = header, copy_gbps, [], []

    def note(self, text: str) -> None:
        self.notes.append(text)
        print("  " + text, flush=True)

    def add(self, what: str, shape: str, ours_ms: float, peer: str, peer_ms: float, nbytes: float) -> None:
        gbps = nbytes / ours_ms / 1e6
        self.rows.append((what, shape, f"{ours_ms:.2f}", peer, f"{peer_ms:.2f}", f"{peer_ms / ours_ms:.2f}x",
                          f"{gbps:.1f}", f"{100 * gbps / self.copy_gbps:.0f}%"))
        print("  " + " | ".join(self.rows[-1]), flush=True)

    def render(self) -> str:
        titles = ("what", "shape", "megalite ms", "peer", "peer ms", "speedup", "megalite GB/s", "of copy")
        widths = [max(len(str(r[i])) for r in self.rows + [titles]) for i in range(len(titles))]

        def line(row) -> str:
            return "| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |"
        out = [self.header, line(titles), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        return "\n".join(out + [line(r) for r in self.rows] + self.notes)


def bench_adam_fp32(table: Table, device: torch.device, repeats: int) -> None:
    shapes = gpt2_small_shapes()
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    hyper = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    label = f"{len(params)} tensors, {numel / 1e6:.1f}M fp32"
    ours = FusedAdam(params, **hyper)
    peers = {"torch AdamW fused": torch.optim.AdamW(params, **hyper, fused=True),
             "torch AdamW foreach": torch.optim.AdamW(params, **hyper, foreach=True)}
    # All three update the same parameters in turn (timing only: each keeps its own moments).
    ours_ms, *peer_ms = interleaved_ms([ours.step] + [peer.step for peer in peers.values()], device, repeats)
    for peer_name, ms in zip(peers, peer_ms):
        table.add("Adam step (fp32)", label, ours_ms, peer_name, ms, 28 * numel)
    del ours, peers, params
    gc.collect()


def bench_adam_master(table: Table, device: torch.device, repeats: int, grad_dtype: torch.dtype) -> None:
    shapes = gpt2_small_shapes()
    model = [torch.randn(s, device=device, dtype=torch.bfloat16) for s in shapes]
    grads = [torch.randn(s, device=device, dtype=grad_dtype) * 1e-3 for s in shapes]
    masters = [torch.nn.Parameter(p.float()) for p in model]
    exp_avgs = [torch.zeros_like(p) for p in masters]
    exp_avg_sqs = [torch.zeros_like(p) for p in masters]
    found_inf = torch.zeros(1, device=device)
    numel = sum(p.numel() for p in model)
    step = [0]

    def ours():
        step[0] += 1
        adam_step_master(model, grads, masters, exp_avgs, exp_avg_sqs, step=step[0], lr=6e-4, beta1=0.9, beta2=0.95,
                         eps=1e-8, weight_decay=0.1, found_inf=found_inf)

    peer_opt = torch.optim.AdamW(masters, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    if grad_dtype == torch.float32:
        for master, grad in zip(masters, grads):
            master.grad = grad                      # fp32 grads are used as they are
    else:
        for master in masters:
            master.grad = torch.empty_like(master)  # the fp32 copy of the half grads

    def peer():
        if grad_dtype != torch.float32:
            torch._foreach_copy_([m.grad for m in masters], grads)
        peer_opt.step()
        torch._foreach_copy_(model, masters)

    ours_ms, peer_ms = interleaved_ms([ours, peer], device, repeats)
    gsize = torch.finfo(grad_dtype).bits // 8
    nbytes = numel * (gsize + 3 * 4 + 3 * 4 + 2)   # read grad, master, m, v; write master, m, v, bf16 param
    table.add(f"mixed-precision step ({str(grad_dtype)[6:]} grads)", f"{numel / 1e6:.1f}M, bf16 params", ours_ms,
              "fused AdamW + copies", peer_ms, nbytes)
    # The buffers go with this frame (the timed closures hold them until it returns).


def rms_norm_expression(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm PyTorch users write (LLaMA's reference): fp32 statistics, result in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def bench_norms(table: Table, device: torch.device, repeats: int) -> None:
    for rows, cols in ((8192, 1024), (4096, 4096)):
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device="cpu").manual_seed(0)
            x0 = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
            dy = torch.randn(rows, cols, generator=gen).to(device=device, dtype=dtype)
            weight = torch.randn(cols, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            bias = torch.randn(cols, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            x = x0.clone().requires_grad_()
            nbytes = 5 * x.numel() * x.element_size()   # fwd: read x, write y; bwd: read x, dy, write dx
            label = f"[{rows}, {cols}] {str(dtype)[6:]}"

            def fwd_bwd(fn, *args):
                # Each side drops its own gradients inside its own call: freed at the start of the
                # next call instead, the other side's would be, and freeing PyTorch's (a munmap of a
                # 16-64 MiB block when its malloc took a fresh mmap) cost megalite up to 2x.
                def run():
                    fn(x, *args).backward(dy)
                    x.grad = weight.grad = bias.grad = None
                return run

            ours, peer = (fwd_bwd(layer_norm, weight, bias, 1e-5),
                          fwd_bwd(lambda t, w, b: F.layer_norm(t, (cols,), w, b, 1e-5), weight, bias))
            ours_ms, peer_ms = interleaved_ms([ours, peer], device, repeats)
            table.add("LayerNorm fwd+bwd", label, ours_ms, "F.layer_norm", peer_ms, nbytes)
            if device.type == "cpu":
                table.note(f"page faults per LayerNorm fwd+bwd {label}: megalite {page_faults_per_call(ours):,.0f}, "
                           f"F.layer_norm {page_faults_per_call(peer):,.0f}")
            ours_ms, expression_ms, functional_ms = interleaved_ms(
                [fwd_bwd(rms_norm, weight, 1e-5), fwd_bwd(rms_norm_expression, weight, 1e-5),
                 fwd_bwd(lambda t, w, e: F.rms_norm(t, (cols,), w, e), weight, 1e-5)], device, repeats)
            table.add("RMSNorm fwd+bwd", label, ours_ms, "PyTorch expression", expression_ms, nbytes)
            table.add("RMSNorm fwd+bwd", label, ours_ms, "F.rms_norm", functional_ms, nbytes)


def bench_swiglu(table: Table, device: torch.device, repeats: int) -> None:
    """LLaMA ~0.85B's MLP at micro-batch 4, sequence 2048: h [8192, 2 x 5632] -> [8192, 5632].  On a CPU
    ops.swiglu runs its reference, the peer here (the unfused expression a PyTorch user writes): the row
    only checks the harness."""
    rows, ffn = (8192, 5632) if device.type == "cuda" else (2048, 2048)
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator(device="cpu").manual_seed(0)
        h = torch.randn(rows, 2 * ffn, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        dy = torch.randn(rows, ffn, generator=gen).to(device=device, dtype=dtype)
        nbytes = 8 * dy.numel() * dy.element_size()   # forward: read h, write y; backward: read h, dy, write dh

        def fwd_bwd(fn):
            def run():
                fn(h).backward(dy)
                h.grad = None
            return run
        ours_ms, peer_ms = interleaved_ms([fwd_bwd(swiglu), fwd_bwd(reference.swiglu)], device, repeats)
        table.add("SwiGLU fwd+bwd", f"[{rows}, 2 x {ffn}] {str(dtype)[6:]}", ours_ms, "silu(gate) * up", peer_ms,
                  nbytes)


def run(device: torch.device, repeats: int, threads: Optional[int], only: Optional[str], isa: str) -> str:
    if device.type == "cpu":
        if threads:
            torch.set_num_threads(threads)
        import megalite._C as native
        native.set_isa(isa)
        machine = (f"{cpu_name()}, {torch.get_num_threads()} threads, megalite ISA {native.isa()}, "
                   f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    else:
        machine = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    copy_gbps = copy_bandwidth(device, repeats)
    header = (f"machine: {machine}; kernels: {backend_name(device)}; measured copy bandwidth {copy_gbps:.1f} GB/s; "
              f"median of {repeats} alternating rounds (norms: {NORM_ROUNDS * repeats})")
    print(header, flush=True)
    table = Table(header, copy_gbps)
    if only in (None, "adam"):
        bench_adam_fp32(table, device, repeats)
        bench_adam_master(table, device, repeats, torch.bfloat16)
        bench_adam_master(table, device, repeats, torch.float32)
    if only in (None, "norms"):
        bench_norms(table, device, NORM_ROUNDS * repeats)
    if only in (None, "swiglu"):
        bench_swiglu(table, device, repeats)
    return table.render()


def main() -> None:
    global WARMUP
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and megalite)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=("adam", "norms", "swiglu"), default=None)
    parser.add_argument("--quick", action="store_true", help="short run: 3 timed rounds, 1 warm-up per row")
    parser.add_argument("--isa", choices=("auto", "generic", "avx2", "avx512"), default="auto",
                        help="megalite's CPU kernel table (default: the widest this CPU has)")
    args = parser.parse_args()
    if args.quick:
        WARMUP = 1
        args.repeats = min(args.repeats, 3)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    tables = []
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("(no CUDA device: CUDA rows skipped)")
            continue
        tables.append(run(torch.device(name), args.repeats, args.threads, args.only, args.isa))
    print()
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
