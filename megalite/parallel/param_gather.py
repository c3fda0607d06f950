"""ZeRO-3: parameters sharded at rest, gathered unit by unit just before use, then dropped.

A *unit* is a module whose parameters are gathered together: each element of the model's module lists
(the transformer layers) and each other child that holds parameters (embedding, final norm, output
layer).  Its buckets (``grad_buffer.py``; under ZeRO-3 no bucket spans two units) are all-gathered::

    forward pre-hook of a unit     gather its buckets (wait for a prefetch if one is in flight)
    forward post-hook              drop them again -- unless recomputing (backward follows at once) --
                                   and hook the unit's outputs: their gradient arriving means the unit's
                                   backward is next
    hook on an output's gradient   gather the unit's buckets again (its backward needs the weights)
    a bucket's last gradient       (data_parallel.py) reduce-scatter it, then drop its parameters

Autograd saves a parameter for backward as the parameter itself, so pointing ``param.data`` at a fresh
gathered copy before the unit's backward gives backward the same values; a dropped parameter is an
empty tensor, and the memory of the whole parameters is freed.

Overlap (``--overlap-param-gather``): gathering a unit also launches the next unit's all-gather (the
previous unit's in backward), so it travels while this unit computes.  Under ZeRO-1/2 the same flag lets
the all-gathers after the optimizer step run into the next forward: :class:`AfterStepGatherWait`.

Outside a unit's forward and backward (checkpoints, exports, tests) the parameters are read inside
:func:`whole_parameters`; a state dict asked for while they are dropped raises instead of holding empty tensors.

What needs the parameters outside these two windows cannot run on them, and is refused at argument time
(``training/arguments.py``, ``check_zero3_composes``): the zb-h1 pipeline schedule computes weight gradients
after the unit's backward, when they are dropped again; a torch.compile'd layer's backward rejects the
parameters re-pointed at their gathered copy (it takes them for tensors modified in place since its forward).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch

from megalite.parallel.collectives import all_gather_into
from megalite.parallel.grad_buffer import Bucket
from megalite.parallel.random import is_recomputing


def gather_units(module: torch.nn.Module) -> List[torch.nn.Module]:
    """The modules whose parameters are gathered together, in registration (= forward) order."""
    units = []

    def visit(parent: torch.nn.Module) -> None:
        for child in parent.children():
            if isinstance(child, torch.nn.ModuleList):
                units.extend(m for m in child if any(True for _ in m.parameters()))
            elif any(isinstance(m, torch.nn.ModuleList) for m in child.modules()):
                visit(child)
            elif any(True for _ in child.parameters()):
                units.append(child)
    visit(module)
    return units


def unit_assignment(module: torch.nn.Module, units: Sequence[torch.nn.Module]) -> Dict[int, int]:
    """id(param) -> the first unit that holds it; parameters of no unit belong to the root (index -1)."""
    owner: Dict[int, int] = {}
    for i, unit in enumerate(units):
        for param in unit.parameters():
            owner.setdefault(id(param), i)
    for param in module.parameters():
        owner.setdefault(id(param), -1)
    return owner


def start_gather(bucket: Bucket) -> None:
    """Launch the all-gather of a dropped bucket's parameters (no-op if gathered or in flight)."""
    if bucket.param_data is not None:
        return
    if bucket.group_size == 1:
        bucket.param_data = bucket.param_shard
        bucket.point_params()
        return
    bucket.param_data = bucket.gather_target()
    bucket.gather_work = all_gather_into(bucket.param_data, bucket.param_shard, group=bucket.group, async_op=True)


def finish_gather(bucket: Bucket) -> None:
    """Gathered and pointed to: wait for the bucket's all-gather, if one is in flight."""
    start_gather(bucket)
    work = getattr(bucket, "gather_work", None)
    if work is not None:
        work.wait()
        bucket.gather_work = None
        bucket.point_params()


def drop(bucket: Bucket) -> None:
    if bucket.param_data is None:
        return
    finish_gather(bucket)      # never drop under an in-flight collective
    bucket.release_params()


def buckets_of_units(units: Sequence[torch.nn.Module], buckets: Sequence[Bucket]) -> List[List[Bucket]]:
    """For each unit, the buckets holding its parameters (by bucket index)."""
    bucket_of = {id(p): b for b in buckets for p in b.params}
    result = []
    for unit in units:
        mine = {bucket_of[id(p)].index: bucket_of[id(p)] for p in unit.parameters() if id(p) in bucket_of}
        result.append([mine[i] for i in sorted(mine)])
    return result


