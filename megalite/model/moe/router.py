"""The top-k router: scores every expert for every token and chooses each token's k experts.

Tokens are the T = s x b rows of a layer's input ``[s, b, h]`` in that order (sequence-major).  With the
router's weight ``W [E, h]`` the logits are ``z = x W^T`` (``[T, E]``, in ``--moe-router-dtype``), and

    softmax (default)   the k largest logits are chosen; their weights are the softmax over those k
    softmax, pre-softmax   p = softmax(z) over all E; the k largest p are chosen, weighted by p
    sigmoid             p = sigmoid(z); the k largest p (p + bias with an expert bias) are chosen, their
                        p normalized to sum 1 when k > 1

then multiplied by ``--moe-router-topk-scaling-factor`` if given.  The losses (each weighted by its coefficient
in the training loss, megalite/model/moe/aux_loss.py):

    aux_loss        E / (k T^2) * sum_e P_e N_e, with N_e the tokens sent to expert e and P_e the sum over
                    tokens of the expert's score over all E (softmax, or sigmoid normalized per token); 1 when
                    the load and the scores are even (Switch Transformer, Fedus et al. 2021)
    seq_aux_loss    the same per sequence (T = s), averaged over the micro-batch's sequences
    z-loss          mean over tokens of logsumexp(z)^2 (ST-MoE, Zoph et al. 2022)

Under context parallelism each rank holds T / CP of the sequence's tokens (for seq_aux_loss: s / CP of each
sequence, in two chunks): the loads N_e (each sequence's, for seq_aux_loss) are summed over the CP group and
rank r's share of the balancing loss is E / (k T_r^2 CP) sum_e P_e^r N_e (T_r its tokens, P^r its scores),
which is CP times its part of the whole sequence's loss -- as the lm loss, because the gradients are averaged
over DP x CP; the z-loss is each rank's mean, whose average over CP is the sequence's.  Logs are averaged over
DP x CP (training/moe_step.py).

Under tensor parallelism the MoE layer runs with sequence parallelism: each TP rank routes its own s/t tokens
with the router's weight replicated over TP, whose gradient is therefore summed over TP
(``ParamInfo.sequence_parallel``, megalite/parallel/grads.py), not averaged.  The loads are summed over the
TP x CP group, and a rank's balancing loss is its share, T_r = T / (TP CP): E / (k T_r^2 TP^2 CP) sum_e P_e^r
N_e (CP times its part, as above; exactly its part over TP); the z-loss is its mean / TP.  seq_aux_loss the
same per sequence: the rank holds s_r = s / (TP CP) tokens of each of the b sequences (rows t*b + j of
``[s/TP * b, E]``: its own slice of every sequence, as SP splits the sequence dimension), each sequence's
loads N_je are summed over TP x CP, and its share is mean_j E / (k s_r^2 TP^2 CP) sum_e P_je^r N_je (P_je^r the
sum of its scores over its slice of sequence j); summed over the TP ranks the P^r sum to the sequence's and the
shares to CP times its part.  The logged values are summed over TP (training/moe_step.py).

The expert bias (aux-loss-free balancing, Wang et al. 2024) only chooses experts, never weights them; after
each step it moves by ``--moe-router-bias-update-rate`` towards the mean load: +rate for an expert below it,
-rate above (training/moe_step.py, with the loads summed over the step and the data-parallel ranks).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalite.config.settings import ModelConfig
from megalite.model.moe import aux_loss
from megalite.model.moe.capacity import capacity_masks, expert_capacity
from megalite.parallel import random as tp_random
from megalite.parallel import state
from megalite.parallel.context_parallel import cp_group, cp_size
from megalite.parallel.layers import new_parameter
from megalite.parallel.mappings import tp_size
from megalite.parallel.param_info import Init

__all__ = ["topk_routing", "scores_for_aux_loss", "switch_load_balancing_loss", "sequence_load_balancing_loss",
           "z_loss", "TopKRouter"]

_DTYPES = {None: None, "fp32": torch.float32, "fp64": torch.float64}


def topk_routing(logits: torch.Tensor, topk: int, score_function: str = "softmax", pre_softmax: bool = False,
                 expert_bias: Optional[torch.Tensor] = None,
                 scaling_factor: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] in the logits' dtype, expert indices [T, k] int64)."""
    if score_function == "softmax":
        if pre_softmax:
            weights, indices = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits).topk(topk, dim=-1)
        else:
            top_logits, indices = logits.topk(topk, dim=-1)
            weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32).type_as(logits)
    else:
        scores = torch.sigmoid(logits.float()).type_as(logits)
        if expert_bias is not None:
            indices = (scores + expert_bias).topk(topk, dim=-1).indices
            weights = scores.gather(1, indices)
        else:
            weights, indices = scores.topk(topk, dim=-1)
        if topk > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor is not None:
        weights = weights * scaling_factor
    return weights, indices


