"""The MoE layer that replaces a transformer layer's MLP: x [s, b, h] -> [s, b, h].

    weights, experts = router(x)                           (router.py; T = s b tokens, k experts each)
    out[t] = sum over the k chosen e of weights[t, e] * Expert_e(x[t])        (experts.py)
           + SharedExpert(x[t])                            (with --moe-shared-expert-intermediate-size)
             [x sigmoid(x[t] . g), g [1, h] learned]       (with --moe-shared-expert-gate)

The router's auxiliary losses ride on ``out``'s backward (aux_loss.py).  Under expert parallelism each rank
holds E / EP experts and the rows travel to their experts' ranks and back, or every rank sees every token of
its EP group (megalite/parallel/expert_parallel.py: the alltoall and allgather dispatchers); the experts'
gradients are then reduced over the expert-data-parallel group only.  Under tensor parallelism (with sequence
parallelism) x holds this TP rank's s/t tokens: the router and the experts (whole, expert TP 1) work on them
alone, the TP ranks acting as more expert-parallel / expert-data-parallel ranks (parallel/state.py), while
the shared expert is split over TP like a dense MLP (gathering the sequence, reduce-scattering its output).
With expert TP = TP (--expert-tensor-parallel-size) each rank still routes its own s/t tokens, but holds an ffn
slice of its experts: the rows its EP rank receives are gathered over the expert-TP group, every rank computes
its slice for all of them, and the partial outputs are summed back to the rank that sent each row.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from megalite.config.settings import ModelConfig
from megalite.model.moe import aux_loss
from megalite.model.moe.experts import Experts, permute, unpermute
from megalite.model.moe.router import TopKRouter
from megalite.model.transformer import MLP
from megalite.parallel.expert_parallel import (
    allgather_group,
    combine,
    dispatch,
    ep_group,
    ep_rank,
    ep_size,
    etp_group,
    gather_for_expert_tp,
    gather_tokens,
    reduce_scatter_from_expert_tp,
    reduce_scatter_tokens,
)
from megalite.parallel.layers import new_parameter
from megalite.parallel.mappings import tp_size
from megalite.parallel.param_info import Init

__all__ = ["MoELayer", "mlp_builder"]


class MoELayer(nn.Module):
    """Router, routed experts and the optional shared expert of global layer ``layer_number``."""

    def __init__(self, config: ModelConfig, layer_number: int, output_init_std: float,
                 sequence_parallel: bool = False):
        super().__init__()
        if tp_size() > 1 and not sequence_parallel:
            raise ValueError(f"an MoE layer at tensor-parallel size {tp_size()} needs sequence parallelism: each "
                             f"TP rank routes its own tokens")
        self.num_experts, self.dispatcher = config.num_experts, config.moe_token_dispatcher_type
        self.router = TopKRouter(config, layer_number, sequence_parallel)
        self.experts = Experts(config, output_init_std)
        self.shared_expert = None
        if config.moe_shared_expert_intermediate_size is not None:   # split over TP as a dense MLP is
            shared = dataclasses.replace(config, ffn_hidden_size=config.moe_shared_expert_intermediate_size)
            self.shared_expert = MLP(shared, output_init_std, sequence_parallel)
        self.shared_expert_gate = None
        if config.moe_shared_expert_gate:   # replicated over TP, fed this rank's tokens under SP
            self.shared_expert_gate = new_parameter((1, config.hidden_size), Init("normal", config.init_method_std),
                                                    sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])                                         # [T, h]
        weights, indices, kept, aux = self.router(x)                                # [T, k] each
        if kept is not None:   # dropped pairs go to a last, uncomputed expert E (capacity.py)
            indices = torch.where(kept, indices, torch.full_like(indices, self.num_experts))
        group = allgather_group()
        if group is not None and self.dispatcher == "allgather":
            out = self._allgather_experts(tokens, weights, indices, group).view_as(x)
        else:
            rows, order, counts = permute(tokens, indices, self.num_experts + (kept is not None))
            if kept is not None:
                served = int(counts[:self.num_experts].sum())
                rows, order, counts = rows[:served], order[:served], counts[:self.num_experts]
            results = self._alltoall_experts(rows, counts)
            out = unpermute(results, order, weights, tokens.shape[0]).view_as(x)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(F.linear(x, self.shared_expert_gate.to(x.dtype)))
            out = out + shared
        return aux_loss.attach(out, aux) if aux is not None else out

    def _alltoall_experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, h] grouped by global expert, counts [E] -> the experts' outputs [N, h]: under EP the rows
        travel to their experts' ranks and back (the alltoall dispatcher), under expert TP they are gathered
        over the etp group and each row's partial outputs summed back (megalite/parallel/expert_parallel.py)."""
        ep, etp = ep_group(), etp_group()
        if ep is not None:
            rows, counts, ep_plan = dispatch(rows, counts, ep)
        if etp is not None:
            rows, counts, etp_plan = gather_for_expert_tp(rows, counts, etp)
        results = self.experts(rows, counts)
        if etp is not None:
            results = reduce_scatter_from_expert_tp(results, etp_plan, etp)
        return combine(results, ep_plan, ep) if ep is not None else results

    def _allgather_experts(self, tokens, weights, indices, group) -> torch.Tensor:
        """The allgather dispatcher (megalite/parallel/expert_parallel.py): this rank's experts (its ffn slice
        under expert TP) over the tokens of the whole EP group (x expert TP); the rows of other ranks' experts go
        to a last, empty group and contribute zero."""
        local = self.num_experts // ep_size()
        all_tokens, all_weights = gather_tokens(tokens, group), gather_tokens(weights, group)
        mine = gather_tokens(indices, group) - ep_rank() * local                 # a dropped pair: E, not here
        mine = torch.where((mine >= 0) & (mine < local), mine, torch.full_like(mine, local))
        rows, order, counts = permute(all_tokens, mine, local + 1)
        served = int(counts[:local].sum())
        results = torch.cat([self.experts(rows[:served], counts[:local]), rows.new_zeros(rows[served:].shape)])
        return reduce_scatter_tokens(unpermute(results, order, all_weights, all_tokens.shape[0]), group)


def mlp_builder(config: ModelConfig):
    """For TransformerBlock: the MLP of global layer i, an MoELayer where --moe-layer-freq puts one, else
    None (the dense MLP)."""
    def build(layer_number: int, output_init_std: float, sequence_parallel: bool):
        if not config.is_moe_layer(layer_number):
            return None
        return MoELayer(config, layer_number, output_init_std, sequence_parallel)
    return build
