"""Which layers each pipeline stage holds (arithmetic only: megalite/model/build.py builds the chunks).

The model's ``num_layers`` transformer layers are cut into ``pp`` stages (one per pipeline rank),
evenly unless the first and/or last stage is given its own count (Megatron's
``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``; the first
stage also holds the embedding and the last the output layer and loss, so they are often made
lighter).  With a virtual pipeline of size ``v`` (interleaved 1F1B) the layers are cut into
``pp * v`` *virtual stages* handed out round-robin: virtual stage ``c * pp + r`` is chunk ``c``
of pipeline rank ``r``.  Worked example, 8 layers, pp=2, v=2::

    virtual stage   0        1        2        3
    (rank, chunk)   (0, 0)   (1, 0)   (0, 1)   (1, 1)
    layers          [0, 1]   [2, 3]   [4, 5]   [6, 7]

so rank 0 holds layers {0, 1, 4, 5} as two chunks and an activation visits rank 0, 1, 0, 1.
"""
from __future__ import annotations

from typing import List, Optional


def virtual_stage_layer_counts(num_layers: int, pp_size: int, virtual_pp_size: Optional[int] = None,
                               first_stage_layers: Optional[int] = None,
                               last_stage_layers: Optional[int] = None) -> List[int]:
    """Layers per virtual stage, in pipeline order (virtual stage ``c * pp + r`` = chunk c of rank r).

    An uneven first (last) stage count is the total of pipeline rank 0 (pp-1) over its chunks, split
    evenly among them; the middle ranks share the remaining layers evenly.  Raises ValueError naming
    what would split.
    """
    v = virtual_pp_size or 1
    if num_layers < 1 or pp_size < 1:
        raise ValueError(f"{num_layers} layers over {pp_size} pipeline stages: both must be at least 1")
    uneven = first_stage_layers is not None or last_stage_layers is not None
    if uneven and pp_size == 1:
        raise ValueError("first/last stage layer counts need a pipeline size > 1; with one stage every "
                         "layer is on it")

    per_rank: List[Optional[int]] = [None] * pp_size
    if first_stage_layers is not None:
        per_rank[0] = first_stage_layers
    if last_stage_layers is not None:
        per_rank[-1] = last_stage_layers
    fixed = sum(n for n in per_rank if n is not None)
    free_ranks = [r for r in range(pp_size) if per_rank[r] is None]
    rest = num_layers - fixed
    if rest < 0 or (not free_ranks and rest != 0):
        raise ValueError(f"first stage {first_stage_layers} and last stage {last_stage_layers} layers do not add "
                         f"up with {num_layers} layers over {pp_size} stages")
    if free_ranks:
        unit = len(free_ranks) * v
        if rest % unit:
            what = "the middle stages" if uneven else "the stages"
            raise ValueError(f"{num_layers} layers do not split evenly: {rest} layers over {what} "
                             f"({len(free_ranks)} ranks x {v} virtual chunks = {unit}); use a multiple of {unit} "
                             f"layers" + (" there" if uneven else "") + " or change the pipeline/virtual size")
        for r in free_ranks:
            per_rank[r] = rest // len(free_ranks)
    for r, name in ((0, "the first stage's layer count"), (pp_size - 1, "the last stage's layer count")):
        if per_rank[r] % v:
            raise ValueError(f"{name} {per_rank[r]} does not split into {v} virtual chunks; use a multiple of {v}")
    return [per_rank[r] // v for _chunk in range(v) for r in range(pp_size)]


def layer_numbers_for(num_layers: int, pp_size: int, pp_rank: int, virtual_pp_size: Optional[int] = None,
                      virtual_pp_rank: int = 0, first_stage_layers: Optional[int] = None,
                      last_stage_layers: Optional[int] = None) -> List[int]:
    """Global 0-based indices of the layers held by chunk ``virtual_pp_rank`` of pipeline rank ``pp_rank``.

    >>> layer_numbers_for(8, 2, 0, virtual_pp_size=2, virtual_pp_rank=1)
    [4, 5]
    >>> layer_numbers_for(7, 3, 1, first_stage_layers=1)
    [1, 2, 3]
    """
    counts = virtual_stage_layer_counts(num_layers, pp_size, virtual_pp_size, first_stage_layers, last_stage_layers)
    if not 0 <= pp_rank < pp_size or not 0 <= virtual_pp_rank < (virtual_pp_size or 1):
        raise ValueError(f"pipeline rank {pp_rank} / virtual rank {virtual_pp_rank} outside pp={pp_size}, "
                         f"virtual={virtual_pp_size}")
    stage = virtual_pp_rank * pp_size + pp_rank
    start = sum(counts[:stage])
    return list(range(start, start + counts[stage]))
