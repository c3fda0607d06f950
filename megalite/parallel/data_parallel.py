"""Data parallelism: one contiguous fp32 grad buffer, cut into buckets reduced while backward runs.

Layout.  The parameters of each dtype share one flat fp32 buffer; ``param.main_grad`` is a view
into it.  Parameters are placed in REVERSE registration order -- roughly the order backward produces
their grads -- and the buffer is cut into buckets of at least ``bucket_size`` elements (whole
parameters only), so bucket 0 fills first::

    registration:  embed  layer0.w  layer0.b  layer1.w  layer1.b  head.w
    grad buffer:   [ head.w | layer1.b layer1.w | layer0.b layer0.w | embed ]
                   [ bucket 0 |      bucket 1      |      bucket 2      ...  ]

Overlap.  A post-accumulate-grad hook on each parameter adds ``.grad`` into ``main_grad`` (fp32
accumulation across micro-batches, even for bf16/fp16 params) and frees ``.grad``.  With
``overlap_grad_reduce`` the hook also marks the parameter ready; when every parameter of a bucket is
ready the bucket's asynchronous collective is launched and backward carries on with the layers
below.  Buckets launch strictly in index order (a bucket that is ready waits for the buckets before
it), so every rank issues the same collectives in the same order even if grads arrive in a
different order; ``finish_grad_sync`` launches whatever did not become ready (unused parameters:
their grad stays zero and never stalls the step) and waits for all.

Gradient accumulation.  Inside ``no_sync()`` the hooks only accumulate; the schedule enters it for
every micro-batch but the last, so the buckets are reduced once per step.

Averaging.  Each bucket is multiplied by 1/N before a SUM collective over the N = DP x CP ranks
(gloo has no AVG op; dividing first also keeps fp32 sums of large grads from growing by N).  Under expert
parallelism (megalite/parallel/state.py) the experts' own buckets are summed over the expert-data-parallel
group only, still divided by N: each expert's gradient already sums the contributions of the tokens of every
rank of its EP group (they travelled to it), so the sum over the expert-DP group covers all N ranks once.
Under ZeRO-1 those buckets are likewise sharded over the expert-DP group (reduce-scattered and all-gathered
there, ``optim/distributed.py``).
With ``reduce_dtype=torch.bfloat16`` (--grad-reduce-in-bf16) the collective runs on a bf16 copy of the
bucket (half the bytes on the wire, each term and the sum rounded to bf16), copied back when it ends.

ZeRO-1 (``use_distributed_optimizer``).  Each bucket is padded to a multiple of N * 64 elements and
split into N equal, contiguous shards; DP rank r owns shard r of every bucket.  The collective
becomes a reduce-scatter into rank r's shard (the rest of the bucket is left unreduced and unused).
The parameters move into a contiguous buffer of their own dtype with the same layout (``param.data``
becomes a view), so the optimizer can all-gather updated shards straight into the parameters.
A tied embedding gets a bucket of its own, so the first and the last pipeline stage shard it
identically and its grads can be summed shard-to-shard after the reduce-scatter.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megalite.parallel.collectives import reduce_scatter_into
from megalite.parallel.param_info import param_info
from megalite.parallel.state import ProcessGrid

DEFAULT_BUCKET_SIZE = 40_000_000  # elements; Megatron-LM's default (max(40M, 1M x DP))
SHARD_ALIGNMENT = 64              # elements per ZeRO-1 shard are a multiple of this (256-byte fp32 rows)


class Bucket:
    """A contiguous range of a grad buffer whose grads are reduced by one collective."""

    def __init__(self, index: int, params: List[torch.nn.Parameter], offset: int, numel: int,
                 grad_data: torch.Tensor, param_data: Optional[torch.Tensor]):
        self.index = index
        self.params = params            # in buffer order
        self.offset = offset            # start in the buffer
        self.numel = numel              # padded size
        self.grad_data = grad_data      # fp32 view [numel]
        self.param_data = param_data    # param-dtype view [numel] (ZeRO-1 only)
        self.pending = set()            # ids of params whose grad has not arrived this step
        self.work = None                # the in-flight collective
        self.wire = None                # the bucket in the reduce dtype while its collective runs
        self.group = None               # the group its collective spans, its size and this rank's place in it
        self.group_size, self.group_rank = 1, 0   # (DistributedDataParallel sets them)

    def shard_range(self, shard: int, num_shards: int) -> tuple:
        """[start, end) of shard ``shard`` within the bucket (ZeRO-1)."""
        size = self.numel // num_shards
        return shard * size, (shard + 1) * size

    def reset(self) -> None:
        self.pending = {id(p) for p in self.params}
        self.work = None
        self.wire = None


class GradBuffer:
    """The fp32 grad buffer (and, under ZeRO-1, the parameter buffer) of the parameters of one dtype.

    ``num_shards``: None, or (ZeRO-1) the number of ranks each bucket is split over.
    """

    def __init__(self, params: List[torch.nn.Parameter], bucket_size: int, first_bucket_index: int,
                 num_shards: Optional[int] = None):
        sharded = num_shards is not None
        pad_to = num_shards * SHARD_ALIGNMENT if sharded else 1

        def isolate(param):  # see the module docstring: the tied embedding's shards must line up
            return sharded and param_info(param).shared_embedding

        self.dtype = params[0].dtype
        self.params = params
        # Plan: (param, start) and bucket boundaries, then allocate once.
        self.param_range: Dict[int, tuple] = {}
        plan, current, offset = [], [], 0

        def close_bucket():
            nonlocal current, offset
            if current:
                start = self.param_range[id(current[0])][0]
                padded = -(-(offset - start) // pad_to) * pad_to
                offset = start + padded
                plan.append((current, start, padded))
                current = []

        for param in params:
            if isolate(param):
                close_bucket()
            self.param_range[id(param)] = (offset, offset + param.numel())
            current.append(param)
            offset += param.numel()
            start = self.param_range[id(current[0])][0]
            if offset - start >= bucket_size or isolate(param):
                close_bucket()
        close_bucket()
        self.numel = offset

        device = params[0].device
        self.grad_data = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.param_data = None
        if sharded:  # ZeRO-1: parameters become views of one buffer laid out like the grads
            self.param_data = torch.zeros(self.numel, dtype=self.dtype, device=device)
        self.buckets = []
        for i, (bucket_params, start, numel) in enumerate(plan):
            self.buckets.append(Bucket(first_bucket_index + i, bucket_params, start, numel,
                                       self.grad_data[start:start + numel],
                                       None if self.param_data is None else self.param_data[start:start + numel]))
        for param in params:
            start, end = self.param_range[id(param)]
            param.main_grad = self.grad_data[start:end].view(param.shape)
            if self.param_data is not None:
                self.param_data[start:end].copy_(param.data.view(-1))
                param.data = self.param_data[start:end].view(param.shape)


def _calls_grad_hook_of(ddp: "DistributedDataParallel"):
    """A parameter's hook that holds the wrapper weakly.

    Hooks live on the C++ side of a tensor, out of reach of Python's cycle collector: a bound method
    there would keep the wrapper -- and its process group -- alive until the process ends.  gloo
    runs collectives on the group's threads, and such a thread releases a finished collective (its
    tensors, which takes the GIL) a moment after ``work.wait()`` returned; if the interpreter is
    finalizing by then, the thread is ended inside a destructor: std::terminate ("terminate called
    without an active exception"), SIGABRT at the exit of a run that succeeded.  Held weakly, the
    wrapper and the group go when the run does, and the group joins its threads.
    """
    wrapper = weakref.ref(ddp)

    def hook(param: torch.nn.Parameter) -> None:
        live = wrapper()
        if live is not None:
            live._grad_hook(param)
    return hook


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside a :class:`DistributedDataParallel` (or any ``.module``) wrapper."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


class DistributedDataParallel(torch.nn.Module):
    """Wraps one model chunk; grads land in ``param.main_grad``, averaged over the grid's DP x CP group.

    ``bucket_size``: elements per bucket (--ddp-bucket-size).  ``overlap_grad_reduce``: launch each
    bucket's collective from the backward hooks (--overlap-grad-reduce).  ``use_distributed_optimizer``:
    reduce-scatter into ZeRO-1 shards and keep parameters in a contiguous buffer.
    """

    def __init__(self, module: torch.nn.Module, grid: ProcessGrid, bucket_size: Optional[int] = DEFAULT_BUCKET_SIZE,
                 overlap_grad_reduce: bool = False, use_distributed_optimizer: bool = False,
                 reduce_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.module = module
        self.grid = grid
        self.group = grid.dp_cp_group
        self.group_size = dist.get_world_size(self.group)
        self.group_rank = dist.get_rank(self.group)
        self.bucket_size = DEFAULT_BUCKET_SIZE if bucket_size is None else int(bucket_size)
        if self.bucket_size < 1:
            raise ValueError(f"bucket size {bucket_size} must be at least 1 element")
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self.reduce_dtype = reduce_dtype
        self.sync_enabled = True

        params = [p for p in module.parameters() if p.requires_grad]
        if any(getattr(p, "main_grad", None) is not None for p in params):
            raise ValueError("a parameter already has main_grad: the module is wrapped in DDP twice")
        by_dtype: Dict[tuple, List[torch.nn.Parameter]] = {}
        for param in reversed(params):  # reverse registration ~ the order backward produces grads
            experts = grid.ep_size > 1 and param_info(param).expert_parallel
            by_dtype.setdefault((experts, param.dtype), []).append(param)
        self.buffers_by_dtype: Dict[tuple, GradBuffer] = {}   # keyed by (expert-parallel, dtype)
        self.buckets: List[Bucket] = []
        for key in sorted(by_dtype, key=str):  # the same order on every rank
            # Averaging (module docstring): expert grads over the expert-DP group (ZeRO-1 shards them over it too)
            group = grid.edp_group if key[0] else self.group
            size = dist.get_world_size(group)
            buffer = GradBuffer(by_dtype[key], self.bucket_size, len(self.buckets),
                                num_shards=size if use_distributed_optimizer else None)
            self.buffers_by_dtype[key] = buffer
            self.buckets.extend(buffer.buckets)
            for bucket in buffer.buckets:
                bucket.group, bucket.group_size, bucket.group_rank = group, size, dist.get_rank(group)
        self._bucket_of = {id(p): bucket for bucket in self.buckets for p in bucket.params}
        self._next_bucket = 0           # buckets launch in order; this is the next one to launch
        self.num_collectives = 0        # launched since construction (tests and logs read it)
        for bucket in self.buckets:
            bucket.reset()
        self._hook_handles = [p.register_post_accumulate_grad_hook(_calls_grad_hook_of(self)) for p in params]
        self._names = {id(p): name for name, p in module.named_parameters()}

    # -- the wrapped module ------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def config(self):
        """The wrapped model's ModelConfig (the pipeline reads message shapes from it)."""
        return self.module.config

    def set_input_tensor(self, tensor) -> None:
        """Pipeline stages hand their input to the wrapped model (see GPTModel.set_input_tensor)."""
        self.module.set_input_tensor(tensor)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)

    # -- backward hooks ------------------------------------------------------------------------------
    def _grad_hook(self, param: torch.nn.Parameter) -> None:
        if param.grad is not None:
            param.main_grad.add_(param.grad)   # fp32 accumulation, whatever the param's dtype
            param.grad = None
        if self.sync_enabled and self.overlap_grad_reduce:
            bucket = self._bucket_of[id(param)]
            if bucket.index < self._next_bucket:
                raise RuntimeError(
                    f"the gradient of {self._names.get(id(param), 'a parameter')} arrived after its bucket was "
                    f"reduced; with --overlap-grad-reduce every backward but the step's last must run inside "
                    f"no_sync() (the schedule's no_sync_func)")
            bucket.pending.discard(id(param))
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        while self._next_bucket < len(self.buckets) and not self.buckets[self._next_bucket].pending:
            self._launch(self.buckets[self._next_bucket])

    @torch.no_grad()
    def _launch(self, bucket: Bucket) -> None:
        assert bucket.index == self._next_bucket
        self._next_bucket += 1
        if self.group_size == 1:
            return
        bucket.grad_data.mul_(1.0 / self.group_size)
        data = bucket.grad_data
        if self.reduce_dtype != data.dtype:
            data = bucket.wire = data.to(self.reduce_dtype)
        if bucket.group_size == 1:   # an expert bucket whose experts no other rank holds
            pass
        elif self.use_distributed_optimizer:
            start, end = bucket.shard_range(bucket.group_rank, bucket.group_size)
            bucket.work = reduce_scatter_into(data[start:end], data, group=bucket.group, async_op=True)
        else:
            bucket.work = dist.all_reduce(data, group=bucket.group, async_op=True)
        self.num_collectives += 1

    # -- the step ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate grads without reducing them (every micro-batch of a step but the last)."""
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def start_grad_sync(self) -> None:
        """Launch every bucket not launched yet (in order); returns without waiting."""
        while self._next_bucket < len(self.buckets):
            self._launch(self.buckets[self._next_bucket])

    def finish_grad_sync(self) -> None:
        """Launch what is left, wait for every bucket's collective, and re-arm for the next step."""
        self.start_grad_sync()
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            if bucket.wire is not None:   # the reduced values, back into the fp32 buffer
                bucket.grad_data.copy_(bucket.wire)
            bucket.reset()
        self._next_bucket = 0

    def zero_grad_buffer(self) -> None:
        """Zero ``main_grad`` of every parameter (the whole buffer) and drop any ``.grad``."""
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()  # never zero under an in-flight collective
            bucket.reset()
        self._next_bucket = 0
        for buffer in self.buffers_by_dtype.values():
            buffer.grad_data.zero_()
            for param in buffer.params:
                param.grad = None

    def owned_ranges(self):
        """ZeRO-1: yield (buffer, bucket, start, end), this rank's shard of each bucket in buffer coordinates."""
        for buffer in self.buffers_by_dtype.values():
            for bucket in buffer.buckets:
                start, end = bucket.shard_range(bucket.group_rank, bucket.group_size)
                yield buffer, bucket, bucket.offset + start, bucket.offset + end
