"""PyTorch FSDP2 (``fully_shard``) as a ZeRO-3 engine for megalite's GPT, against megalite's own DDP.

    python -m benchmarks.fsdp2_prototype                       # 8 layers, h 1024, DP=4: table + parity
    python -m benchmarks.fsdp2_prototype --layers 2 --hidden 256 --dp 2 --steps 3
    python -m benchmarks.fsdp2_prototype --parity-only --dp 2  # only: one FSDP2 step == one process?
    python -m benchmarks.fsdp2_probes                          # composition: TP, CP, PP, DDP, Adam, bf16, ckpt

Each configuration runs on its own freshly forked gloo ranks (pure data parallelism, TP=1, fp32,
dropout off, the same seed-drawn model and the same global batch of random tokens):

- ``megalite DDP``: megalite's DistributedDataParallel (contiguous fp32 grad buffer, no ZeRO) and
  MegaliteOptimizer (fused AdamW, grid-wide clipping), as ``model/build.py`` and ``optim/`` build them.
- ``FSDP2``: ``fully_shard`` on every TransformerLayer, then on the root GPTModel, over a 1-D
  DeviceMesh of the ranks on "cpu"; ``torch.optim.AdamW`` (foreach) with the same two parameter
  groups (matrices decayed, 1-D parameters not) and ``clip_grad_norm_`` at the same threshold.
- ``FSDP2 keep-fwd``: the same with ``reshard_after_forward=False``: a layer's gathered parameters
  live from its forward to its backward (no second all-gather; between steps the parameters are
  sharded as under ZeRO-3).

Measured per rank:

- tensors at rest: bytes of the tensors the rank holds after a step (parameters, gradients -- DDP's
  grad buffer, FSDP2's sharded ``.grad`` -- and optimizer state), each storage counted once by its
  ``untyped_storage().nbytes()`` (a DTensor through its local shard, padding included), divided by
  the model's parameter count.
- RSS at rest: the kernel's resident set after the steps minus the resident set before the model
  was built (``/proc/self/status`` VmRSS): the same state as the OS sees it, allocator slack included.
- peak: VmHWM over all steps (the peak is reset through ``/proc/self/clear_refs`` after the model is
  built and wrapped, so the construction of the full model, which FSDP2 then shards, is not counted)
  minus the resident set before the model was built: the state plus the step's transients
  (activations, FSDP2's all-gathered layers, the gradients in flight).
- step time: the median over the timed steps after the warm-up ones, the slowest rank's.

torch keeps no allocator statistics for the CPU (``torch.cpu`` has none; ``torch.accelerator``'s refuse
without an accelerator), hence the kernel's counters as the cross-check of the tensor count.

Run as a command, the benchmark restarts itself with glibc's mmap threshold fixed at 64 KiB
(``MALLOC_MMAP_THRESHOLD_``, as benchmarks/long_context.py does) so that freed tensors leave the
resident set and RSS tracks what is alive.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from megalite.calibration.allocator import ENV as MALLOC_ENV

LR, WEIGHT_DECAY, CLIP = 1e-3, 0.01, 1.0
CLEAR_GRADIENT = 1e-5     # |first-step gradient| well above Adam's eps (1e-8)
ENGINES = {"ddp": "megalite DDP", "fsdp2": "FSDP2", "fsdp2-keep": "FSDP2 keep-fwd"}


# -- what both engines share ---------------------------------------------------------------------
def import_fully_shard():
    """(fully_shard, MixedPrecisionPolicy, where they were found), or None when this torch has neither path."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # public from torch 2.6
        return fully_shard, MixedPrecisionPolicy, "torch.distributed.fsdp"
    except ImportError:
        pass
    try:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard  # 2.4 / 2.5 prototype
        return fully_shard, MixedPrecisionPolicy, "torch.distributed._composable.fsdp"
    except ImportError:
        return None


