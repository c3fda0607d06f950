"""Save and resume training: model, optimizer, LR schedule, every RNG and the data position.

Layout on disk, Megatron-LM's (one folder per tensor x pipeline rank)::

    SAVE/latest_checkpointed_iteration.txt        "10"
    SAVE/iter_0000010/mp_rank_{tp:02d}_{pp:03d}/
        model_optim_rng.pt     model (one entry per virtual chunk), optimizer, scheduler, iteration,
                               consumed samples, the run's settings; written by DP rank 0 of CP rank 0
        optimizer_dp{dp:03d}_cp{cp:03d}.pt   the optimizer shard of each DP rank (only with ZeRO-1)
        experts_ep{ep:03d}.pt                under EP > 1: the experts of each EP rank but 0 (expert_files.py)
        rng_dp{dp:03d}_cp{cp:03d}.pt         every rank's RNG states (torch CPU/CUDA, python, numpy,
                                             the TP RNG tracker): dropout masks differ per rank
    SAVE/iter_0000010/tensor_index.pt               every saved tensor as a slice of a logical tensor
                                                    (index.py), the layout, scheduler, step
    SAVE/iter_0000010/manifest.json                 size and CRC-32 of every file, the run's id; written
                                                    last, then the tracker (manifest.py)

Loading has one public door, ``reshard.load_any_layout``: a checkpoint of this run's own layout is
read file for file by :func:`load_same_layout` here; a different layout (TP, PP, virtual PP, CP, DP,
ZeRO-1) is filled through the tensor index by ``reshard.py``.

Everything is stored as tensors and plain python containers and read back with
``torch.load(weights_only=True)``: loading a checkpoint never runs code from the file.  Resuming
restores the exact state, so the resumed loss curve is the uninterrupted one bit for bit.
"""
from __future__ import annotations

import os
import random
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megalite.checkpoint.expert_files import (
    describe_experts,
    experts_file,
    experts_state,
    indexes_model_experts,
    merge_experts,
    reads_experts,
    writes_experts,
)
from megalite.checkpoint.index import (
    Place,
    Slice,
    chunk_layer_numbers,
    describe_model,
    describe_optimizer,
    is_expert_shard,
    parameter_names,
)
from megalite.checkpoint.manifest import (
    MANIFEST,
    CheckpointError,
    durable_write,
    file_entry,
    fsync_dir,
    read_manifest,
    verify_file,
    write_manifest,
)
from megalite.checkpoint.paths import TENSOR_INDEX, TRACKER_FILE, iteration_dir, rank_dir
from megalite.checkpoint.reader import choose_iteration, load_file, required_manifest
from megalite.optim.optimizer import MegaliteOptimizer
from megalite.optim.schedulers import LRScheduler
from megalite.parallel.data_parallel import unwrap_model
from megalite.parallel.param_gather import whole_parameters, write_back_shards
from megalite.parallel.param_info import param_info
from megalite.parallel.random import get_rng_tracker
from megalite.parallel.state import ProcessGrid


# -- RNG -------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    """All RNG states of this process, as tensors and plain containers."""
    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    state["tracker"] = get_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if "tracker" in state:
        get_rng_tracker().set_states(state["tracker"])


# -- model -----------------------------------------------------------------------------------------
def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    # A view into a larger buffer (contiguous grad/param buffers) would save the whole buffer.
    tensor = tensor.detach()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor.cpu()


def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def partition_metadata(chunk: torch.nn.Module) -> dict:
    """For each parameter: its TP partition dimension (None when replicated), so shards can be merged."""
    meta = {}
    for name, param in unwrap_model(chunk).named_parameters():
        meta[name] = param_info(param).partition_dim
    return meta


# -- save ------------------------------------------------------------------------------------------
def saved_layout(grid: ProcessGrid, sharded_optimizer) -> dict:
    """What decides which files hold which tensors; a checkpoint loads file for file only at its own.

    ``sharded_optimizer``: False, True (ZeRO-1), or the sharding strategy's name: ZeRO-3 cuts its buckets at
    gather units (parallel/grad_buffer.py), so its optimizer pieces differ from ZeRO-1/2's."""
    layout = {"tp": grid.tp_size, "pp": grid.pp_size, "vpp": grid.virtual_pp_size or 1, "cp": grid.cp_size,
              "dp": grid.dp_size, "zero1": bool(sharded_optimizer)}
    if sharded_optimizer == "optim_grads_params":
        layout["buckets_at_units"] = True
    if grid.ep_size > 1:     # named only when used, so that an EP 1 layout reads as before EP existed
        layout["ep"] = grid.ep_size
    if getattr(grid, "etp_size", 1) > 1:   # likewise expert TP (the experts' ffn split over TP)
        layout["etp"] = grid.etp_size
    return layout


