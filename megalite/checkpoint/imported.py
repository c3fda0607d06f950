"""A model's full tensors saved as a one-rank megalite checkpoint: where every import lands (Hugging
Face, Megatron-LM), to be loaded afterwards at any layout by the resharding loader."""
from __future__ import annotations

import dataclasses
from typing import Dict

import torch

from megalite.config.settings import ModelConfig

__all__ = ["save_one_rank"]


def save_one_rank(config: ModelConfig, tensors: Dict[str, torch.Tensor], save: str) -> None:
    """Save ``tensors`` (megalite's names, full shapes) as a TP=1, PP=1 checkpoint at iteration 0 with
    the model settings and no optimizer state; ``load_state_dict(strict=True)`` names any tensor missing
    or left over."""
    import torch.distributed as dist

    from megalite.checkpoint.manifest import new_run_id
    from megalite.checkpoint.save_load import save_checkpoint
    from megalite.model.gpt import GPTModel
    from megalite.parallel import state as grid_state
    from megalite.parallel.launch import init_distributed

    started = not dist.is_initialized()
    init_distributed()
    grid = grid_state.initialize_grid()
    try:
        model = GPTModel(config)
        model.load_state_dict(tensors, strict=True)
        settings = {"model": dataclasses.asdict(config), "data": {"mock_data": True}}
        save_checkpoint(save, 0, [model], None, None, grid, consumed_samples=0, run_id=new_run_id(),
                        settings=settings, layer_numbers=[list(range(config.num_layers))])
    finally:
        grid_state.destroy_grid()
        if started:
            dist.destroy_process_group()
