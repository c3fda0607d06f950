"""A rank's model as training runs it: its pipeline chunks, in the run's precision, wrapped for
data parallelism when that is needed."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megalite.config.settings import ModelConfig, OptimizerConfig, ParallelConfig
from megalite.model.gpt import GPTModel
from megalite.parallel.data_parallel import DistributedDataParallel
from megalite.parallel.pipeline import stages
from megalite.parallel.state import ProcessGrid

__all__ = ["build_model", "build_model_chunks", "wrap_for_data_parallel"]


def build_model_chunks(config: ModelConfig, grid: ProcessGrid, model_cls=GPTModel, *,
                       first_stage_layers: Optional[int] = None,
                       last_stage_layers: Optional[int] = None, **kwargs) -> list:
    """This rank's model chunks (one per virtual stage; one without a virtual pipeline).

    Each chunk is ``model_cls(config, pre_process=..., post_process=..., layer_numbers=..., **kwargs)``
    with the embedding on the first stage's chunk 0 and the output layer on the last stage's last
    chunk (``grid.is_first_stage(chunk)`` / ``grid.is_last_stage(chunk)``).
    """
    chunks = []
    for chunk in range(grid.virtual_pp_size or 1):
        layers: Sequence[int] = stages.layer_numbers_for(config.num_layers, grid.pp_size, grid.pp_rank,
                                                         grid.virtual_pp_size, chunk, first_stage_layers,
                                                         last_stage_layers)
        chunks.append(model_cls(config, pre_process=grid.is_first_stage(chunk),
                                post_process=grid.is_last_stage(chunk), layer_numbers=layers, **kwargs))
    return chunks


def build_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, grid: ProcessGrid,
                device: torch.device) -> Tuple[List[torch.nn.Module], List[List[int]]]:
    """Model chunks of this rank (one per virtual stage) and their global layer numbers."""
    chunks = build_model_chunks(model_cfg, grid, first_stage_layers=parallel_cfg.decoder_first_pipeline_num_layers,
                                last_stage_layers=parallel_cfg.decoder_last_pipeline_num_layers,
                                sequence_parallel=parallel_cfg.sequence_parallel)
    layer_numbers = [stages.layer_numbers_for(model_cfg.num_layers, grid.pp_size, grid.pp_rank,
                                              grid.virtual_pp_size, v,
                                              parallel_cfg.decoder_first_pipeline_num_layers,
                                              parallel_cfg.decoder_last_pipeline_num_layers)
                     for v in range(len(chunks))]
    return [chunk.to(device) for chunk in chunks], layer_numbers


def wrap_for_data_parallel(chunks: Sequence[torch.nn.Module], opt_cfg: OptimizerConfig,
                           grid: ProcessGrid) -> List[torch.nn.Module]:
    """Wrap each chunk in megalite's DDP (contiguous fp32 grad buffer, bucketed reduction) when it helps.

    DDP is needed for data parallelism with overlap or a sharded strategy, and gives half-precision models fp32
    gradient accumulation.  A lone fp32 replica stays a plain module: finalize_model_grads handles
    plain modules (grads in ``.grad``), and there is nothing to reduce -- unless the experts have groups of their
    own (at TP > 1 their gradients are summed over the TP ranks, which saw different tokens).
    """
    needed = grid.dp_size * grid.cp_size > 1 or opt_cfg.bf16 or opt_cfg.fp16 or \
        opt_cfg.shards_optimizer() or opt_cfg.overlap_grad_reduce or grid.edp_group is not None
    if not needed:
        return list(chunks)
    kwargs = {"overlap_grad_reduce": opt_cfg.overlap_grad_reduce,
              "sharding_strategy": opt_cfg.sharding_strategy(), "overlap_param_gather": opt_cfg.overlap_param_gather}
    if opt_cfg.grad_reduce_in_bf16:
        kwargs["reduce_dtype"] = torch.bfloat16
    if opt_cfg.ddp_bucket_size is not None:
        kwargs["bucket_size"] = opt_cfg.ddp_bucket_size
    return [DistributedDataParallel(chunk, grid, **kwargs) for chunk in chunks]