def _describe_saved_tensors(model_chunks, optimizer, grid: ProcessGrid, shard: str, sharded_optimizer: bool,
                            layer_numbers, suffix: str) -> List[Slice]:
    """The slices (index.py) of the tensors this rank just wrote, for the iteration's index."""
    layer_numbers = chunk_layer_numbers(model_chunks, layer_numbers)
    slices = []
    names = parameter_names(model_chunks, layer_numbers)
    model_file = os.path.join(shard, "model_optim_rng.pt")
    place = Place.of(grid)
    if grid.dp_rank == 0 and grid.cp_rank == 0:
        keep = (lambda tensor: True) if indexes_model_experts(grid) else \
            (lambda tensor: not is_expert_shard(tensor, place))     # indexed from their first writer's file
        slices += describe_model(model_chunks, layer_numbers, place, model_file, keep=keep)
        if optimizer is not None and not sharded_optimizer:
            slices += describe_optimizer(optimizer, names, place, model_file, root=["optimizer"], keep=keep)
    if writes_experts(grid):
        slices += describe_experts(model_chunks, optimizer, names, layer_numbers, place,
                                   os.path.join(shard, experts_file(grid.ep_rank)), sharded_optimizer)
    if optimizer is not None and sharded_optimizer:
        slices += describe_optimizer(optimizer, names, place, os.path.join(shard, "optimizer_" + suffix))
    return slices


def _save(obj, path: str) -> None:
    durable_write(path, lambda f: torch.save(obj, f))


def _check_not_another_runs(root: str, iteration: int, run_id: str, grid: ProcessGrid) -> None:
    """Rank 0 looks, every rank learns: an iteration another run finished is never overwritten.  A
    manifest of this run's own (a resumed run saving the same iteration again) is removed first."""
    verdict = [None]
    if grid.rank == 0:
        folder = iteration_dir(root, iteration)
        try:
            manifest = read_manifest(folder)
        except CheckpointError:
            manifest = {"run_id": "unknown (unreadable manifest)"}
        if manifest is not None and manifest.get("run_id") != run_id:
            verdict[0] = (f"--save {root}: iteration {iteration} there was written by another run (run "
                          f"{manifest.get('run_id')}, this is run {run_id}); save to a new folder, or move that "
                          f"one away")
        elif manifest is not None:
            os.remove(os.path.join(folder, MANIFEST))
            fsync_dir(folder)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])


def save_checkpoint(root: str, iteration: int, model_chunks: Sequence[torch.nn.Module], optimizer: MegaliteOptimizer,
                    scheduler: LRScheduler, grid: ProcessGrid,
                    *, consumed_samples: int, run_id: str, settings: Optional[dict] = None,
                    sharded_optimizer: bool = False, layer_numbers: Optional[Sequence[Sequence[int]]] = None) -> str:
    """Write iteration ``iteration`` under ``root`` (collective over all ranks); returns its folder.

    ``settings`` is a plain dict of the run's configs (kept so tools can rebuild the model);
    ``sharded_optimizer`` saves each DP rank's optimizer state (ZeRO-1) instead of DP rank 0's.
    Files are made durable, then rank 0 writes the manifest (megalite/checkpoint/manifest.py), then the tracker.
    """
    _check_not_another_runs(root, iteration, run_id, grid)
    folder = rank_dir(root, iteration, grid.tp_rank, grid.pp_rank)
    os.makedirs(folder, exist_ok=True)
    suffix = f"dp{grid.dp_rank:03d}_cp{grid.cp_rank:03d}.pt"
    written = []
    with whole_parameters(model_chunks):      # ZeRO-3: a collective over DP x CP, so every rank gathers
        if grid.dp_rank == 0 and grid.cp_rank == 0:
            written.append("model_optim_rng.pt")
            _save(_model_file(iteration, model_chunks, optimizer, scheduler, grid, consumed_samples, settings,
                              sharded_optimizer, layer_numbers), os.path.join(folder, written[-1]))
        if writes_experts(grid):
            written.append(experts_file(grid.ep_rank))
            _save(experts_state(model_chunks, optimizer, Place.of(grid), sharded_optimizer),
                  os.path.join(folder, written[-1]))
        slices = _describe_saved_tensors(model_chunks, optimizer, grid, os.path.basename(folder),
                                         sharded_optimizer, layer_numbers, suffix)
    if optimizer is not None and sharded_optimizer:
        written.append("optimizer_" + suffix)
        _save(optimizer.state_dict(), os.path.join(folder, written[-1]))
    written.append("rng_" + suffix)
    _save(get_rng_state(), os.path.join(folder, written[-1]))
    fsync_dir(folder)
    mine = {os.path.join(os.path.basename(folder), name): file_entry(os.path.join(folder, name)) for name in written}
    # Only rank 0 writes the index and the manifest, so only rank 0 receives every rank's part.
    everyone: Optional[list] = [None] * grid.world_size if grid.rank == 0 else None
    dist.gather_object((mine, slices), everyone, dst=0)
    # Only when every rank's files are durable and listed is the checkpoint announced.
    if grid.rank == 0:
        _write_index_and_announce(root, iteration, everyone, optimizer, scheduler, grid, consumed_samples, run_id,
                                  sharded_optimizer)
    dist.barrier()
    return iteration_dir(root, iteration)


