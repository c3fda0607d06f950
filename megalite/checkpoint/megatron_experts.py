"""megalite's MoE tensors as megatron-core names them, in both of its expert layouts, and the expert-parallel
split of Megatron-LM's legacy files (docs/megatron.md, "Experts").

megalite stacks a layer's experts: ``mlp.experts.weight1 [E, h, 2f]`` (``x @ weight1[e]``, SwiGLU's gate and up
interleaved per unit as in its dense MLP), ``weight2 [E, f, h]``, with --add-bias-linear ``bias1 [E, 2f]`` and
``bias2 [E, h]``.  megatron-core holds one linear per expert, ``[out, in]`` as ``nn.Linear``, fc1's rows
``[gate; up]``:

    sequential   SequentialMLP (the local spec, or the Transformer Engine spec without --moe-grouped-gemm):
                 ``mlp.experts.local_experts.{k}.linear_fc1.weight [2f, h]``, ``linear_fc2.weight [h, f]``,
                 ``.bias`` beside each, an ``_extra_state`` per linear
    grouped      TEGroupedMLP (Transformer Engine spec with --moe-grouped-gemm): ``mlp.experts.linear_fc1.weight{k}``,
                 ``linear_fc2.weight{k}``, ``bias{k}``, one ``_extra_state`` per grouped linear

``k`` is the expert's *local* index on its expert-parallel rank (rank r of EP holds experts r E/EP ...
(r+1) E/EP - 1); in the global megatron-core state (EP 1) it is the global index.  The rest is renamed only:
``mlp.router.weight [E, h]`` and ``mlp.router.expert_bias [E]`` keep their names, megalite's
``mlp.shared_expert.*`` is ``mlp.shared_experts.*`` and ``mlp.shared_expert_gate [1, h]`` is
``mlp.shared_experts.gate_weight``.  With --add-bias-linear megatron-core's router has a bias ``[E]`` added to
the logits, which megalite's router lacks: an export writes zeros, an import refuses any other value.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch

__all__ = ["LAYOUTS", "is_expert_tensor", "experts_to_megatron", "experts_from_megatron", "shared_to_megatron",
           "shared_from_megatron", "expert_index", "split_for_ep", "join_from_ep", "to_gate_up", "from_gate_up"]

Tensors = Dict[str, torch.Tensor]
LAYOUTS = ("sequential", "grouped")
_STACKED = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)(weight1|weight2|bias1|bias2)$")
_SEQUENTIAL = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.(.+)$")
_GROUPED = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")
# megalite's stacked tensor -> (megatron-core's linear, its parameter)
_PARTS = {"weight1": ("linear_fc1", "weight"), "weight2": ("linear_fc2", "weight"),
          "bias1": ("linear_fc1", "bias"), "bias2": ("linear_fc2", "bias")}
_SHARED = (("mlp.shared_expert_gate", "mlp.shared_experts.gate_weight"), ("mlp.shared_expert.", "mlp.shared_experts."))
_ROUTER_BIAS = re.compile(r"^decoder\.layers\.\d+\.mlp\.router\.bias$")


def is_expert_tensor(name: str) -> bool:
    """Whether megalite's ``name`` is a stacked expert tensor [E, ...]."""
    return _STACKED.match(name) is not None


def _expert_name(prefix: str, linear: str, param: str, expert: int, layout: str) -> str:
    if layout == "sequential":
        return f"{prefix}local_experts.{expert}.{linear}.{param}"
    return f"{prefix}{linear}.{param}{expert}"


def to_gate_up(tensor: torch.Tensor) -> torch.Tensor:
    """A SwiGLU fc1's rows from megalite's interleaved (gate_0, up_0, gate_1, ...) to megatron-core's [gate; up]."""
    return torch.cat([tensor[0::2], tensor[1::2]])