def model_config(shape: dict):
    from megalite.config.settings import ModelConfig

    return ModelConfig(num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                       seq_length=shape["seq"], max_position_embeddings=shape["seq"], vocab_size=shape["vocab"],
                       make_vocab_size_divisible_by=128, hidden_dropout=0.0, attention_dropout=0.0)


def batch(shape: dict, step: int, dp_size: int, dp_rank: int):
    """This DP rank's (tokens, labels) [micro, seq] of global batch ``step`` (micro x DP samples)."""
    generator = torch.Generator().manual_seed(1000 + step)
    micro = shape["micro"]
    sample = torch.randint(0, shape["vocab"], (micro * dp_size, shape["seq"] + 1), generator=generator)
    mine = sample[dp_rank * micro:(dp_rank + 1) * micro]
    return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """torch's AdamW with megalite's groups: matrices decayed, biases and norms not."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, foreach=True)


def shard_with_fsdp2(model: torch.nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True
                     ) -> torch.nn.Module:
    """fully_shard each TransformerLayer (its own all-gather / reduce-scatter group), then the root
    (embedding, final norm, output layer).  ``reshard_after_forward=False`` keeps each layer's
    gathered parameters from its forward to its backward (one all-gather fewer, a higher peak)."""
    fully_shard = import_fully_shard()[0]
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in model.decoder.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def torch_step(model, optimizer, tokens, labels, clip: float = CLIP) -> torch.Tensor:
    """One step of a plain or FSDP2 model with a torch optimizer; returns this rank's loss (detached)."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(tokens, labels=labels).float().mean()
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.detach()