def _model_file(iteration: int, model_chunks, optimizer, scheduler, grid: ProcessGrid, consumed_samples: int,
                settings: Optional[dict], sharded_optimizer: bool, layer_numbers) -> dict:
    """What a (TP, PP) shard's model_optim_rng.pt holds: its chunks, the run's settings and position, and
    (without ZeRO-1) the optimizer state."""
    state = {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "layout": {"tp": grid.tp_size, "pp": grid.pp_size, "vpp": grid.virtual_pp_size or 1, "cp": grid.cp_size,
                   "ep": grid.ep_size, "tp_rank": grid.tp_rank, "pp_rank": grid.pp_rank},
        "settings": settings or {},
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "partition_dims": [partition_metadata(c) for c in model_chunks],
        "layer_numbers": [list(ln) for ln in layer_numbers] if layer_numbers is not None else None,
    }
    for i, chunk in enumerate(model_chunks):
        state[_model_key(i, len(model_chunks))] = {k: _own_storage(v)
                                                    for k, v in unwrap_model(chunk).state_dict().items()}
    if optimizer is not None and not sharded_optimizer:
        state["optimizer"] = optimizer.state_dict()
    return state


def _write_index_and_announce(root: str, iteration: int, everyone: list, optimizer, scheduler, grid: ProcessGrid,
                              consumed_samples: int, run_id: str, sharded_optimizer: bool) -> None:
    """Rank 0, once every rank's files are durable: the tensor index, then the manifest, then the tracker."""
    files = {path: entry for rank_files, _ in everyone for path, entry in rank_files.items()}
    index = {"format": 1, "iteration": iteration, "consumed_samples": consumed_samples,
             "layout": saved_layout(grid, sharded_optimizer),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "optimizer": None if optimizer is None else
             {k: v for k, v in optimizer.state_dict().items() if k != "pieces"},
             "slices": [part.to_saved() for _, rank_slices in everyone for part in rank_slices],
             "no_optimizer_because": None}
    _save(index, os.path.join(iteration_dir(root, iteration), TENSOR_INDEX))
    files[TENSOR_INDEX] = file_entry(os.path.join(iteration_dir(root, iteration), TENSOR_INDEX))
    write_manifest(iteration_dir(root, iteration), iteration, run_id, files)
    durable_write(os.path.join(root, TRACKER_FILE), lambda f: f.write(str(iteration).encode()))


# -- load ------------------------------------------------------------------------------------------
class Resumed(NamedTuple):
    iteration: int
    consumed_samples: int
    run_id: Optional[str]       # None: nothing was loaded


def _files_to_read(folder: str, suffix: str, sharded_optimizer: bool, load_optimizer: bool,
                   load_rng: bool, experts: Optional[str]) -> List[str]:
    names = ["model_optim_rng.pt"] + ([experts] if experts else [])
    if load_optimizer and sharded_optimizer:
        names.append("optimizer_" + suffix)
    if load_rng:
        names.append("rng_" + suffix)
    return [os.path.join(os.path.basename(folder), name) for name in names]


def verify_everywhere(root: str, iteration: int, relatives: List[str], manifest: dict,
                       grid: ProcessGrid) -> Dict[str, str]:
    """Every rank checks its own files; every rank learns of any fault, so all stop together."""
    fault = None
    paths = {}
    try:
        for relative in relatives:
            paths[relative] = verify_file(iteration_dir(root, iteration), relative, manifest)
    except CheckpointError as error:
        fault = str(error)
    stop_together(fault, grid, CheckpointError)
    return paths


