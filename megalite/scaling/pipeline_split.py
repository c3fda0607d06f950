"""Which layers each virtual pipeline stage holds, as a published run split them (planner side).

Without the planner's split flags this is the trainer's split (``parallel/pipeline/stages.py``: an
even split, or the first and last stages' totals from ``--decoder-first/last-pipeline-num-layers``
shared evenly among their chunks).  With ``--account-for-embedding-in-pipeline-split`` and/or
``--account-for-loss-in-pipeline-split`` the embedding and the output layer with the loss each count
as one layer: the ``L + 1`` (or ``L + 2``) units split evenly over the ``p v`` virtual stages, and the
first virtual stage (chunk 0 of rank 0) holds one transformer layer fewer, the last (chunk ``v - 1``
of rank ``p - 1``) one fewer (Megatron-LM's rule).  Llama 3 405B's 126 layers on 16 stages are such a
split: 128 units, 8 per rank, the first and last ranks one transformer layer short (Dubey et al. 2024,
Sec. 3.3.2), which an interleaved schedule can run with any virtual size dividing 8.
"""
from __future__ import annotations

from typing import List, Optional

from megalite.parallel.pipeline.stages import virtual_stage_layer_counts
from megalite.scaling.options import PlanOptions

__all__ = ["extra_units", "stage_layer_counts"]


def extra_units(options: PlanOptions) -> int:
    """How many layers the split counts beside the transformer layers (the embedding, the loss)."""
    return int(options.account_for_embedding_in_pipeline_split) + int(options.account_for_loss_in_pipeline_split)


def stage_layer_counts(num_layers: int, pp: int, vpp: Optional[int], first: Optional[int], last: Optional[int],
                       options: PlanOptions) -> List[int]:
    """Transformer layers per virtual stage, in pipeline order (virtual stage ``c * pp + r``)."""
    extra = extra_units(options)
    if not extra:
        return virtual_stage_layer_counts(num_layers, pp, vpp, first, last)
    if first is not None or last is not None:
        raise ValueError("--account-for-embedding/loss-in-pipeline-split sets the first and last stages' layers: "
                         "drop --decoder-first/last-pipeline-num-layers")
    stages = pp * (vpp or 1)
    units = num_layers + extra
    if units % stages:
        raise ValueError(f"--num-layers {num_layers} + {extra} (embedding/loss) = {units} do not split over "
                         f"{pp} stages x {vpp or 1} virtual chunks; use a multiple of {stages} units")
    counts = [units // stages] * stages
    counts[0] -= int(options.account_for_embedding_in_pipeline_split)
    counts[-1] -= int(options.account_for_loss_in_pipeline_split)
    if min(counts) < 0:
        raise ValueError(f"{units} units over {stages} virtual stages leave the first or last without a place for "
                         f"the embedding/loss; use fewer stages")
    return counts