def scores_for_aux_loss(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Every expert's score [T, E] for the balancing loss: softmax, or sigmoid normalized per token."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    scores = torch.sigmoid(logits.float())
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


def switch_load_balancing_loss(scores: torch.Tensor, tokens_per_expert: torch.Tensor, topk: int) -> torch.Tensor:
    """E / (k T^2) * sum_e (sum_t scores[t, e]) N_e; scores [T, E], tokens_per_expert [E]."""
    num_tokens, num_experts = scores.shape
    return (scores.sum(dim=0) * tokens_per_expert).sum() * (num_experts / (topk * num_tokens * num_tokens))


def sequence_load_balancing_loss(scores: torch.Tensor, routing_map: torch.Tensor, batch: int,
                                 topk: int, group=None, tp: int = 1) -> torch.Tensor:
    """The switch loss of each sequence, averaged over the ``batch`` sequences; scores [s*b, E] and the routing
    map [s*b, E] (True where a token goes to an expert) in sequence-major token order.  ``group``: the CP (or
    TP x CP) group holding the rest of each sequence, over which each sequence's loads are summed; ``tp``: the
    TP size within it.  The result is this rank's share of the loss (module docstring)."""
    num_experts = scores.shape[1]
    seq = scores.shape[0] // batch
    counts = routing_map.to(scores.dtype).view(seq, batch, num_experts).sum(dim=0)        # [b, E]
    parts = 1 if group is None else dist.get_world_size(group)
    if parts > 1:
        dist.all_reduce(counts, group=group)
    load = counts * (num_experts / (seq * topk))                  # [b, E]: 1 for an even load (one rank)
    return (load * scores.view(seq, batch, num_experts).mean(dim=0)).sum(dim=1).mean() / (parts * tp)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2, in float32 at least."""
    return torch.logsumexp(logits.float() if logits.dtype != torch.float64 else logits, dim=-1).square().mean()


class TopKRouter(nn.Module):
    """x [s, b, h] -> (weights [s*b, k], expert indices [s*b, k]); the balancing losses attached to x's path.

    ``layer_number``: the layer's global index, under which its losses are logged.
    """

    def __init__(self, config: ModelConfig, layer_number: int, sequence_parallel: bool = False):
        super().__init__()
        self.config, self.layer_number = config, layer_number
        # Under SP each TP rank routes its own tokens: the weight's gradient is a partial sum over TP.
        self.weight = new_parameter((config.num_experts, config.hidden_size), Init("normal", config.init_method_std),
                                    sequence_parallel=sequence_parallel)
        self.dtype = _DTYPES[config.moe_router_dtype]
        self.counting = False   # whether the last forward counted its tokens and recorded its losses
        if config.moe_router_enable_expert_bias:   # state saved with the model, not trained by the optimizer
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
            self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts, dtype=torch.float32),
                                 persistent=False)
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        """Moves and casts as any module, except that the expert bias and the load counts stay float32 (a
        bfloat16 count stops at 256; the bias moves by steps far below bfloat16's resolution near 1)."""
        kept = {name: self._buffers[name] for name in ("expert_bias", "tokens_per_expert") if name in self._buffers}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            self._buffers[name] = original.to(device=self._buffers[name].device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                                Optional[torch.Tensor]]:
        """-> (weights [T, k], indices [T, k], the pairs kept [T, k] under a capacity (else None), the weighted
        auxiliary loss to attach, or None); a dropped pair's weight is 0."""
        cfg = self.config
        tokens = x.reshape(-1, x.shape[-1])
        dtype = self.dtype or tokens.dtype
        logits = F.linear(tokens.to(dtype), self.weight.to(dtype))                     # [T, E]
        weights, indices = topk_routing(logits, cfg.moe_router_topk, cfg.moe_router_score_function,
                                        cfg.moe_router_pre_softmax, self.expert_bias,
                                        cfg.moe_router_topk_scaling_factor)
        kept, routing_map = None, torch.zeros_like(logits, dtype=torch.bool).scatter_(1, indices, True)
        if cfg.moe_expert_capacity_factor is not None:   # token dropping (capacity.py)
            capacity = expert_capacity(tokens.shape[0], cfg.moe_router_topk, cfg.num_experts,
                                       cfg.moe_expert_capacity_factor)
            kept, routing_map = capacity_masks(weights, indices, cfg.num_experts, capacity, cfg.moe_token_drop_policy,
                                               cfg.moe_pad_expert_input_to_capacity)
            weights = weights * kept
        training = self.training and torch.is_grad_enabled()
        # A recompute (activation checkpointing) repeats the losses' math, for backward, but not the counting.
        self.counting = training and not tp_random.is_recomputing()
        if self.counting and self.expert_bias is not None:
            self.tokens_per_expert += routing_map.sum(dim=0).float()
        return weights, indices, kept, self._losses(logits, routing_map, x.shape[1]) if training else None

    def _losses(self, logits: torch.Tensor, routing_map: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
        cfg, total = self.config, None
        if cfg.moe_router_load_balancing_type != "none" and cfg.moe_aux_loss_coeff > 0:
            scores = scores_for_aux_loss(logits, cfg.moe_router_score_function)
            if cfg.moe_router_load_balancing_type == "aux_loss":
                load = routing_map.sum(dim=0).to(scores.dtype)
                if tp_size() * cp_size() > 1:   # the micro-batch's loads; this rank's share (module docstring)
                    dist.all_reduce(load, group=state.get_grid().tp_cp_group)
                balance = switch_load_balancing_loss(scores, load, cfg.moe_router_topk) / (cp_size() * tp_size() ** 2)
            else:
                group = state.get_grid().tp_cp_group if tp_size() > 1 else cp_group() if cp_size() > 1 else None
                balance = sequence_load_balancing_loss(scores, routing_map, batch, cfg.moe_router_topk, group,
                                                       tp_size())
            if self.counting:
                aux_loss.record("load_balancing_loss", self.layer_number, balance)
            total = balance * cfg.moe_aux_loss_coeff
        if cfg.moe_z_loss_coeff:
            z = z_loss(logits) / tp_size()
            if self.counting:
                aux_loss.record("z_loss", self.layer_number, z)
            total = z * cfg.moe_z_loss_coeff if total is None else total + z * cfg.moe_z_loss_coeff
        return total
