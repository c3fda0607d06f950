"""Does FSDP2 (``fully_shard``) compose with the rest of megalite?  Each probe runs, it does not guess.

    python -m benchmarks.fsdp2_probes                  # every probe, small model, one line each
    python -m benchmarks.fsdp2_probes --only tp bf16

Probes (each on its own forked gloo ranks; a probe that fails reports the first line of its error):

- ``tp``: megalite TP=2 x DP=2 on 4 ranks, FSDP2 over the DP sub-mesh only; the TP layers' autograd
  functions run on the all-gathered plain tensors.  Reports whether it runs, the losses of two steps
  against one process, the gradient norm ``clip_grad_norm_`` sees on each rank against the true one,
  and how many parameters kept megalite's ``param_info``.
- ``cp``: megalite CP=2 (one replica's sequences split over 2 ranks, attention across them), FSDP2 over
  the DP x CP ranks; the losses of two steps against one process.
- ``pp``: megalite PP=2 x DP=2, the 1F1B executor over 2 micro-batches, each stage's chunk sharded
  over its DP group (untied embeddings, no clipping); the losses of two steps against one process.
- ``ddp``: megalite's DistributedDataParallel (post-accumulate-grad hooks, ``main_grad``) wrapped
  around an FSDP2 model, and FSDP2 applied to the layers of a DDP-wrapped model.
- ``adam``: megalite's fused ``adam_step`` on DTensor parameters, then on their local shards; and
  ``MegaliteOptimizer`` (``build_optimizer``) over an FSDP2 model.
- ``bf16``: ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` on CPU: the sharded
  parameters stay fp32 (the master), compute in bf16; losses of two steps against fp32 one process.
- ``sum``: FSDP2 told to sum gradients over the mesh instead of averaging them
  (``set_gradient_divide_factor(1.0)``), as a loss normalized by the global token count would need.
- ``ckpt``: what megalite's checkpoint code makes of an FSDP2 model: the tensor index's slice of a
  DTensor parameter (checkpoint/index.py), ``_own_storage`` (checkpoint/save_load.py), and a
  ``torch.save`` / ``torch.load(weights_only=True)`` round trip of the sharded state dict.
"""
from __future__ import annotations

import argparse
import io
import math
import traceback
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.fsdp2_prototype import (
    CLIP,
    adamw,
    batch,
    import_fully_shard,
    local,
    megalite_step,
    plain_model,
    shard_with_fsdp2,
    torch_step,
    whole_batch,
)

SHAPE = {"layers": 2, "hidden": 64, "heads": 4, "seq": 32, "vocab": 256, "micro": 2}


def first_line(error: BaseException) -> str:
    """The error's type and first line, where it was raised, and the last megalite frame on the way."""
    text = str(error).strip().splitlines()
    frames = traceback.extract_tb(error.__traceback__)
    short = lambda frame: f"{frame.filename.split('site-packages/')[-1].split('wt-fsdp2/')[-1]}:{frame.lineno}"  # noqa: E731
    ours = [frame for frame in frames if "/megalite/" in frame.filename]
    via = f"; megalite: {short(ours[-1])}: {ours[-1].line}" if ours and ours[-1] is not frames[-1] else ""
    return (f"{type(error).__name__}: {text[0][:160] if text else ''} (raised at {short(frames[-1])}: "
            f"{frames[-1].line}{via})")


def attempt(what: Callable[[], object]) -> object:
    """what() or the first line of its error."""
    try:
        return what()
    except Exception as error:   # noqa: BLE001 - a failing probe is a result
        return "FAILED " + first_line(error)


def _global_loss(loss: torch.Tensor, group, size: int) -> float:
    import torch.distributed as dist

    loss = loss.detach().clone()
    dist.all_reduce(loss, group=group)
    return loss.item() / size


def reference(shape: dict, dp: int, steps: int) -> dict:
    """One process, the whole global batch, no clipping: the losses and the first step's gradient norm."""
    model = plain_model(shape)
    optimizer = adamw(model)
    losses, norm = [], None
    for i in range(steps):
        tokens, labels = whole_batch(shape, i, dp)
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        norm = norm if norm is not None else torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "grad_norm": norm}