def megalite_step(model, optimizer, grid, tokens, labels) -> torch.Tensor:
    from megalite.parallel.grads import finalize_model_grads

    optimizer.zero_grad()
    loss = model(tokens, labels=labels).float().mean()
    loss.backward()
    finalize_model_grads([model], grid)
    optimizer.step()
    return loss.detach()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; a plain tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def held_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors`` (each storage once; DTensors by their local shard)."""
    storages = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = local(tensor).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# -- one configuration on its ranks --------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                    # VmHWM restarts from the current resident set


def _build_engine(engine: str, shape: dict, world_size: int):
    """(model, step function, tensors held at rest) of one engine on this rank."""
    from megalite.model.gpt import GPTModel

    model = GPTModel(model_config(shape))
    if engine in ("fsdp2", "fsdp2-keep"):
        from torch.distributed.device_mesh import init_device_mesh

        model = shard_with_fsdp2(model, init_device_mesh("cpu", (world_size,)), reshard_after_forward=engine == "fsdp2")
        optimizer = adamw(model)
        held = lambda: list(model.parameters()) + [p.grad for p in model.parameters()] + [   # noqa: E731
            value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
        return model, lambda t, y: torch_step(model, optimizer, t, y), held
    from megalite.config.settings import OptimizerConfig
    from megalite.optim import build_optimizer
    from megalite.parallel.data_parallel import DistributedDataParallel
    from megalite.parallel.state import initialize_grid

    grid = initialize_grid(dp=world_size)
    model = DistributedDataParallel(model, grid)
    optimizer = build_optimizer([model], OptimizerConfig(lr=LR, weight_decay=WEIGHT_DECAY, clip_grad=CLIP), grid)
    held = lambda: [t for p in model.parameters() for t in (p, p.grad, getattr(p, "main_grad", None))] + [  # noqa: E731
        t for piece in optimizer.all_pieces() for t in (piece.master, piece.exp_avg, piece.exp_avg_sq)]
    return model, lambda t, y: megalite_step(model, optimizer, grid, t, y), held


def _measure_rank(rank: int, world_size: int, engine: str, shape: dict, warmup: int, steps: int) -> dict:
    from megalite.parallel import state

    gc.collect()
    before = _status_kib("VmRSS")
    model, step, held = _build_engine(engine, shape, world_size)
    _reset_peak()
    times = []
    try:
        for i in range(warmup + steps):
            tokens, labels = batch(shape, i, world_size, rank)
            start = time.perf_counter()
            step(tokens, labels)
            times.append(time.perf_counter() - start)
        peak = _status_kib("VmHWM") - before
        gc.collect()
        rest = _status_kib("VmRSS") - before
        tensor_bytes = held_bytes(held())
    finally:
        state.destroy_grid()
    return {"tensor_bytes": tensor_bytes, "rss_rest_mib": rest / 1024, "peak_mib": peak / 1024,
            "step_s": statistics.median(times[warmup:] or times)}


def measure(engine: str, shape: dict, dp: int, warmup: int, steps: int) -> dict:
    from megalite.parallel.testing import run_on_ranks

    ranks = run_on_ranks(_measure_rank, dp, engine, shape, warmup, steps, timeout=3600)
    params = sum(p.numel() for p in plain_model(shape).parameters())
    return {"engine": engine, "dp": dp, "params": params,
            "bytes_per_param": max(r["tensor_bytes"] for r in ranks) / params,
            "rss_rest_mib": max(r["rss_rest_mib"] for r in ranks), "peak_mib": max(r["peak_mib"] for r in ranks),
            "step_s": max(r["step_s"] for r in ranks)}


def plain_model(shape: dict):
    from megalite.model.gpt import GPTModel

    return GPTModel(model_config(shape))


# -- parity: one FSDP2 step at DP=N against one process ------------------------------------------
def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def _reference_rank(rank: int, world_size: int, shape: dict, dp: int, steps: int) -> dict:
    """The oracle: the plain model on the whole global batch (micro x DP samples) in one process."""
    model = plain_model(shape)
    optimizer = adamw(model)
    losses, grads = [], None
    for i in range(steps):
        tokens, labels = whole_batch(shape, i, dp)
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        if grads is None:                               # before clipping, as the FSDP2 side takes them
            grads = _flat(p.grad for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "grads": grads, "params": _flat(model.parameters())}


def whole_batch(shape: dict, step: int, dp: int):
    parts = [batch(shape, step, dp, r) for r in range(dp)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _fsdp2_parity_rank(rank: int, world_size: int, shape: dict, steps: int) -> Optional[dict]:
    """The FSDP2 model's per-step global loss, first-step full gradients and final full parameters
    (rank 0 returns them; full_tensor() is a collective every rank joins)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model = shard_with_fsdp2(plain_model(shape), init_device_mesh("cpu", (world_size,)))
    optimizer = adamw(model)
    losses, grads = [], None
    for i in range(steps):
        tokens, labels = batch(shape, i, world_size, rank)
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        if grads is None:                               # the reduced gradient, before clipping
            grads = _flat(p.grad.full_tensor() for p in model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world_size)
    params = _flat(p.full_tensor() for p in model.parameters())
    return {"losses": losses, "grads": grads, "params": params} if rank == 0 else None


def parity(shape: dict, dp: int, steps: int = 1) -> dict:
    """Max absolute differences of FSDP2 at DP=``dp`` against one process: losses, first-step
    gradients, parameters after ``steps`` steps (and how far the parameters moved, for scale)."""
    from megalite.parallel.testing import run_on_ranks

    reference = run_on_ranks(_reference_rank, 1, shape, dp, steps, timeout=3600)[0]
    fsdp2 = run_on_ranks(_fsdp2_parity_rank, dp, shape, steps, timeout=3600)[0]
    initial = _flat(plain_model(shape).parameters())
    # Adam divides by sqrt(v) + eps: where |g| is near eps (1e-8) a gradient's round-off changes the update
    # by up to lr, elsewhere by its relative round-off only; the differences are reported on both sets.
    clear = reference["grads"].abs() >= CLEAR_GRADIENT
    param_diff = (reference["params"] - fsdp2["params"]).abs()
    return {"dp": dp, "steps": steps, "reference_losses": reference["losses"], "fsdp2_losses": fsdp2["losses"],
            "loss_diff": max(abs(a - b) for a, b in zip(reference["losses"], fsdp2["losses"])),
            "grad_diff": (reference["grads"] - fsdp2["grads"]).abs().max().item(),
            "grad_max": reference["grads"].abs().max().item(),
            "param_diff": param_diff.max().item(), "param_diff_clear": param_diff[clear].max().item(),
            "clear_fraction": clear.float().mean().item(),
            "param_moved": (reference["params"] - initial).abs().max().item()}