class ParamGather:
    """The hooks that gather a ZeRO-3 chunk's units around their forward and backward (module docstring)."""

    def __init__(self, module: torch.nn.Module, buckets: Sequence[Bucket], overlap: bool):
        self.units = gather_units(module)
        self.buckets = list(buckets)
        self.unit_buckets = buckets_of_units(self.units, buckets)
        covered = {id(b) for bs in self.unit_buckets for b in bs}
        self.root_buckets = [b for b in buckets if id(b) not in covered]
        self.overlap = overlap
        self.num_gathers = 0         # all-gathers launched (tests read it)
        self.handles = []
        for i, unit in enumerate(self.units):
            self.handles.append(unit.register_forward_pre_hook(self._pre_forward(i)))
            self.handles.append(unit.register_forward_hook(self._post_forward(i)))
        self.handles.append(module.register_forward_pre_hook(lambda *_: self._gather(self.root_buckets)))
        self.handles.append(module.register_state_dict_pre_hook(self._refuse_dropped))

    def _refuse_dropped(self, module, prefix, keep_vars) -> None:
        # A dropped parameter is an empty tensor: a state dict of them would be silently empty.
        if any(bucket.param_data is None for bucket in self.buckets):
            raise RuntimeError("the state dict of a ZeRO-3 model (--data-parallel-sharding-strategy "
                               "optim_grads_params) was asked for while its parameters are sharded; read it inside "
                               "megalite.parallel.param_gather.whole_parameters(model_chunks), which every "
                               "data-parallel rank enters")

    def _gather(self, buckets: Sequence[Bucket], prefetch: Optional[Sequence[Bucket]] = None) -> None:
        for bucket in buckets:
            if bucket.param_data is None:
                self.num_gathers += 1
            start_gather(bucket)
        if self.overlap and prefetch:
            for bucket in prefetch:
                if bucket.param_data is None:
                    self.num_gathers += 1
                    start_gather(bucket)
        for bucket in buckets:
            finish_gather(bucket)

    def _neighbour(self, i: int, step: int) -> Optional[List[Bucket]]:
        j = i + step
        return self.unit_buckets[j] if 0 <= j < len(self.units) else None

    def _pre_forward(self, i: int):
        def hook(module, args):
            self._gather(self.unit_buckets[i], self._neighbour(i, +1) if torch.is_grad_enabled() else None)
        return hook

    def _post_forward(self, i: int):
        def hook(module, args, output):
            if torch.is_grad_enabled():
                for tensor in _tensors(output):
                    if tensor.requires_grad:
                        tensor.register_hook(self._pre_backward(i))
            if is_recomputing():
                return          # the recomputed unit's backward runs next: keep its parameters
            keep = {id(b) for b in (self._neighbour(i, +1) or [])} if self.overlap else set()
            for bucket in self.unit_buckets[i]:
                if id(bucket) not in keep:
                    drop(bucket)
        return hook

    def _pre_backward(self, i: int):
        def hook(grad):
            self._gather(self.unit_buckets[i], self._neighbour(i, -1))
            return grad
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class AfterStepGatherWait:
    """ZeRO-1/2 with ``--overlap-param-gather``: the optimizer launches the all-gathers of the updated shards
    without waiting (``optim/distributed.py``, in forward order); each unit's forward pre-hook waits only for
    the buckets it reads, so the gathers of later layers travel while earlier ones compute."""

    def __init__(self, module: torch.nn.Module, buckets: Sequence[Bucket]):
        units = gather_units(module)
        self.buckets = list(buckets)
        self.handles = [unit.register_forward_pre_hook(_waits_for(mine))
                        for unit, mine in zip(units, buckets_of_units(units, buckets))]
        self.handles.append(module.register_forward_pre_hook(_waits_for(self.buckets)))   # whatever no unit holds

    def wait_all(self) -> None:
        wait_after_step_gathers(self.buckets)


def _waits_for(buckets: Sequence[Bucket]):
    def hook(module, args):
        wait_after_step_gathers(buckets)
    return hook


def wait_after_step_gathers(buckets: Sequence[Bucket]) -> None:
    for bucket in buckets:
        work = getattr(bucket, "gather_work", None)
        if work is not None:
            work.wait()
            bucket.gather_work = bucket.gather_input = None


def _tensors(output) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def _gathered_buckets(model_chunks: Sequence[torch.nn.Module]) -> List[Bucket]:
    return [b for chunk in model_chunks for b in getattr(chunk, "gathered_buckets", lambda: [])()]


@contextlib.contextmanager
def whole_parameters(model_chunks: Sequence[torch.nn.Module]):
    """Every chunk's parameters whole and current for the duration (checkpoints read or write them): ZeRO-3's
    gathered, ZeRO-1/2's after-step gathers waited for.  Values written into ZeRO-3's whole parameters reach
    the shards only through :func:`write_back_shards`."""
    wait_after_step_gathers([b for chunk in model_chunks for b in getattr(chunk, "buckets", [])])
    buckets = _gathered_buckets(model_chunks)
    for bucket in buckets:
        finish_gather(bucket)
    try:
        yield
    finally:
        for bucket in buckets:
            drop(bucket)


@torch.no_grad()
def write_back_shards(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Inside :func:`whole_parameters`: this rank's shards take the (just loaded) whole parameters' values."""
    for bucket in _gathered_buckets(model_chunks):
        if bucket.param_data is not bucket.param_shard:
            lo, hi = bucket.owned_range()
            bucket.param_shard.copy_(bucket.param_data[lo:hi])