def stop_together(fault: Optional[str], grid: ProcessGrid, error: type = ValueError) -> None:
    """Every rank learns of any rank's fault (None: this rank has none) and all raise ``error``: with
    their own message, or the first faulty rank's -- instead of the healthy ones waiting on it."""
    faults: list = [None] * grid.world_size
    dist.all_gather_object(faults, fault)
    if fault is not None:
        raise error(fault)
    for rank, other in enumerate(faults):
        if other is not None:
            raise error(f"rank {rank}: {other}")


def _load_model_chunks(model_chunks: Sequence[torch.nn.Module], state: dict) -> None:
    with whole_parameters(model_chunks):      # ZeRO-3 holds shards; the file holds whole parameters
        for i, chunk in enumerate(model_chunks):
            unwrap_model(chunk).load_state_dict(state[_model_key(i, len(model_chunks))])
        write_back_shards(model_chunks)


def _check_same_layout(root: str, layout: dict, current: dict) -> None:
    mine = {key: current.get(key, 1) for key in ("tp", "pp", "vpp", "cp", "ep")}
    saved = {key: layout.get(key, 1) for key in mine}     # a layout that names no "cp" was saved at CP=1
    if saved != mine:
        raise ValueError(f"--load {root}: checkpoint was saved with TP={saved['tp']} PP={saved['pp']} "
                         f"virtual PP={saved['vpp']} CP={saved['cp']} EP={saved['ep']}, this run has TP={mine['tp']} "
                         f"PP={mine['pp']} virtual PP={mine['vpp']} CP={mine['cp']} EP={mine['ep']}; load it through "
                         f"megalite.checkpoint.reshard.load_any_layout, or run with the saved layout")


def load_same_layout(root: str, model_chunks: Sequence[torch.nn.Module], optimizer: MegaliteOptimizer,
                    scheduler: LRScheduler, grid: ProcessGrid, *,
                    iteration: Optional[int] = None, sharded_optimizer: bool = False,
                    load_optimizer: bool = True, load_rng: bool = True, weights_only: bool = False) -> Resumed:
    """Restore the state saved by :func:`save_checkpoint`.

    With no checkpoint under ``root`` returns iteration 0 (a fresh run), as Megatron does.  Every file
    is checked against the iteration's manifest first; a missing RNG file is an error unless
    ``load_rng`` is False (``--no-load-rng``).  ``weights_only`` (``--finetune``) takes the model and
    nothing else, and returns iteration 0.
    """
    if weights_only:
        load_optimizer = load_rng = False
    if iteration is None:
        iteration = choose_iteration(root)
        if iteration is None:
            return Resumed(0, 0, None)
    folder = rank_dir(root, iteration, grid.tp_rank, grid.pp_rank)
    if not os.path.isdir(folder):
        saved = sorted(os.listdir(iteration_dir(root, iteration))) if os.path.isdir(iteration_dir(root, iteration)) \
            else []
        raise ValueError(f"--load {root}: iteration {iteration} has no folder for TP rank {grid.tp_rank}, PP rank "
                         f"{grid.pp_rank} (found {saved}), although its index says it was saved at this layout: the "
                         f"checkpoint is incomplete; load another iteration")
    manifest = required_manifest(root, iteration)
    suffix = f"dp{grid.dp_rank:03d}_cp{grid.cp_rank:03d}.pt"
    relatives = _files_to_read(folder, suffix, sharded_optimizer, load_optimizer and optimizer is not None, load_rng,
                               reads_experts(grid))
    paths = verify_everywhere(root, iteration, relatives, manifest, grid)
    state = load_file(paths[relatives[0]])
    _check_same_layout(root, state["layout"], saved_layout(grid, sharded_optimizer))
    if reads_experts(grid):     # this EP rank's experts replace EP rank 0's (expert_files.py)
        merge_experts(state, load_file(paths[os.path.join(os.path.basename(folder), reads_experts(grid))]),
                      len(model_chunks))
    _load_model_chunks(model_chunks, state)
    if optimizer is not None and hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()  # fp32 masters of a half-precision model follow the loaded weights
    if optimizer is not None and load_optimizer:
        if sharded_optimizer:
            optimizer.load_state_dict(load_file(paths[os.path.join(os.path.basename(folder), "optimizer_" + suffix)]))
        elif "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        else:
            raise ValueError(f"--load {root}: the checkpoint holds sharded optimizer states (saved with "
                             f"--use-distributed-optimizer); pass that flag to resume")
    # After the optimizer: its load_state_dict replaces the param groups the scheduler sets lr in.
    if weights_only:
        return Resumed(0, 0, None)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if load_rng:
        set_rng_state(load_file(paths[relatives[-1]]))
    return Resumed(int(state["iteration"]), int(state["consumed_samples"]),
                   manifest.get("run_id"))
