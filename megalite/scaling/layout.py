"""The sizes of a run that the performance model reads (``Layout``), derived once from the configs.

Expert parallelism folds into the ranks of a stage as the trainer's grid builds it (docs/architecture.md,
Expert groups): ``ETP x EP x expert-DP = TP x CP x DP``, expert TP fastest (``ETP`` 1, or TP with
``--expert-tensor-parallel-size``), an expert-parallel group being ``EP`` ranks ``ETP`` apart and the
expert-data-parallel group the ranks ``EP x ETP`` apart that hold the same experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megalite.config.settings import OptimizerConfig, ParallelConfig, TrainingConfig
from megalite.parallel.pipeline.orders import default_schedule
from megalite.scaling.options import PlanOptions
from megalite.scaling.overlap import check_options

__all__ = ["Layout", "layout_of", "run_dtype"]


def run_dtype(optimizer: OptimizerConfig) -> str:
    return "bfloat16" if optimizer.bf16 else "float16" if optimizer.fp16 else "float32"


@dataclass(frozen=True)
class Layout:
    """The sizes of a run that the model reads, derived once from the configs."""

    world: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: Optional[int]
    micro_batch: int
    global_batch: int
    num_microbatches: int
    schedule: Optional[str]
    dtype: str
    options: PlanOptions = PlanOptions()
    trainer_sharding: str = "no_shard"   # the trainer's strategy (OptimizerConfig.sharding_strategy)
    ep: int = 1                          # expert-parallel size (--expert-model-parallel-size)
    cp_comm_type: str = "p2p"            # how CP reaches the other ranks' keys (--cp-comm-type)
    etp: int = 1                         # expert-tensor-parallel size (--expert-tensor-parallel-size: 1 or TP)

    @property
    def v(self) -> int:
        return self.vpp or 1

    @property
    def edp(self) -> int:
        """The expert-data-parallel size: the ranks of a stage holding the same experts."""
        return self.tp * self.cp * self.dp // (self.ep * self.etp)

    @property
    def sharding(self) -> str:
        """The sharding strategy over DP x CP (options.py): ``no_shard`` with one rank to shard over."""
        return self.options.sharding(self.trainer_sharding) if self.dp * self.cp > 1 else "no_shard"

    @property
    def linear_dtype(self) -> str:
        """The linear layers' GEMM precision: FP8 with --fp8-format (either format: the same tensor-core
        rate), else the run's."""
        return "fp8" if self.options.fp8_format else self.dtype


def layout_of(parallel: ParallelConfig, training: TrainingConfig, optimizer: OptimizerConfig,
              world_size: Optional[int] = None, options: Optional[PlanOptions] = None) -> Layout:
    world = world_size or parallel.world_size
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by TP {tp} x PP {pp} x CP {cp}")
    dp = world // (tp * pp * cp)
    vpp = parallel.virtual_pipeline_model_parallel_size
    b = training.micro_batch_size
    gbs = training.global_batch_size or b * dp
    if gbs % (b * dp):
        raise ValueError(f"global batch {gbs} is not divisible by micro-batch {b} x data-parallel {dp}")
    schedule = parallel.pipeline_schedule or default_schedule(pp, vpp)
    options = options or PlanOptions()
    check_options(options, parallel.sequence_parallel, tp, options.sharding(optimizer.sharding_strategy()),
                  optimizer.overlap_grad_reduce)
    return Layout(world, tp, pp, cp, dp, vpp, b, gbs, gbs // (b * dp), schedule, run_dtype(optimizer), options,
                  optimizer.sharding_strategy(), parallel.expert_model_parallel_size, parallel.cp_comm_type,
                  parallel.expert_tensor_parallel_size or 1)