# -- the probes, each a function of one rank ---------------------------------------------------------
def _probe_tp(rank: int, world_size: int, shape: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from megalite.parallel.param_info import param_info
    from megalite.parallel.state import initialize_grid

    grid = initialize_grid(tp=2, dp=2)                  # rank = tp + 2 * dp: mesh rows are DP, columns TP
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = plain_model(shape)
    before = {name: param_info(p) for name, p in model.named_parameters()}
    split = sum(info.partition_dim is not None for info in before.values())
    model = shard_with_fsdp2(model, mesh["dp"])
    kept = sum(param_info(p) == before[name] for name, p in model.named_parameters())
    optimizer = adamw(model)
    losses, norm = [], None
    for i in range(2):
        tokens, labels = batch(shape, i, grid.dp_size, grid.dp_rank)
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        norm = norm if norm is not None else torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item()
        optimizer.step()
        losses.append(_global_loss(loss, grid.dp_group, grid.dp_size))
    norms = [None] * grid.tp_size
    torch.distributed.all_gather_object(norms, norm, group=grid.tp_group)
    return {"losses": losses, "clip_norm_seen_per_tp_rank": norms, "params": len(before), "tp_split": split,
            "param_info_kept": kept}


def _probe_cp(rank: int, world_size: int, shape: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from megalite.parallel.context_parallel import split_sequence
    from megalite.parallel.state import initialize_grid

    grid = initialize_grid(cp=2)                        # one replica, its sequences split over 2 CP ranks
    model = shard_with_fsdp2(plain_model(shape), init_device_mesh("cpu", (world_size,)))  # mesh = DP x CP
    optimizer = adamw(model)
    losses = []
    for i in range(2):
        tokens, labels = (split_sequence(t, grid.cp_size, grid.cp_rank, dim=1) for t in batch(shape, i, 1, 0))
        loss = torch_step(model, optimizer, tokens, labels, clip=0.0)   # equal token counts: mean of means
        losses.append(_global_loss(loss, grid.cp_group, grid.cp_size))
    return {"losses": losses}


def _pp_micro_batch(shape: dict, step: int, micro: int, dp_size: int, dp_rank: int):
    return batch(shape, 10 * step + micro, dp_size, dp_rank)


def _probe_pp(rank: int, world_size: int, shape: dict) -> dict:
    """PP=2 x DP=2, megalite's 1F1B executor over 2 micro-batches, each stage's chunk FSDP2-sharded over
    its DP group; untied embeddings (the tied copy's PP sum is megalite's finalize_model_grads)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from megalite.model.build import build_model_chunks
    from megalite.parallel.pipeline.schedules import get_forward_backward_func
    from megalite.parallel.state import initialize_grid

    grid = initialize_grid(pp=2, dp=2)                  # rank = dp + 2 * pp: mesh rows are PP, columns DP
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    chunk = shard_with_fsdp2(build_model_chunks(_untied(shape), grid)[0], mesh["dp"])
    optimizer = adamw(chunk)
    forward_backward = get_forward_backward_func(2, None, "1f1b")

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        return model(tokens, labels=labels), lambda out: (out.mean(), {"lm loss": out.mean().detach()})

    losses = []
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        data = iter([_pp_micro_batch(shape, step, m, 2, grid.dp_rank) for m in range(2)])
        dicts = forward_backward(forward_step_func=forward_step, data_iterator=data, model=[chunk],
                                 num_microbatches=2, seq_length=shape["seq"], micro_batch_size=shape["micro"],
                                 grid=grid)
        optimizer.step()
        local_loss = torch.stack([d["lm loss"] for d in dicts]).mean() if dicts else torch.zeros(())
        losses.append(_global_loss(local_loss, grid.dp_group, grid.dp_size))
    found = [losses]
    dist.broadcast_object_list(found, src=world_size - 1)   # the last stage's losses
    return {"losses": found[0]}


def _untied(shape: dict):
    import dataclasses

    from benchmarks.fsdp2_prototype import model_config

    return dataclasses.replace(model_config(shape), untie_embeddings_and_output_weights=True)


def pp_reference(shape: dict) -> dict:
    """One process, untied, each step's 2 micro-batches x 2 DP ranks in one batch."""
    from megalite.model.gpt import GPTModel

    model = GPTModel(_untied(shape))
    optimizer = adamw(model)
    losses = []
    for step in range(2):
        parts = [_pp_micro_batch(shape, step, m, 2, r) for m in range(2) for r in range(2)]
        tokens, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        losses.append(torch_step(model, optimizer, tokens, labels, clip=0.0).item())
    return {"losses": losses}


def _probe_ddp(rank: int, world_size: int, shape: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from megalite.config.settings import OptimizerConfig
    from megalite.optim import build_optimizer
    from megalite.parallel.data_parallel import DistributedDataParallel
    from megalite.parallel.state import initialize_grid

    grid = initialize_grid(dp=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    config = OptimizerConfig(lr=1e-3, clip_grad=CLIP)

    def ddp_around_fsdp2():
        model = DistributedDataParallel(shard_with_fsdp2(plain_model(shape), mesh), grid)
        optimizer = build_optimizer([model], config, grid)
        return megalite_step(model, optimizer, grid, *batch(shape, 0, world_size, rank)).item()

    def fsdp2_inside_ddp():
        model = DistributedDataParallel(plain_model(shape), grid)
        shard_with_fsdp2(model.module, mesh)
        optimizer = build_optimizer([model], config, grid)
        loss = megalite_step(model, optimizer, grid, *batch(shape, 0, world_size, rank)).item()
        main_grads = [getattr(p, "main_grad", None) for p in model.parameters()]
        return {"loss": loss, "params_with_main_grad": sum(g is not None for g in main_grads),
                "nonzero_main_grad": sum(g is not None and bool(g.abs().sum() > 0) for g in main_grads)}

    return {"ddp_around_fsdp2": attempt(ddp_around_fsdp2), "fsdp2_inside_ddp": attempt(fsdp2_inside_ddp)}


def _probe_adam(rank: int, world_size: int, shape: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from megalite.config.settings import OptimizerConfig
    from megalite.optim import build_optimizer
    from megalite.optim.adam import adam_step
    from megalite.parallel.state import initialize_grid

    grid = initialize_grid(dp=world_size)
    model = shard_with_fsdp2(plain_model(shape), init_device_mesh("cpu", (world_size,)))
    tokens, labels = batch(shape, 0, world_size, rank)
    model(tokens, labels=labels).mean().backward()
    params = list(model.parameters())
    hyper = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)

    def on(tensors, grads):
        adam_step(tensors, grads, [torch.zeros_like(t) for t in tensors], [torch.zeros_like(t) for t in tensors],
                  **hyper)
        return "ran"

    with torch.no_grad():
        dtensors = attempt(lambda: on(params, [p.grad for p in params]))
        shards = attempt(lambda: on([local(p) for p in params], [local(p.grad) for p in params]))

    def megalite_optimizer():
        optimizer = build_optimizer([model], OptimizerConfig(lr=1e-3, clip_grad=CLIP), grid)
        return {"stepped": optimizer.step()[0]}

    return {"adam_step_dtensor": dtensors, "adam_step_local_shards": shards,
            "megalite_optimizer": attempt(megalite_optimizer)}


def _probe_bf16(rank: int, world_size: int, shape: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    _, MixedPrecisionPolicy, _ = import_fully_shard()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard_with_fsdp2(plain_model(shape), init_device_mesh("cpu", (world_size,)), policy)
    compute = []
    model.decoder.layers[0].register_forward_hook(lambda module, args, out: compute.append(str(out.dtype)))
    optimizer = adamw(model)
    losses = []
    for i in range(2):
        loss = torch_step(model, optimizer, *batch(shape, i, world_size, rank), clip=0.0)
        losses.append(_global_loss(loss, None, world_size))
    p = next(model.parameters())
    return {"losses": losses, "sharded_param": str(p.dtype), "grad": str(p.grad.dtype), "layer_output": compute[0]}


def _probe_sum(rank: int, world_size: int, shape: dict) -> dict:
    """Gradients summed, not averaged, over the mesh (``set_gradient_divide_factor(1.0)``): what a loss
    normalized by the global token count (--calculate-per-token-loss) would ask of FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh

    model = shard_with_fsdp2(plain_model(shape), init_device_mesh("cpu", (world_size,)))
    for module in [*model.decoder.layers, model]:
        module.set_gradient_divide_factor(1.0)
    tokens, labels = batch(shape, 0, world_size, rank)
    return {"backward": attempt(lambda: model(tokens, labels=labels).mean().backward() or "ran")}


def _probe_ckpt(rank: int, world_size: int, shape: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from megalite.checkpoint.index import describe_model
    from megalite.checkpoint.save_load import _own_storage

    model = shard_with_fsdp2(plain_model(shape), init_device_mesh("cpu", (world_size,)))
    name, param = next((n, p) for n, p in model.named_parameters() if "decoder" in n and p.ndim == 2)

    def index_slice():
        part = next(s for s in describe_model([model], [model.layer_numbers], 0, 1, "f") if s.where[1] == name)
        return {"name": name, "slice_local_shape": list(part.local_shape), "slice_range": [part.start, part.end],
                "dim": part.dim, "rank_holds": list(local(param).shape)}

    def round_trip():
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        return f"{type(loaded[name]).__name__} {list(loaded[name].shape)}"

    return {"index_slice": attempt(index_slice), "own_storage": attempt(lambda: type(_own_storage(param)).__name__),
            "save_load": attempt(round_trip)}


# name -> (the rank function, how many ranks)
PROBES: Dict[str, tuple] = {"tp": (_probe_tp, 4), "cp": (_probe_cp, 2), "pp": (_probe_pp, 4),
                            "ddp": (_probe_ddp, 2), "adam": (_probe_adam, 2), "bf16": (_probe_bf16, 2),
                            "sum": (_probe_sum, 2), "ckpt": (_probe_ckpt, 2)}


def run_probe(name: str, shape: dict = SHAPE, timeout: float = 120.0) -> object:
    """rank 0's result of one probe, or the first line of the failure of its ranks."""
    from megalite.parallel.testing import run_on_ranks

    probe, ranks = PROBES[name]
    return attempt(lambda: run_on_ranks(probe, ranks, shape, timeout=timeout)[0])


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(PROBES), default=list(PROBES))
    args = parser.parse_args(argv)
    found = import_fully_shard()
    print(f"torch {torch.__version__}: fully_shard from {found[2] if found else 'nowhere (no FSDP2)'}")
    if found is None:
        return {}
    results = {}
    for name in args.only:
        results[name] = run_probe(name)
        if name in ("tp", "bf16", "cp"):
            results[name + "_reference"] = reference(SHAPE, 1 if name == "cp" else 2, 2)
        if name == "pp":
            results["pp_reference"] = pp_reference(SHAPE)
        for key, value in ([(name, results[name])] + ([(name + "_reference", results[name + "_reference"])]
                                                      if name + "_reference" in results else [])):
            print(f"{key}: {value}", flush=True)
    return results


if __name__ == "__main__":
    main()