def from_gate_up(tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_gate_up`: megatron-core's [gate; up] rows interleaved as megalite's."""
    gate, up = tensor.chunk(2)
    return torch.stack([gate, up], 1).reshape(-1, *tensor.shape[1:])


def experts_to_megatron(name: str, stacked: torch.Tensor, swiglu: bool, layout: str) -> Tensors:
    """megalite's stacked ``name`` [E, ...] as E megatron-core tensors under global indices."""
    prefix, part = _STACKED.match(name).groups()
    linear, param = _PARTS[part]
    out: Tensors = {}
    for expert, tensor in enumerate(stacked.unbind(0)):
        if param == "weight":
            tensor = tensor.t()                                       # x @ W  ->  nn.Linear's [out, in]
        if swiglu and linear == "linear_fc1":                         # (gate_0, up_0, ...) -> [gate; up]
            tensor = to_gate_up(tensor)
        out[_expert_name(prefix, linear, param, expert, layout)] = tensor.contiguous()
    return out


def experts_from_megatron(state: Tensors, swiglu: bool) -> Tensors:
    """``state`` with megatron-core's per-expert tensors (either layout, global indices) stacked as megalite's;
    the experts' ``_extra_state`` entries dropped."""
    out: Tensors = {}
    experts: Dict[str, Dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        sequential, grouped = _SEQUENTIAL.match(name), _GROUPED.match(name)
        if sequential:
            prefix, expert, linear, param = sequential.groups()
        elif grouped:
            prefix, linear, param, expert = grouped.groups()
        else:
            out[name] = tensor
            continue
        if param.endswith("_extra_state"):
            continue
        part = next(ours for ours, theirs in _PARTS.items() if theirs == (linear, param))
        experts.setdefault(prefix + part, {})[int(expert)] = tensor
    for name, by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"{name}: the checkpoint holds experts {sorted(by_expert)}, not 0..{len(by_expert) - 1}")
        tensors = [by_expert[expert] for expert in range(len(by_expert))]
        if swiglu and name.endswith("1"):                             # [gate; up] -> (gate_0, up_0, ...)
            tensors = [from_gate_up(tensor) for tensor in tensors]
        if name.endswith(("weight1", "weight2")):
            tensors = [tensor.t() for tensor in tensors]
        out[name] = torch.stack(tensors)
    return out


def shared_to_megatron(name: str) -> str:
    """megatron-core's name of megalite's shared-expert tensor ``name`` (other names unchanged)."""
    for ours, theirs in _SHARED:
        if ours in name:
            return name.replace(ours, theirs)
    return name


def shared_from_megatron(name: str, tensor: torch.Tensor):
    """megalite's name of megatron-core's ``name``; None for the router's bias (zero: megalite's router has
    none), a ValueError when it is not zero."""
    if _ROUTER_BIAS.match(name):
        if torch.count_nonzero(tensor):
            raise ValueError(f"{name} is not zero: megalite's router has no bias (Megatron-LM adds one with "
                             f"--add-bias-linear); this checkpoint cannot be converted")
        return None
    for ours, theirs in _SHARED:
        if theirs in name:
            return name.replace(theirs, ours)
    return name


def expert_index(name: str):
    """(name with the expert index replaced by ``{}``, the index) of a per-expert megatron-core entry, else None."""
    sequential = re.match(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..+)$", name)
    if sequential:
        return sequential.group(1) + "{}" + sequential.group(3), int(sequential.group(2))
    grouped = _GROUPED.match(name)
    if grouped:
        prefix, linear, param, expert = grouped.groups()
        return f"{prefix}{linear}.{param}{{}}", int(expert)
    return None


def split_for_ep(model: dict, num_experts: int, ep: int) -> List[dict]:
    """The ``ep`` expert-parallel ranks' shares of one rank's megatron-core ``model`` (global expert indices):
    rank r keeps experts r E/EP ... under local indices 0 ..., and every other entry."""
    local = num_experts // ep
    shares: List[dict] = [{} for _ in range(ep)]
    for name, tensor in model.items():
        indexed = expert_index(name)
        if indexed is None:
            for share in shares:
                share[name] = tensor
        else:
            pattern, expert = indexed
            shares[expert // local][pattern.format(expert % local)] = tensor
    return shares


def join_from_ep(shares: List[dict]) -> dict:
    """The per-expert entries of the expert-parallel ranks' ``shares`` under global indices (the experts of
    :func:`split_for_ep`; the other entries are left out)."""
    local = 1 + max((indexed[1] for indexed in map(expert_index, shares[0]) if indexed), default=-1)
    out: dict = {}
    for rank, share in enumerate(shares):
        for name, tensor in share.items():
            indexed = expert_index(name)
            if indexed is not None:
                pattern, expert = indexed
                out[pattern.format(rank * local + expert)] = tensor
    return out
