"""Run: everything a training run holds between iterations (megalite/training/loop.py fills and steps it)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

import torch

from megalite.config.settings import DataConfig, ModelConfig, OptimizerConfig, ParallelConfig, TrainingConfig
from megalite.data.packing import Packing
from megalite.data.tokenizer import Tokenizer
from megalite.data.training_data import SampleDataset
from megalite.optim.optimizer import MegaliteOptimizer
from megalite.optim.schedulers import LRScheduler
from megalite.parallel.state import ProcessGrid
from megalite.training.batch_schedule import BatchSchedule

__all__ = ["Run"]


@dataclass
class Run:
    """Everything a training run holds between iterations."""

    model_cfg: ModelConfig
    parallel_cfg: ParallelConfig
    opt_cfg: OptimizerConfig
    data_cfg: DataConfig
    train_cfg: TrainingConfig
    grid: ProcessGrid
    device: torch.device
    model: List[torch.nn.Module]
    layer_numbers: List[List[int]]
    optimizer: MegaliteOptimizer
    scheduler: LRScheduler
    forward_backward: Callable[..., List[dict]]
    train_dataset: SampleDataset
    valid_dataset: Optional[SampleDataset]
    tokenizer: Optional[Tokenizer]
    batch_schedule: BatchSchedule
    num_microbatches: int       # in a full step (of --global-batch-size); a ramp's early steps have fewer
    iteration: int = 0
    consumed_samples: int = 0
    train_iter: Optional[Iterator[dict]] = None
    history: List[dict] = field(default_factory=list)   # one record per iteration (what --log-json writes)
    started_at: float = field(default_factory=time.time)  # for --exit-duration-in-mins
    config_saved: bool = False  # config.yaml written into --save (with the first checkpoint)
    run_id: str = ""            # drawn at a fresh start, kept across resumes (megalite/checkpoint/manifest.py)
    packing: Optional[Packing] = None   # --reset-position-ids/--reset-attention-mask/--eod-mask-loss (data/packing.py)

    def settings(self) -> dict:
        """The configs as plain dicts (stored in checkpoints; read by megalite/generate.py)."""
        return {name: dataclasses.asdict(cfg) for name, cfg in (
            ("model", self.model_cfg), ("parallel", self.parallel_cfg), ("optimizer", self.opt_cfg),
            ("data", self.data_cfg), ("training", self.train_cfg))}

    def configs(self) -> tuple:
        return self.model_cfg, self.parallel_cfg, self.opt_cfg, self.data_cfg, self.train_cfg
