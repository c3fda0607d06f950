"""Megatron-LM's ``torch_dist`` checkpoint format, read and written with torch.distributed.checkpoint
in one process (docs/megatron.md).

An iteration folder of this format holds::

    .metadata            torch.distributed.checkpoint's index: every key's global shape and stored chunks
    __R_N.distcp         the stored chunks (any number of files; one here)
    common.pt            torch.save of what is not a tensor shard: args, checkpoint_version, iteration
    metadata.json        {"sharded_backend": "torch_dist", ...}: the backends that wrote it

Keys are megatron-core's *sharded* keys, which do not depend on the layout that wrote them: a
tensor's key names it once for the whole model, its global shape is its TP=1 shape, and the layers of
the decoder are stacked on a leading axis, ``decoder.layers.mlp.linear_fc2.weight: [L, h, ffn]``.  The
sharded keys always use Transformer Engine's names for the two fused layer norms
(``decoder.layers.self_attention.linear_qkv.layer_norm_weight``), whichever layer spec wrote them, and
a tied output layer is not stored (its key is the word embedding's).  Each linear's ``_extra_state`` is a
per-layer byte object ``<key>/shard_<layer>_<L>``.  Because every value is global, one process writes
whole tensors and megatron-core's loader, at any TP x PP, reads its slices of them.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Tuple

import torch

from megalite.checkpoint.megatron_args import CHECKPOINT_VERSION

__all__ = ["is_dist_checkpoint", "write_dist", "read_dist", "COMMON_FILE", "METADATA_FILE"]

Tensors = Dict[str, torch.Tensor]
COMMON_FILE = "common.pt"
METADATA_FILE = "metadata.json"
BACKENDS = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
            "common_backend_version": 1}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED = "decoder.layers."
_LOCAL_NORMS = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_MODEL_KEYS = ("embedding.", "decoder.", "output_layer.")


def is_dist_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, METADATA_FILE)) or os.path.isfile(os.path.join(folder, ".metadata"))


def _sharded_layer_name(rest: str) -> str:
    for local, fused in _LOCAL_NORMS:
        if rest.startswith(local):
            return fused + rest[len(local):]
    return rest


def write_dist(state: Tensors, folder: str, *, args, iteration: int) -> str:
    """Write a global megatron-core ``state`` (either layer spec's names) as a ``torch_dist`` iteration folder."""
    import torch.distributed.checkpoint as dcp

    layers: Dict[str, Dict[int, torch.Tensor]] = {}
    flat: Dict[str, object] = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match:
            layers.setdefault(_STACKED + _sharded_layer_name(match.group(2)), {})[int(match.group(1))] = tensor
        else:
            flat[name] = tensor.contiguous()
    count = args.num_layers
    for key, by_layer in layers.items():
        if sorted(by_layer) != list(range(count)):
            raise ValueError(f"{key} is held by layers {sorted(by_layer)}, not all {count}; the state is incomplete")
        flat[key] = torch.stack([by_layer[i] for i in range(count)])
    for module in _LINEARS:
        for layer in range(count):
            # megatron-core stores a sharded object as torch.save of the list of its values: [None] here
            flat[f"{_STACKED}{module}._extra_state/shard_{layer}_{count}"] = [None]
    os.makedirs(folder, exist_ok=True)
    # Not flattened: the object lists must be stored as one pickled value each, as megatron-core does.
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(folder), no_dist=True,
             planner=dcp.DefaultSavePlanner(flatten_state_dict=False))
    torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                "num_floating_point_operations_so_far": 0}, os.path.join(folder, COMMON_FILE))
    with open(os.path.join(folder, METADATA_FILE), "w") as f:
        json.dump(BACKENDS, f)
    return folder


def read_dist(folder: str) -> Tuple[Tensors, object]:
    """(global megatron-core state with per-layer names, args) of a ``torch_dist`` iteration folder.

    Only the model's tensors are read (optimizer and RNG entries are left on disk); the stacked layer
    tensors are unstacked into ``decoder.layers.N.<name>`` under Transformer Engine's norm names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with open(os.path.join(folder, METADATA_FILE)) as f:
        backend = json.load(f).get("sharded_backend")
    if backend != "torch_dist":
        raise ValueError(f"{folder}/{METADATA_FILE} names sharded_backend {backend!r}; only torch_dist is read "
                         f"(convert zarr checkpoints with Megatron-LM first)")
    # Megatron's own common.pt pickles an argparse.Namespace: read only checkpoints you trust.
    common = torch.load(os.path.join(folder, COMMON_FILE), map_location="cpu", weights_only=False)
    if getattr(common.get("args"), "num_experts", None):
        raise ValueError(f"{folder}: experts in --ckpt-format torch_dist are not converted yet; convert it to the "
                         f"legacy format with Megatron-LM's --ckpt-convert-format torch first")
    reader = dcp.FileSystemReader(folder)
    wanted = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata) and key.startswith(_MODEL_KEYS):
            wanted[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load(wanted, storage_reader=reader, no_dist=True)
    state: Tensors = {}
    for key, tensor in wanted.items():
        if key.startswith(_STACKED):
            for layer, value in enumerate(tensor.unbind(0)):
                state[f"decoder.layers.{layer}.{key[len(_STACKED):]}"] = value.clone()
        else:
            state[key] = tensor
    return state, common.get("args")
