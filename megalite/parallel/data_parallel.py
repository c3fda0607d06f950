"""Data parallelism: gradients reduced bucket by bucket while backward runs, whole or sharded (ZeRO-1/2/3).

Where grads and parameters live, and what each sharding strategy keeps whole, is ``grad_buffer.py``;
ZeRO-3's gathering of parameters around each unit's forward and backward is ``param_gather.py``.

Overlap.  A post-accumulate-grad hook on each parameter adds ``.grad`` into ``main_grad`` (fp32
accumulation across micro-batches, even for bf16/fp16 params) and frees ``.grad``.  With
``overlap_grad_reduce`` the hook also marks the parameter ready; when every parameter of a bucket is
ready the bucket's asynchronous collective is launched and backward carries on with the layers
below.  Buckets launch strictly in index order (a bucket that is ready waits for the buckets before
it), so every rank issues the same collectives in the same order even if grads arrive in a
different order; ``finish_grad_sync`` launches whatever did not become ready (unused parameters:
their grad stays zero and never stalls the step) and waits for all.

Gradient accumulation.  Inside ``no_sync()`` the hooks only accumulate; the schedule enters it for
every micro-batch but the last, so the buckets are reduced once per step.  Under ZeRO-2/3 the whole
gradients are not kept between micro-batches: every backward reduce-scatters each bucket as soon as it
is complete (from the hooks, whatever ``overlap_grad_reduce`` says) and adds the result into this rank's
fp32 shard, as DeepSpeed's ZeRO-2 and FSDP do; ``no_sync()`` changes nothing there.  A callback queued
on the autograd engine finishes each backward: it reduces what was left, waits, and drops the whole
gradients (and ZeRO-3's whole parameters).  The price is one reduce-scatter per micro-batch instead of
one per step.

Averaging.  Each bucket is multiplied by 1/N before a SUM collective over the N = DP x CP ranks
(gloo has no AVG op; dividing first also keeps fp32 sums of large grads from growing by N).  Under expert
parallelism (megalite/parallel/state.py) the experts' own buckets are summed over the expert-data-parallel
group only, still divided by N: each expert's gradient already sums the contributions of the tokens of every
rank of its EP group (they travelled to it), so the sum over the expert-DP group covers all N ranks once.
Under TP (expert TP 1) the TP ranks join those groups: each saw only its own s/t tokens of the micro-batch, so
the sum over them is the replica's gradient, and N stays DP x CP.
Under a sharded strategy those buckets are likewise sharded over the expert-DP group.
With ``reduce_dtype=torch.bfloat16`` (--grad-reduce-in-bf16) the collective runs on a bf16 copy of the
bucket (half the bytes on the wire, each term and the sum rounded to bf16), copied back when it ends.

Sharded strategies.  The collective becomes a reduce-scatter into rank r's shard; under ZeRO-1 the
rest of the bucket is left unreduced and unused.  The optimizer updates the shards and all-gathers them
back into the parameters (ZeRO-1/2) or leaves them sharded (ZeRO-3: the next forward gathers them).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megalite.parallel.collectives import reduce_scatter_into
from megalite.parallel.grad_buffer import SHARDING_STRATEGIES, Bucket, GradBuffer, shards_grads, shards_params
from megalite.parallel.param_gather import AfterStepGatherWait, ParamGather, drop, gather_units, unit_assignment
from megalite.parallel.param_info import param_info
from megalite.parallel.state import ProcessGrid

DEFAULT_BUCKET_SIZE = 40_000_000  # elements; Megatron-LM's default (max(40M, 1M x DP))


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
    bucket's collective from the backward hooks (--overlap-grad-reduce).  ``sharding_strategy``: one of
    ``grad_buffer.SHARDING_STRATEGIES`` (--data-parallel-sharding-strategy); ``use_distributed_optimizer``
    is the older spelling of ``"optim"``.  ``overlap_param_gather``: ZeRO-3 prefetches the next unit's
    parameters; ZeRO-1/2 let the after-step all-gathers run into the next forward (param_gather.py).
    """

    def __init__(self, module: torch.nn.Module, grid: ProcessGrid, bucket_size: Optional[int] = DEFAULT_BUCKET_SIZE,
                 overlap_grad_reduce: bool = False, use_distributed_optimizer: bool = False,
                 reduce_dtype: torch.dtype = torch.float32, sharding_strategy: Optional[str] = None,
                 overlap_param_gather: bool = False):
        super().__init__()
        self.module = module
        self.grid = grid
        self.group = grid.dp_cp_group
        self.group_size = dist.get_world_size(self.group)
        self.group_rank = dist.get_rank(self.group)
        self.bucket_size = DEFAULT_BUCKET_SIZE if bucket_size is None else int(bucket_size)
        if self.bucket_size < 1:
            raise ValueError(f"bucket size {bucket_size} must be at least 1 element")
        strategy = sharding_strategy or ("optim" if use_distributed_optimizer else "no_shard")
        if strategy not in SHARDING_STRATEGIES:
            raise ValueError(f"sharding strategy {strategy!r} is not one of {', '.join(SHARDING_STRATEGIES)}")
        self.sharding_strategy = strategy
        self.use_distributed_optimizer = strategy != "no_shard"
        self.overlap_grad_reduce = overlap_grad_reduce
        self.reduce_dtype = reduce_dtype
        self.sync_enabled = True

        params = [p for p in module.parameters() if p.requires_grad]
        if any(getattr(p, "main_grad", None) is not None for p in params):
            raise ValueError("a parameter already has main_grad: the module is wrapped in DDP twice")
        self._build_buffers(params)
        self._next_bucket = 0           # buckets launch in order; this is the next one to launch
        self.num_collectives = 0        # launched since construction (tests and logs read it)
        self._callback_queued = False   # ZeRO-2/3: this backward's finishing callback
        for bucket in self.buckets:
            bucket.reset()
        self._hook_handles = [p.register_post_accumulate_grad_hook(_calls_grad_hook_of(self)) for p in params]
        self._names = {id(p): name for name, p in module.named_parameters()}
        self.param_gather = ParamGather(module, self.buckets, overlap_param_gather) if shards_params(strategy) \
            else None
        self.after_step_wait = AfterStepGatherWait(module, self.buckets) \
            if overlap_param_gather and strategy in ("optim", "optim_grads") else None

    def _build_buffers(self, params: List[torch.nn.Parameter]) -> None:
        by_dtype: Dict[tuple, List[torch.nn.Parameter]] = {}
        for param in reversed(params):  # reverse registration ~ the order backward produces grads
            experts = self.grid.edp_group is not None and param_info(param).expert_parallel
            by_dtype.setdefault((experts, param.dtype), []).append(param)
        unit_of = unit_assignment(self.module, gather_units(self.module)) \
            if shards_params(self.sharding_strategy) else None
        self.buffers_by_dtype: Dict[tuple, GradBuffer] = {}   # keyed by (expert-parallel, dtype)
        self.buckets: List[Bucket] = []
        for key in sorted(by_dtype, key=str):  # the same order on every rank
            # Averaging (module docstring): expert grads over the expert-DP group, sharded over it too
            group = self.grid.edp_group if key[0] else self.group
            size = dist.get_world_size(group)
            buffer = GradBuffer(by_dtype[key], self.bucket_size, len(self.buckets), self.sharding_strategy,
                                num_shards=size, unit_of=unit_of)
            buffer.set_group(group, size, dist.get_rank(group))
            self.buffers_by_dtype[key] = buffer
            self.buckets.extend(buffer.buckets)
        self._bucket_of = {id(p): bucket for bucket in self.buckets for p in bucket.params}

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

    def gathered_buckets(self) -> List[Bucket]:
        """ZeRO-3: the buckets whose parameters param_gather.whole_parameters gathers; else none."""
        return self.buckets if self.param_gather is not None else []

    # -- backward hooks ------------------------------------------------------------------------------
    def _grad_hook(self, param: torch.nn.Parameter) -> None:
        bucket = self._bucket_of[id(param)]
        sharded_grads = shards_grads(self.sharding_strategy)
        if param.grad is not None:
            if sharded_grads:
                bucket.ensure_grad_data()
            param.main_grad.add_(param.grad)   # fp32 accumulation, whatever the param's dtype
            param.grad = None
        if sharded_grads:
            self._sharded_grad_arrived(bucket, param)
        elif self.sync_enabled and self.overlap_grad_reduce:
            if bucket.index < self._next_bucket:
                raise RuntimeError(
                    f"the gradient of {self._names.get(id(param), 'a parameter')} arrived after its bucket was "
                    f"reduced; with --overlap-grad-reduce every backward but the step's last must run inside "
                    f"no_sync() (the schedule's no_sync_func)")
            bucket.pending.discard(id(param))
            self._launch_ready_buckets()

    def _sharded_grad_arrived(self, bucket: Bucket, param: torch.nn.Parameter) -> None:
        """ZeRO-2/3: a complete bucket is reduced at once, and its whole parameters (ZeRO-3) dropped."""
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(_calls_finish_backward_of(self))
        bucket.pending.discard(id(param))
        if not bucket.pending and self.param_gather is not None:
            drop(bucket)
        self._launch_ready_buckets()
        # Keep the whole grads of at most two buckets in flight.
        for earlier in self.buckets[:max(self._next_bucket - 2, 0)]:
            self._complete(earlier)

    def _launch_ready_buckets(self) -> None:
        while self._next_bucket < len(self.buckets) and not self.buckets[self._next_bucket].pending:
            self._launch(self.buckets[self._next_bucket])

    @torch.no_grad()
    def _launch(self, bucket: Bucket) -> None:
        assert bucket.index == self._next_bucket
        self._next_bucket += 1
        sharded_grads = shards_grads(self.sharding_strategy)
        if self.group_size == 1 and bucket.group_size == 1 and not sharded_grads:   # (an expert bucket's group
            return                                                                  # may be larger or smaller than N)
        data = bucket.ensure_grad_data() if sharded_grads else bucket.grad_data
        data.mul_(1.0 / self.group_size)
        if self.reduce_dtype != data.dtype:
            data = bucket.wire = data.to(self.reduce_dtype)
        start, end = bucket.owned_range()
        if bucket.group_size == 1:   # an expert bucket whose experts no other rank holds, or one rank
            bucket.reduced = data if sharded_grads else None
        elif sharded_grads:          # into a shard of its own: the whole bucket is dropped when it is done
            bucket.reduced = torch.empty(end - start, dtype=data.dtype, device=data.device)
            bucket.work = reduce_scatter_into(bucket.reduced, data, group=bucket.group, async_op=True)
        elif self.use_distributed_optimizer:
            bucket.work = reduce_scatter_into(data[start:end], data, group=bucket.group, async_op=True)
        else:
            bucket.work = dist.all_reduce(data, group=bucket.group, async_op=True)
        self.num_collectives += 1

    def _complete(self, bucket: Bucket) -> None:
        """Wait for the bucket's collective; under ZeRO-2/3 add its shard and drop the whole grads."""
        if bucket.work is not None:
            bucket.work.wait()
            bucket.work = None
        if bucket.reduced is not None:
            bucket.grad_shard.add_(bucket.reduced)
            bucket.reduced = None
            bucket.free_grad_data()
        elif bucket.wire is not None:   # the reduced values, back into the fp32 buffer
            bucket.grad_data.copy_(bucket.wire)
        bucket.wire = None

    def _finish_backward(self) -> None:
        """ZeRO-2/3, at the end of each backward: reduce what is left, wait, drop, re-arm."""
        self._callback_queued = False
        self.start_grad_sync()
        for bucket in self.buckets:
            self._complete(bucket)
            if self.param_gather is not None:
                drop(bucket)
            bucket.reset()
        self._next_bucket = 0

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
        if self.after_step_wait is not None:   # a bucket no forward read: its gather must land before the update
            self.after_step_wait.wait_all()
        if shards_grads(self.sharding_strategy):
            if self._next_bucket or self._callback_queued:   # a backward whose callback did not run
                self._finish_backward()
            return
        self.start_grad_sync()
        for bucket in self.buckets:
            self._complete(bucket)
            bucket.reset()
        self._next_bucket = 0

    def zero_grad_buffer(self) -> None:
        """Zero every gradient this rank keeps (whole buffer or shards) and drop any ``.grad``."""
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()  # never zero under an in-flight collective
            bucket.reset()
            if shards_grads(self.sharding_strategy):
                bucket.free_grad_data()
        self._next_bucket = 0
        self._callback_queued = False
        for buffer in self.buffers_by_dtype.values():
            for data in (buffer.grad_data, buffer.grad_shard):
                if data is not None:
                    data.zero_()
            for param in buffer.params:
                param.grad = None

    def local_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The part of ``param``'s reduced gradient this rank holds: ``main_grad`` whole, or (ZeRO-2/3)
        the slice of it that falls in this rank's shard (ranks of one TP group hold the same slices)."""
        if not shards_grads(self.sharding_strategy):
            return param.main_grad
        bucket = self._bucket_of[id(param)]
        p_start, p_end = bucket.param_range[id(param)]
        start, end = bucket.owned_range()
        lo, hi = max(start, p_start), min(end, p_end)
        return bucket.grad_shard[lo - start:max(hi, lo) - start]

    def owned_ranges(self):
        """Sharded strategies: yield (bucket, start, end), this rank's shard of each bucket in bucket coordinates."""
        for bucket in self.buckets:
            start, end = bucket.owned_range()
            yield bucket, start, end


def _calls_finish_backward_of(ddp: "DistributedDataParallel"):
    wrapper = weakref.ref(ddp)   # held weakly, for the reason _calls_grad_hook_of gives

    def callback() -> None:
        live = wrapper()
        if live is not None:
            live._finish_backward()
    return callback
