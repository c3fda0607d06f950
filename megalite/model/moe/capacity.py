"""Token dropping (``--moe-expert-capacity-factor``): each expert takes at most C of a micro-batch's (token,
expert) pairs on this rank,

    C = ceil(T k / E * factor)        (T tokens of this rank, k experts each, E experts)

(under TP with sequence parallelism T is the TP rank's s/t tokens, as in Megatron-LM, so a TP run drops other
pairs than one process would)

and the pairs beyond it are dropped: their weight becomes 0 and they are never computed, so a token whose k
experts all dropped it adds nothing to the layer's output (the residual carries it).  Which pairs an expert
keeps (``--moe-token-drop-policy``): ``probs`` the C of highest routing weight, ``position`` the first C in
token order (sequence-major, as the router sees them).  ``--moe-pad-expert-input-to-capacity`` pads every
expert's input to exactly C rows in Megatron-LM; the padded rows carry weight 0, so they change no output and
megalite does not compute them -- but, as in Megatron, the balancing loss then counts C rows per expert (the
padded routing map: the C tokens of highest weight, or the first chosen ones then the earliest others).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["expert_capacity", "capacity_masks"]


def expert_capacity(num_tokens: int, topk: int, num_experts: int, factor: float) -> int:
    return math.ceil(num_tokens * topk / num_experts * factor)


def _first_per_expert(priority: torch.Tensor, capacity: int) -> torch.Tensor:
    """[T, E] bool: in each expert's column, the ``capacity`` rows of highest priority (ties: earlier rows)."""
    count = min(capacity, priority.shape[0])
    order = torch.argsort(priority, dim=0, descending=True, stable=True)[:count]     # [C, E]
    return torch.zeros_like(priority, dtype=torch.bool).scatter_(0, order, True)


def capacity_masks(weights: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity: int, policy: str,
                   pad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """weights, indices [T, k] -> (kept [T, k] bool: the pairs computed, routing map [T, E] bool: what the
    balancing loss counts)."""
    tokens = weights.shape[0]
    chosen = torch.zeros(tokens, num_experts, dtype=torch.bool, device=weights.device).scatter_(1, indices, True)
    if policy == "probs":
        gates = torch.zeros(tokens, num_experts, dtype=torch.float32, device=weights.device)
        gates.scatter_(1, indices, weights.detach().float())
        priority = torch.where(chosen, gates, torch.full_like(gates, -1.0))
    else:   # position: chosen rows first, earlier before later
        position = torch.arange(tokens, 0, -1, device=weights.device, dtype=torch.float32).unsqueeze(1) / (tokens + 1)
        priority = chosen.float() + position
    capacity_mask = _first_per_expert(priority, capacity)
    kept = (capacity_mask & chosen).gather(1, indices)
    return kept, capacity_mask if pad else capacity_mask & chosen
