"""Load a checkpoint saved under one parallel layout into any other: TP, PP, virtual PP, CP, DP, EP,
no sharding or ZeRO-1/2/3 (--data-parallel-sharding-strategy), SP on or off (SP changes no tensor's layout).

    load_any_layout(root, model_chunks, optimizer, scheduler, grid, ...)
        the iteration's tensor index     -> tensor_index.pt (an iteration without one is refused)
        the saved layout == this run's   -> save_load.load_same_layout: file for file, bit for bit
        otherwise                        -> reshard:

    for every tensor this rank holds in the NEW layout (a parameter's TP box, or its EP box of the
    experts' stacked weights; a ZeRO-1 piece of its fp32 master and Adam moments), as a slice of its
    logical tensor (index.py):
        sources  = the saved slices of the same logical tensor and kind whose elements meet it
        verify   = the files holding those sources, checked against the manifest on every rank
        fill     = copy the shared elements by global coordinates; vocabulary rows beyond the
                   saved padding are zero
    then the optimizer's scalars (step, skipped steps, groups' lr and decay, loss scale), the LR
    scheduler, the iteration and the consumed samples, all layout-independent.

What is not resharded, and why:

- **RNG streams.** A rank whose coordinates (tp, cp, dp, pp rank) existed in the saved layout
  restores that rank's saved states; a rank whose coordinates are new keeps the states that
  ``training.setup`` seeded, the rule of a fresh run (``seed + 100 x pp rank`` for torch, python
  and numpy; the TP tracker from the seed and the TP rank).  Deterministic, and without dropout
  the streams are never drawn, so the loss curve does not depend on them.
- **Data position** is ``consumed_samples``, a global count; the sampler cuts the next global
  batch over the new DP size, so the samples continue in order whatever DP is.

Why not ``torch.distributed.checkpoint`` (DCP), which also reshards on load.  Tried on this torch
(2.13, gloo): a TP-split row-parallel weight saved as a ``Shard(1)`` DTensor over 2 ranks loads
into one rank exactly; but (1) DCP describes a saved tensor as rectangular chunks (offsets, sizes),
and a ZeRO-1 piece is a flat range of the buffer, which within a dim-1 split box is not a
rectangle (it would have to be gathered over DP first, or cut into up to three boxes with the
deprecated ShardedTensor); (2) the vocabulary padding depends on TP, so the embedding's global
shape differs between layouts, and DCP refuses it ("Size mismatch between saved
torch.Size([128, 8]) and current: torch.Size([64, 8])"); (3) the DTensor API it loads into moved
from ``torch.distributed._tensor`` (2.4, this project's floor) to ``torch.distributed.tensor``
(2.5).  Megatron's own file layout, which every other tool here reads, is kept; the index beside
it is a few hundred lines, and loading reads only the files whose slices meet this rank's.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megalite.checkpoint.index import (
    Place,
    Slice,
    chunk_layer_numbers,
    fill_slice,
    global_name,
    key_shape_of,
    overlaps,
    parameter_names,
    tensor_box,
)
from megalite.checkpoint.paths import TENSOR_INDEX, iteration_dir, rank_dir
from megalite.checkpoint.reader import SliceValues, choose_iteration, load_file, required_manifest
from megalite.checkpoint.save_load import (
    Resumed,
    load_same_layout,
    saved_layout,
    set_rng_state,
    stop_together,
    verify_everywhere,
)
from megalite.log import print_rank0
from megalite.optim.optimizer import MegaliteOptimizer
from megalite.optim.schedulers import LRScheduler
from megalite.parallel.data_parallel import unwrap_model
from megalite.parallel.param_gather import whole_parameters, write_back_shards
from megalite.parallel.param_info import param_info
from megalite.parallel.state import ProcessGrid

__all__ = ["load_any_layout", "describe_layout"]

Target = Tuple[torch.Tensor, Slice]    # (the 1-D tensor to fill, its slice description)


def describe_layout(layout: dict) -> str:
    # ZeRO-1 and ZeRO-2 save the same optimizer pieces; ZeRO-3's buckets are cut at gather units.
    sharding = "ZeRO-3" if layout.get("buckets_at_units") else "ZeRO-1/2" if layout["zero1"] else "no ZeRO"
    return (f"TP={layout['tp']} PP={layout['pp']} virtual PP={layout['vpp']} CP={layout['cp']} DP={layout['dp']} "
            f"{'EP=%d ' % layout['ep'] if layout.get('ep', 1) > 1 else ''}"
            f"{'expert TP=%d ' % layout['etp'] if layout.get('etp', 1) > 1 else ''}{sharding}")


def load_any_layout(root: str, model_chunks: Sequence[torch.nn.Module], optimizer: Optional[MegaliteOptimizer],
                    scheduler: Optional[LRScheduler], grid: ProcessGrid, *,
                    layer_numbers: Optional[Sequence[Sequence[int]]] = None, iteration: Optional[int] = None,
                    sharded_optimizer: bool = False, load_optimizer: bool = True, load_rng: bool = True,
                    weights_only: bool = False) -> Resumed:
    """Restore a checkpoint whatever layout saved it (see the module docstring); the arguments are
    :func:`megalite.checkpoint.save_load.load_same_layout`'s, plus each chunk's global ``layer_numbers``."""
    common = dict(sharded_optimizer=sharded_optimizer, load_optimizer=load_optimizer, load_rng=load_rng,
                  weights_only=weights_only)
    if iteration is None:
        iteration = choose_iteration(root)
        if iteration is None:
            return Resumed(0, 0, None)
    manifest = required_manifest(root, iteration)
    mine = saved_layout(grid, sharded_optimizer)
    index = _read_index(root, iteration, manifest, grid)
    if index["layout"] == mine:
        return load_same_layout(root, model_chunks, optimizer, scheduler, grid, iteration=iteration, **common)
    print_rank0(f"resharding iteration {iteration} of {root}: saved with {describe_layout(index['layout'])}, "
                f"loading at {describe_layout(mine)}")
    if weights_only:
        load_optimizer = load_rng = False
    load_optimizer = load_optimizer and optimizer is not None
    if load_optimizer and index["optimizer"] is None:
        why = index.get("no_optimizer_because") or "it was saved without one"
        raise ValueError(f"--load {root}: iteration {iteration} holds no optimizer state this layout can load: "
                         f"{why}. To take the weights only, pass --no-load-optim (or --finetune)")
    rng_file = _saved_rng_file(index["layout"], grid) if load_rng else None
    with whole_parameters(model_chunks):      # ZeRO-3 holds shards; the plan fills whole parameters
        plan = _plan(model_chunks, optimizer if load_optimizer else None, grid, index,
                     chunk_layer_numbers(model_chunks, layer_numbers))
        paths = _fill(root, iteration, manifest, grid, plan, rng_file)
        write_back_shards(model_chunks)
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        # Masters this run keeps and the checkpoint did not save (an fp32 run's) are the loaded weights.
        _reload_masters_not_loaded(optimizer, {id(out) for out, _, _ in plan})
    if load_optimizer:
        _load_optimizer_scalars(optimizer, index["optimizer"])
    if weights_only:
        return Resumed(0, 0, None)
    if scheduler is not None and index.get("scheduler") is not None:
        scheduler.load_state_dict(index["scheduler"])
    if rng_file is not None:
        set_rng_state(load_file(paths[rng_file]))
    return Resumed(int(index["iteration"]), int(index["consumed_samples"]), manifest.get("run_id"))


Plan = List[Tuple[torch.Tensor, Slice, List[Slice]]]   # (tensor to fill, its slice, the saved slices of its tensor)


def _plan(model_chunks, optimizer: Optional[MegaliteOptimizer], grid: ProcessGrid, index: dict,
          layer_numbers: List[List[int]]) -> Plan:
    """Every tensor this rank holds in the new layout (the optimizer's too, when one is given), each with
    the saved slices of the same logical tensor and kind."""
    saved = defaultdict(list)
    for part in map(Slice.from_saved, index["slices"]):
        saved[(part.name, part.kind)].append(part)
    targets = _model_targets(model_chunks, layer_numbers, grid)
    if optimizer is not None:
        names = parameter_names(model_chunks, layer_numbers)
        targets += _optimizer_targets(optimizer, names, grid, has_masters={n for n, k in saved if k == "master"})
    return [(out, target, saved[(target.name, target.kind)]) for out, target in targets]


def _fill(root: str, iteration: int, manifest: dict, grid: ProcessGrid, plan: Plan,
          rng_file: Optional[str]) -> Dict[str, str]:
    """Verify the files the plan reads (and the RNG file) on every rank, then fill every tensor of the plan;
    a fault on any rank stops every rank with its message.  Returns the verified paths."""
    fault, files = None, []
    try:
        files = sorted({source.file for _, target, sources in plan
                        for source in sources if overlaps(source, target, key_shape_of(target, sources))})
    except ValueError as error:
        fault = f"--load {root}: {error}"
    stop_together(fault, grid)
    paths = verify_everywhere(root, iteration, files + ([rng_file] if rng_file else []), manifest, grid)
    read = SliceValues(lambda relative: load_file(paths[relative], mmap=True))
    try:
        for out, target, sources in plan:
            fill_slice(out, target, sources, read)
    except ValueError as error:
        fault = f"--load {root}: {error}"
    except (KeyError, IndexError, TypeError, RuntimeError) as error:   # shared too, so that no rank waits
        fault = f"--load {root}: the tensor index does not match the files ({type(error).__name__}: {error})"
    stop_together(fault, grid)
    return paths


def _read_index(root: str, iteration: int, manifest: dict, grid: ProcessGrid) -> dict:
    """The iteration's tensor index, verified on every rank.  Every save writes one: an iteration
    without it is refused, never guessed from its files."""
    if not os.path.isfile(os.path.join(iteration_dir(root, iteration), TENSOR_INDEX)):
        raise ValueError(f"--load {root}: iteration {iteration} has no {TENSOR_INDEX}, which every megalite save "
                         f"writes: the folder was not written by megalite, or its save was cut short; point --load "
                         f"at a complete checkpoint")
    return load_file(verify_everywhere(root, iteration, [TENSOR_INDEX], manifest, grid)[TENSOR_INDEX])


def _model_targets(model_chunks, layer_numbers: List[List[int]], grid: ProcessGrid) -> List[Target]:
    targets, seen = [], set()
    for chunk, numbers in zip(model_chunks, layer_numbers):
        for name, tensor in unwrap_model(chunk).state_dict(keep_vars=True).items():
            if id(tensor) in seen:      # a tied output layer in the embedding's chunk: one parameter
                continue
            seen.add(id(tensor))
            info = param_info(tensor)
            target = Slice(name=global_name(name, numbers, info.shared_embedding), kind="param",
                          **tensor_box(tensor, Place.of(grid)),
                          start=0, end=tensor.numel())
            targets.append((tensor.detach().view(-1), target))
    return targets


def _optimizer_targets(optimizer: MegaliteOptimizer, names: Dict[int, str], grid: ProcessGrid,
                       has_masters: set) -> List[Target]:
    """Moments of every piece; the fp32 master where this run keeps one and the checkpoint saved one
    (from an fp32 run, the loaded parameters are the masters)."""
    targets = []
    for piece in optimizer.all_pieces():
        name = names[id(piece.param)]
        box = tensor_box(piece.param, Place.of(grid))
        tensors = {"exp_avg": piece.exp_avg, "exp_avg_sq": piece.exp_avg_sq}
        if piece.has_own_master and name in has_masters:
            tensors["master"] = piece.master
        for kind, tensor in tensors.items():
            targets.append((tensor, Slice(name=name, kind=kind, **box, start=piece.start, end=piece.end)))
    return targets


@torch.no_grad()
def _reload_masters_not_loaded(optimizer: MegaliteOptimizer, loaded: set) -> None:
    for piece in optimizer.all_pieces():
        if piece.has_own_master and id(piece.master) not in loaded:
            piece.master.copy_(piece.model_view)


def _load_optimizer_scalars(optimizer: MegaliteOptimizer, state: dict) -> None:
    """Step counts, loss scale, and each group's hyperparameters from the saved group of the same
    kind (decayed matrices or undecayed 1-D parameters, each under --decoupled-lr or not: a stage may
    lack some of them)."""
    optimizer.num_steps = int(state["step"])
    optimizer.num_skipped_steps = int(state.get("skipped_steps", 0))

    def kind(group):
        return group["weight_decay"] == 0, bool(group.get("decoupled_lr"))
    for group in optimizer.param_groups:
        same_kind = [g for g in state["param_groups"] if kind(g) == kind(group)]
        if same_kind:
            group.update(same_kind[0])
    if optimizer.loss_scaler is not None and state.get("loss_scaler") is not None:
        optimizer.loss_scaler.load_state_dict(state["loss_scaler"])


def _saved_rng_file(layout: dict, grid: ProcessGrid) -> Optional[str]:
    """The saved RNG file of this rank's coordinates, or None when they are new (see the module docstring)."""
    if not (grid.tp_rank < layout["tp"] and grid.pp_rank < layout["pp"] and grid.dp_rank < layout["dp"]
            and grid.cp_rank < layout["cp"]):
        return None
    shard = os.path.basename(rank_dir("", 0, grid.tp_rank, grid.pp_rank))
    return os.path.join(shard, f"rng_dp{grid.dp_rank:03d}_cp{grid.cp_rank:03d}.pt")
