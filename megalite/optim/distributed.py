"""The optimizer's sharding under ZeRO-1/2/3: fp32 masters and Adam moments split over data parallelism.

Rajbhandari et al. 2020 ("ZeRO"), stages 1-3 (--use-distributed-optimizer, --data-parallel-sharding-strategy).
The DDP buckets are padded and split into N = DP x CP equal shards (``parallel/grad_buffer.py``); DP rank r
owns shard r of every bucket.  One step:

    reduce-scatter each bucket's grads  -> rank r holds the averaged grads of its shards   (DDP)
    norm / inf check over the shards, summed over model-parallel and DP x CP groups
    Adam on the owned shards only: fp32 masters and moments exist for 1/N of the model
    ZeRO-1/2: all-gather each bucket's updated parameter shards -> every rank holds the full model again
    ZeRO-3:   nothing: the next forward gathers each layer's shards when it needs them

The update is a sum of per-element operations, so sharding it changes nothing numerically: a
sharded run equals the unsharded run (the parity tests check it).

Memory per parameter between steps (bytes; N = DP x CP ranks; P = 2 for bf16/fp16 params, 4 for fp32; the
fp32 master is the parameter itself for fp32 params)::

                         parameter   fp32 grad   fp32 master      Adam moments    fp32      bf16
    no_shard             P           4           4 (bf16 only)    8               16        18
    optim       ZeRO-1   P           4           4/N              8/N             8+8/N     6+12/N
    optim_grads ZeRO-2   P           4/N         4/N              8/N             4+12/N    2+16/N
    optim_grads_params   P/N         4/N         4/N              8/N             16/N      18/N
                ZeRO-3

measured on a rank as ``optimizer.bytes_per_param()``; bucket padding adds at most N x 64 elements per
bucket.  While a step runs, ZeRO-2/3 also hold the whole fp32 grads of the buckets being reduced (at most
two in flight) and ZeRO-3 the whole parameters of the layers being computed (one, two with prefetch).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from megalite.optim.optimizer import Piece, make_piece
from megalite.parallel.collectives import all_gather_into
from megalite.parallel.state import ProcessGrid

__all__ = ["ZeroOneShards", "zero1_bytes_per_param", "sharded_bytes_per_param"]


def sharded_bytes_per_param(param_bytes: int, dp_size: int, strategy: str = "optim") -> float:
    """The table in the module docstring: bytes per parameter between steps for ``param_bytes``-byte params."""
    master_bytes = 0 if param_bytes == 4 else 4
    sharded = {"no_shard": 1, "optim": dp_size, "optim_grads": dp_size, "optim_grads_params": dp_size}[strategy]
    grads = 4 / dp_size if strategy in ("optim_grads", "optim_grads_params") else 4
    params = param_bytes / dp_size if strategy == "optim_grads_params" else param_bytes
    return params + grads + (master_bytes + 8) / sharded


def zero1_bytes_per_param(param_bytes: int, dp_size: int) -> float:
    """ZeRO-1's line of the table in the module docstring."""
    return sharded_bytes_per_param(param_bytes, dp_size, "optim")


class ZeroOneShards:
    """The sharding of :class:`~megalite.optim.optimizer.MegaliteOptimizer` under every sharded strategy
    (ZeRO-1/2/3): this rank's shard of every bucket, then -- where the parameters are kept whole -- an
    all-gather of the updated shards."""

    def __init__(self, ddp_chunks: Sequence[torch.nn.Module]):
        for i, chunk in enumerate(ddp_chunks):
            if not getattr(chunk, "use_distributed_optimizer", False):
                raise ValueError(f"a sharded optimizer (ZeRO-1/2/3) needs model chunk {i} wrapped in "
                                 f"DistributedDataParallel(..., sharding_strategy='optim' or another sharded "
                                 f"strategy) before build_optimizer; got {type(chunk).__name__}")
        self.ddp_chunks = list(ddp_chunks)

    def pieces(self, params: Sequence[torch.nn.Parameter], grid: Optional[ProcessGrid]) -> List[Piece]:
        wanted = {id(p) for p in params}
        found = {}
        for chunk in self.ddp_chunks:
            for bucket, start, end in chunk.owned_ranges():
                for param in bucket.params:
                    if id(param) not in wanted:
                        continue
                    p_start, p_end = bucket.param_range[id(param)]
                    lo, hi = max(start, p_start), min(end, p_end)
                    if lo < hi:  # a parameter lies in one bucket, so in at most one owned range
                        found[id(param)] = (param, lo - p_start, hi - p_start,
                                            bucket.param_shard[lo - start:hi - start],
                                            bucket.grad_shard[lo - start:hi - start])
        return [make_piece(param, lo, hi, grid, sharded=True, model_view=model_view, grad_view=grad_view)
                for param, lo, hi, model_view, grad_view in (found[id(p)] for p in params if id(p) in found)]

    def norm_groups(self, grid: Optional[ProcessGrid]) -> list:
        # Shards are disjoint over DP x CP as well as over the model-parallel group.
        return [grid.mp_group, grid.dp_cp_group]

    @torch.no_grad()
    def after_update(self) -> None:
        """All-gather every bucket's updated shard into the whole parameters, where they are kept whole
        (ZeRO-1/2; ZeRO-3's next forward gathers them, parallel/param_gather.py).  With
        --overlap-param-gather the gathers are launched in forward order (the last bucket first: buckets are
        laid out in reverse) and waited for by each unit's forward (param_gather.AfterStepGatherWait)."""
        for chunk in self.ddp_chunks:
            if chunk.sharding_strategy == "optim_grads_params":
                continue
            overlap = chunk.after_step_wait is not None
            for bucket, _, _ in (reversed(list(chunk.owned_ranges())) if overlap else chunk.owned_ranges()):
                if bucket.group_size == 1:
                    continue
                # A copy: the collective's input must not alias its output.  Expert buckets are sharded over
                # the expert-data-parallel group, the rest over DP x CP (parallel/data_parallel.py).
                local = bucket.param_shard.clone()
                work = all_gather_into(bucket.param_data, local, group=bucket.group, async_op=overlap)
                if overlap:
                    bucket.gather_work, bucket.gather_input = work, local
