"""Where data parallelism keeps gradients and parameters: flat buffers cut into buckets, whole or sharded.

Layout.  The parameters of each dtype are placed in REVERSE registration order -- roughly the order
backward produces their grads -- into one flat range cut into buckets of at least ``bucket_size``
elements (whole parameters only), so bucket 0 fills first::

    registration:  embed  layer0.w  layer0.b  layer1.w  layer1.b  head.w
    buffer:        [ head.w | layer1.b layer1.w | layer0.b layer0.w | embed ]
                   [ bucket 0 |      bucket 1      |      bucket 2      ...  ]

Sharding strategies (``--data-parallel-sharding-strategy``, one axis over the N = DP x CP ranks; Rajbhandari
et al. 2020, "ZeRO", stages 1-3).  Under any sharded strategy each bucket is padded to a multiple of
N x 64 elements and split into N equal contiguous shards; rank r owns shard r of every bucket::

    strategy              fp32 grads of a bucket           parameters of a bucket
    no_shard              whole, always                    the module's own tensors
    optim       (ZeRO-1)  whole, always                    whole, always (one flat buffer)
    optim_grads (ZeRO-2)  this rank's shard; whole only    whole, always (one flat buffer)
                          while the bucket is reduced
    optim_grads_params    this rank's shard; whole only    this rank's shard; whole only while a
                (ZeRO-3)  while the bucket is reduced      module that uses them runs (param_gather.py)

``grad_shard`` and ``param_shard`` are this rank's shard of a bucket (views of the whole bucket under
ZeRO-1, tensors of their own where the whole bucket is transient); the optimizer updates exactly these
(``optim/distributed.py``), so the optimizer state of every sharded strategy has the same shape.

A tied embedding gets a bucket of its own, so the first and the last pipeline stage shard it
identically and its grads can be summed shard-to-shard.  Under ZeRO-3 a bucket also never spans two
gather units (``unit_of``): a unit's buckets are gathered together, just before the unit runs.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megalite.parallel.param_info import keep_local_shape, param_info

SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
SHARD_ALIGNMENT = 64              # elements per shard are a multiple of this (256-byte fp32 rows)


def shards_grads(strategy: str) -> bool:
    return strategy in ("optim_grads", "optim_grads_params")


def shards_params(strategy: str) -> bool:
    return strategy == "optim_grads_params"


class Bucket:
    """A contiguous range of a buffer whose grads are reduced by one collective (and, under ZeRO-3, whose
    parameters are gathered by one)."""

    def __init__(self, index: int, params: List[torch.nn.Parameter], offset: int, numel: int,
                 param_range: Dict[int, tuple]):
        self.index = index
        self.params = params            # in buffer order
        self.offset = offset            # start in the buffer
        self.numel = numel              # padded size
        self.param_range = param_range  # id(param) -> (start, end) within the bucket
        self.shapes = {id(p): p.shape for p in params}   # a dropped ZeRO-3 parameter is empty
        self.grad_data: Optional[torch.Tensor] = None    # fp32 [numel]; None at rest under ZeRO-2/3
        self.grad_shard: Optional[torch.Tensor] = None   # fp32 [numel / N] (sharded strategies)
        self.param_data: Optional[torch.Tensor] = None   # param dtype [numel]; None at rest under ZeRO-3
        self.gathered: Optional[torch.Tensor] = None     # ZeRO-3: the one tensor every gather fills (below)
        self.param_shard: Optional[torch.Tensor] = None  # param dtype [numel / N] (sharded strategies)
        self.pending = set()            # ids of params whose grad has not arrived this step (or backward)
        self.work = None                # the in-flight reduction
        self.wire = None                # the bucket in the reduce dtype while its collective runs
        self.reduced = None             # ZeRO-2/3: the collective's output shard, added to grad_shard when done
        self.gather_work = None         # an in-flight all-gather of the parameters (param_gather.py) ...
        self.gather_input = None        # ... and its input, kept alive until it is done
        self.group = None               # the group its collectives span, its size and this rank's place in it
        self.group_size, self.group_rank = 1, 0   # (DistributedDataParallel sets them)

    def shard_range(self, shard: int, num_shards: int) -> tuple:
        """[start, end) of shard ``shard`` within the bucket."""
        size = self.numel // num_shards
        return shard * size, (shard + 1) * size

    def owned_range(self) -> tuple:
        return self.shard_range(self.group_rank, self.group_size)

    def reset(self) -> None:
        self.pending = {id(p) for p in self.params}
        self.work = None
        self.wire = None
        self.reduced = None

    # -- whole gradients that come and go (ZeRO-2/3) -----------------------------------------------
    def ensure_grad_data(self) -> torch.Tensor:
        """The whole fp32 grad of the bucket, zeroed when (re)created; ``main_grad`` views follow it."""
        if self.grad_data is None:
            device = self.params[0].device
            self.grad_data = torch.zeros(self.numel, dtype=torch.float32, device=device)
            self._point_main_grads()
        return self.grad_data

    def free_grad_data(self) -> None:
        self.grad_data = None
        for param in self.params:
            param.main_grad = None

    def _point_main_grads(self) -> None:
        for param in self.params:
            start, end = self.param_range[id(param)]
            param.main_grad = self.grad_data[start:end].view(self.shapes[id(param)])

    # -- whole parameters that come and go (ZeRO-3) ------------------------------------------------
    # Every gather of a bucket fills the same tensor, ``gathered``, and a drop frees its memory by resizing
    # its storage to nothing.  Autograd saves views of a unit's parameters in its forward (``F.linear``
    # saves ``weight.t()``): they share that storage, so between the unit's forward and its backward they
    # hold no memory, and the backward's gather refills what they see.  (A fresh tensor per gather would
    # leave each forward's copy alive in the graph until backward: the whole model at the end of forward.)
    def gather_target(self) -> torch.Tensor:
        """``gathered``, its memory (re)allocated, for an all-gather to fill."""
        if self.gathered is None:
            self.gathered = torch.empty(self.numel, dtype=self.param_shard.dtype, device=self.param_shard.device)
        else:
            self.gathered.untyped_storage().resize_(self.numel * self.gathered.element_size())
        return self.gathered

    def point_params(self) -> None:
        """Make each parameter a view of the whole bucket (``param_data`` holds it)."""
        for param in self.params:
            start, end = self.param_range[id(param)]
            param.data = self.param_data[start:end].view(self.shapes[id(param)])

    def release_params(self) -> None:
        """Drop the whole parameters: each becomes an empty tensor until the next gather."""
        if self.param_data is not None and self.param_data is self.gathered:
            self.gathered.untyped_storage().resize_(0)
        self.param_data = None
        for param in self.params:
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)


class GradBuffer:
    """The buckets of the parameters of one dtype (one expert-or-not kind), stored as ``strategy`` says.

    ``num_shards``: the ranks a bucket is split over (the size of the group its collectives span).
    ``unit_of``: ZeRO-3 only, id(param) -> the gather unit that owns it; buckets never span two units.
    """

    def __init__(self, params: List[torch.nn.Parameter], bucket_size: int, first_bucket_index: int,
                 strategy: str = "no_shard", num_shards: int = 1, unit_of: Optional[Dict[int, int]] = None):
        sharded = strategy != "no_shard"
        pad_to = num_shards * SHARD_ALIGNMENT if sharded else 1
        unit_of = unit_of or {}
        self.dtype, self.params, self.strategy = params[0].dtype, params, strategy
        self.param_range: Dict[int, tuple] = {}   # id(param) -> (start, end) in buffer coordinates
        plan = self._plan(params, bucket_size, pad_to, sharded, unit_of)
        self.numel = plan[-1][1] + plan[-1][2] if plan else 0
        device = params[0].device
        whole_grads = not shards_grads(strategy)
        self.grad_data = torch.zeros(self.numel, dtype=torch.float32, device=device) if whole_grads else None
        self.param_data = None
        if sharded and not shards_params(strategy):  # ZeRO-1/2: parameters become views of one buffer
            self.param_data = torch.zeros(self.numel, dtype=self.dtype, device=device)
        self.grad_shard = self.param_shard = None
        if not whole_grads:
            self.grad_shard = torch.zeros(self.numel // num_shards, dtype=torch.float32, device=device)
        if shards_params(strategy):
            self.param_shard = torch.zeros(self.numel // num_shards, dtype=self.dtype, device=device)
        self.buckets = [self._bucket(first_bucket_index + i, members, start, numel)
                        for i, (members, start, numel) in enumerate(plan)]
        for param in params:
            start, end = self.param_range[id(param)]
            if self.grad_data is not None:
                param.main_grad = self.grad_data[start:end].view(param.shape)
            if self.param_data is not None:
                self.param_data[start:end].copy_(param.data.view(-1))
                param.data = self.param_data[start:end].view(param.shape)

    def resident_bytes(self) -> tuple:
        """(parameter bytes, gradient bytes) this buffer keeps between steps."""
        param = self.param_data if self.param_data is not None else self.param_shard
        param_bytes = param.numel() * param.element_size() if param is not None else \
            sum(p.numel() * p.element_size() for p in self.params)
        grad = self.grad_data if self.grad_data is not None else self.grad_shard
        return param_bytes, grad.numel() * grad.element_size()

    def _plan(self, params, bucket_size: int, pad_to: int, sharded: bool, unit_of: dict) -> list:
        """[(params, start, padded numel)] of each bucket; fills ``param_range``."""
        plan, current, offset = [], [], 0

        def isolate(param):  # see the module docstring: the tied embedding's shards must line up
            return sharded and param_info(param).shared_embedding

        def close_bucket():
            nonlocal current, offset
            if current:
                start = self.param_range[id(current[0])][0]
                offset = start + -(-(offset - start) // pad_to) * pad_to
                plan.append((current, start, offset - start))
                current = []

        for param in params:
            if isolate(param) or (current and unit_of.get(id(param)) != unit_of.get(id(current[0]))):
                close_bucket()
            self.param_range[id(param)] = (offset, offset + param.numel())
            current.append(param)
            offset += param.numel()
            if offset - self.param_range[id(current[0])][0] >= bucket_size or isolate(param):
                close_bucket()
        close_bucket()
        return plan

    def _bucket(self, index: int, members: list, start: int, numel: int) -> Bucket:
        local = {id(p): (self.param_range[id(p)][0] - start, self.param_range[id(p)][1] - start) for p in members}
        bucket = Bucket(index, members, start, numel, local)
        if self.grad_data is not None:
            bucket.grad_data = self.grad_data[start:start + numel]
        if self.param_data is not None:
            bucket.param_data = self.param_data[start:start + numel]
        return bucket

    def set_group(self, group, size: int, rank: int) -> None:
        """Give every bucket its collective group and cut this rank's shards (views of the buffers)."""
        for bucket in self.buckets:
            bucket.group, bucket.group_size, bucket.group_rank = group, size, rank
            if self.strategy == "no_shard":
                continue
            lo, hi = bucket.owned_range()
            shard = slice(bucket.offset // size, bucket.offset // size + hi - lo)   # offsets are multiples of size
            bucket.grad_shard = bucket.grad_data[lo:hi] if self.grad_shard is None else self.grad_shard[shard]
            if self.param_shard is None:
                bucket.param_shard = bucket.param_data[lo:hi]
            else:
                bucket.param_shard = self.param_shard[shard]
                bucket.param_data = torch.zeros(bucket.numel, dtype=self.dtype, device=bucket.param_shard.device)
                for param in bucket.params:
                    start, end = bucket.param_range[id(param)]
                    bucket.param_data[start:end].copy_(param.data.view(-1))
                bucket.param_shard.copy_(bucket.param_data[lo:hi])
                for param in bucket.params:
                    keep_local_shape(param)
                bucket.release_params()
