"""The MoE layer that replaces a transformer layer's MLP: x [s, b, h] -> [s, b, h].

    weights, experts = router(x)                           (router.py; T = s b tokens, k experts each)
    out[t] = sum over the k chosen e of weights[t, e] * Expert_e(x[t])        (experts.py)
           + SharedExpert(x[t])                            (with --moe-shared-expert-intermediate-size)

The router's auxiliary losses ride on ``out``'s backward (aux_loss.py).  Under expert parallelism each rank
holds E / EP experts and the rows travel to their experts' ranks and back (megalite/parallel/expert_parallel.py,
the alltoall dispatcher); the experts' gradients are then reduced over the expert-data-parallel group only.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from megalite.config.settings import ModelConfig
from megalite.model.moe import aux_loss
from megalite.model.moe.experts import Experts, permute, unpermute
from megalite.model.moe.router import TopKRouter
from megalite.model.transformer import MLP
from megalite.parallel.expert_parallel import combine, dispatch, ep_group

__all__ = ["MoELayer", "mlp_builder"]


class MoELayer(nn.Module):
    """Router, routed experts and the optional shared expert of global layer ``layer_number``."""

    def __init__(self, config: ModelConfig, layer_number: int, output_init_std: float):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = TopKRouter(config, layer_number)
        self.experts = Experts(config, output_init_std)
        self.shared_expert = None
        if config.moe_shared_expert_intermediate_size is not None:
            shared = dataclasses.replace(config, ffn_hidden_size=config.moe_shared_expert_intermediate_size)
            self.shared_expert = MLP(shared, output_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])                                         # [T, h]
        weights, indices, aux = self.router(x)                                      # [T, k] each
        rows, order, counts = permute(tokens, indices, self.num_experts)           # [T k, h]
        group = ep_group()
        if group is None:
            results = self.experts(rows, counts)
        else:   # the alltoall dispatcher: rows to the ranks of their experts and back
            local_rows, local_counts, plan = dispatch(rows, counts, group)
            results = combine(self.experts(local_rows, local_counts), plan, group)
        out = unpermute(results, order, weights, tokens.shape[0]).view_as(x)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return aux_loss.attach(out, aux) if aux is not None else out


def mlp_builder(config: ModelConfig):
    """For TransformerBlock: the MLP of global layer i, an MoELayer where --moe-layer-freq puts one, else
    None (the dense MLP)."""
    def build(layer_number: int, output_init_std: float, sequence_parallel: bool):
        if not config.is_moe_layer(layer_number):
            return None
        return MoELayer(config, layer_number, output_init_std)
    return build
