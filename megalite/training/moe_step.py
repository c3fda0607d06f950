"""The mixture-of-experts side of a training step (megalite/model/moe/): before the micro-batches, the gradient
the routers' auxiliary losses receive; after them, the expert biases moved and the auxiliary losses made into
the step's log values.

Logged as Megatron-LM names them, ``load_balancing_loss`` and ``z_loss``: each router's loss without its
coefficient, averaged over the step's micro-batches, over the data- and context-parallel ranks (router.py: a
CP rank's balancing loss is CP times its share), summed over the TP ranks (each its share of the tokens under
sequence parallelism) and averaged over the MoE layers of the whole model (summed over the
pipeline stages first, each of which holds only its own layers' values).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from megalite.config.settings import ModelConfig
from megalite.model.moe import aux_loss
from megalite.model.moe.router import TopKRouter
from megalite.parallel.state import ProcessGrid

__all__ = ["begin_moe_step", "end_moe_step", "logged_losses"]


def logged_losses(config: ModelConfig) -> List[str]:
    """The auxiliary losses this model's routers compute (and every rank logs)."""
    names = []
    if config.moe_router_load_balancing_type != "none" and config.moe_aux_loss_coeff > 0:
        names.append("load_balancing_loss")
    if config.moe_z_loss_coeff:
        names.append("z_loss")
    return names


def begin_moe_step(loss_scale: float, num_microbatches: int) -> None:
    """Each attached auxiliary loss gets the main loss's gradient: the loss scale / the micro-batches."""
    aux_loss.set_backward_scale(loss_scale / num_microbatches)
    aux_loss.take_records()


@torch.no_grad()
def update_expert_biases(model_chunks, grid: ProcessGrid) -> None:
    """Each expert bias += rate * sign(mean load - the expert's load), the loads summed over the step's
    micro-batches and the tensor- (sequence-parallel), data- and context-parallel ranks (so every replica moves its bias
    alike); the loads
    are cleared."""
    routers = [m for chunk in model_chunks for m in chunk.modules()
               if isinstance(m, TopKRouter) and m.expert_bias is not None]
    if not routers:
        return
    loads = torch.stack([router.tokens_per_expert for router in routers])          # [routers, E]
    if grid.tp_size > 1:   # sequence parallelism: each TP rank counted its own tokens
        dist.all_reduce(loads, group=grid.tp_group)
    if grid.dp_size * grid.cp_size > 1:
        dist.all_reduce(loads, group=grid.dp_cp_group)
    for router, load in zip(routers, loads):
        rate = router.config.moe_router_bias_update_rate
        router.expert_bias += rate * torch.sign(load.mean() - load)
        router.tokens_per_expert.zero_()


def end_moe_step(model_chunks, grid: ProcessGrid, config: ModelConfig, num_microbatches: int,
                 device: torch.device) -> Dict[str, float]:
    """After the micro-batches: biases updated; the step's auxiliary losses for the log (empty for a dense
    model).  Every rank calls it: the reductions span the pipeline and data-parallel groups."""
    if config.num_experts is None:
        return {}
    update_expert_biases(model_chunks, grid)
    records, names = aux_loss.take_records(), logged_losses(config)
    if not names:
        return {}
    values = torch.zeros(len(names), config.num_layers, dtype=torch.float64, device=device)
    for i, name in enumerate(names):
        for layer, total in records.get(name, {}).items():
            values[i, layer] = float(total) / num_microbatches
    if grid.tp_size * grid.pp_size > 1:   # the stages' own layers; a TP rank's share of its tokens (router.py)
        dist.all_reduce(values, group=grid.mp_group)
    if grid.dp_size * grid.cp_size > 1:
        dist.all_reduce(values, group=grid.dp_cp_group)
    moe_layers = [layer for layer in range(config.num_layers) if config.is_moe_layer(layer)]
    means = values[:, moe_layers].mean(dim=1) / (grid.dp_size * grid.cp_size)
    return {name: float(means[i]) for i, name in enumerate(names)}
