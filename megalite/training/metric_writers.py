"""Where a run's scalars go besides the log line: TensorBoard (``--tensorboard-dir``, through
``torch.utils.tensorboard``) and Weights & Biases (``--wandb-project``, when wandb is installed;
``WANDB_MODE=offline`` keeps the run on disk).  Global rank 0 writes; every record is one step.  The
validation perplexity is written only with ``--log-validation-ppl-to-tensorboard`` (Megatron's switch)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from megalite.config.settings import TrainingConfig

__all__ = ["MetricWriter", "TensorBoardWriter", "WandbWriter", "build_writers", "SCALARS"]

# record key -> scalar name (TensorBoard's tags; Megatron's where it has one)
SCALARS: Dict[str, str] = {
    "loss": "lm loss", "lr": "learning-rate", "grad_norm": "grad-norm", "loss_scale": "loss-scale",
    "global_batch_size": "batch-size", "tokens_per_sec": "throughput/tokens-per-sec",
    "tflops_per_device": "throughput/tflops-per-device", "mfu": "throughput/mfu",
    "peak_memory_mb": "memory/peak-mb", "eval_loss": "lm loss validation", "eval_ppl": "lm loss validation ppl",
}


class MetricWriter:
    def write(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _scalars(record: dict, validation_ppl: bool) -> Dict[str, float]:
    return {tag: float(record[key]) for key, tag in SCALARS.items()
            if record.get(key) is not None and (validation_ppl or key != "eval_ppl")}


class TensorBoardWriter(MetricWriter):
    def __init__(self, folder: str, validation_ppl: bool = False):
        self.validation_ppl = validation_ppl
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                             "(or megalite[tensorboard])") from None
        self.summary = SummaryWriter(log_dir=folder)

    def write(self, record: dict) -> None:
        for tag, value in _scalars(record, self.validation_ppl).items():
            self.summary.add_scalar(tag, value, record["iteration"])

    def close(self) -> None:
        self.summary.close()


class WandbWriter(MetricWriter):
    def __init__(self, project: str, name: Optional[str], folder: str, settings: dict, validation_ppl: bool = False):
        self.validation_ppl = validation_ppl
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb-project needs the wandb package: pip install wandb") from None
        os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=folder, config=settings)

    def write(self, record: dict) -> None:
        self.run.log(_scalars(record, self.validation_ppl), step=record["iteration"])

    def close(self) -> None:
        self.run.finish()


def build_writers(cfg: TrainingConfig, rank: int, settings: dict) -> List[MetricWriter]:
    """The writers the flags ask for, on global rank 0 (none elsewhere)."""
    if rank != 0:
        return []
    writers: List[MetricWriter] = []
    if cfg.tensorboard_dir:
        writers.append(TensorBoardWriter(cfg.tensorboard_dir, cfg.log_validation_ppl_to_tensorboard))
    if cfg.wandb_project:
        folder = cfg.wandb_save_dir or os.path.join(cfg.save or cfg.tensorboard_dir or ".", "wandb")
        writers.append(WandbWriter(cfg.wandb_project, cfg.wandb_exp_name, folder, settings,
                                   cfg.log_validation_ppl_to_tensorboard))
    return writers