# -- the table -------------------------------------------------------------------------------------
def machine_line(shape: dict, params: int) -> str:
    return (f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, gloo, 1 thread/rank; "
            f"model {shape['layers']} layers h {shape['hidden']} heads {shape['heads']} seq {shape['seq']} vocab "
            f"{shape['vocab']} micro-batch {shape['micro']} fp32 ({params / 1e6:.1f} M params)")


def table(rows: List[dict]) -> str:
    base = rows[0]
    lines = [f"{'engine':<14} {'DP':>2} {'tensors at rest B/param':>23} {'RSS at rest MiB':>15} "
             f"{'peak MiB':>9} {'x DDP':>6} {'step s':>7} {'x DDP':>6}"]
    for row in rows:
        lines.append(f"{row['engine']:<14} {row['dp']:>2} {row['bytes_per_param']:>23.2f} "
                     f"{row['rss_rest_mib']:>15,.0f} {row['peak_mib']:>9,.0f} "
                     f"{row['peak_mib'] / base['peak_mib']:>6.2f} {row['step_s']:>7.2f} "
                     f"{row['step_s'] / base['step_s']:>6.2f}")
    return "\n".join(lines)


def parity_line(result: dict) -> str:
    return (f"parity FSDP2 DP={result['dp']} vs one process, {result['steps']} step(s): "
            f"loss diff {result['loss_diff']:.2e} (loss {result['reference_losses'][0]:.6f}), "
            f"grad max diff {result['grad_diff']:.2e} (max |grad| {result['grad_max']:.2e}), "
            f"param max diff {result['param_diff']:.2e} (max move {result['param_moved']:.2e}), "
            f"{result['param_diff_clear']:.2e} where |first grad| >= {CLEAR_GRADIENT:g} "
            f"({100 * result['clear_fraction']:.1f}% of params)")


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--dp", type=int, default=4, help="data-parallel ranks (gloo processes)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--engines", nargs="+", choices=["fsdp2", "fsdp2-keep"], default=["fsdp2", "fsdp2-keep"],
                        help="FSDP2 rows after megalite's DDP: fsdp2 (ZeRO-3), fsdp2-keep (reshard_after_forward off)")
    parser.add_argument("--parity-steps", type=int, default=1)
    parser.add_argument("--parity-only", action="store_true", help="only the FSDP2 vs one-process check")
    parser.add_argument("--no-parity", action="store_true", help="only the table")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse(argv)
    if import_fully_shard() is None:
        raise SystemExit(f"torch {torch.__version__} has no fully_shard (FSDP2 needs torch >= 2.4)")
    shape = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "seq": args.seq,
             "vocab": args.vocab, "micro": args.micro_batch_size}
    out: Dict[str, object] = {"rows": []}
    if not args.parity_only:
        for engine in ["ddp"] + args.engines:
            out["rows"].append(dict(measure(engine, shape, args.dp, args.warmup, args.steps), engine=ENGINES[engine]))
            print(f"done: {ENGINES[engine]}", flush=True)
        print(machine_line(shape, out["rows"][0]["params"]))
        print(table(out["rows"]), flush=True)
    if not args.no_parity:
        out["parity"] = parity(shape, args.dp, args.parity_steps)
        print(parity_line(out["parity"]), flush=True)
    return out


if __name__ == "__main__":
    if MALLOC_ENV not in os.environ:
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.fsdp2_prototype"] + sys.argv[1:],
                  {**os.environ, MALLOC_ENV: str(64 * 1024)})
    main()
