"""The process-group manager: one object that owns the TP x CP x DP x PP grid.

Ranks are laid out with tensor parallelism fastest, then context, data and pipeline parallelism
(Megatron-LM's default order), so that one node of 8 GPUs holds whole TP groups::

    rank = tp + TP * (cp + CP * (dp + DP * pp))

Worked example, 8 ranks with TP=2, DP=2, PP=2 (CP=1)::

    tp groups     [0,1] [2,3] [4,5] [6,7]
    dp groups     [0,2] [1,3] [4,6] [5,7]
    pp groups     [0,4] [1,5] [2,6] [3,7]
    model-parallel (tp x pp) groups  [0,1,4,5] [2,3,6,7]

Experts fold into data parallelism (Megatron-LM's expert groups): within one pipeline stage, the
TP x CP x DP ranks, in rank order, are cut into expert-parallel (ep) groups of EP consecutive ranks,
each of which holds all the experts of a layer, E / EP per rank; the ranks that hold the same experts
form the expert-data-parallel (edp) group, over which expert gradients are reduced (EP x expert-DP =
TP x CP x DP per stage with expert TP 1: every expert whole on one rank).  Under TP the MoE layer sees
each TP rank's own s/t tokens (sequence parallelism), so for the experts the TP ranks are more
data-parallel ranks.  Worked example, 8 ranks with DP=4, PP=2, EP=2::

    ep groups     [0,1] [2,3] [4,5] [6,7]
    edp groups    [0,2] [1,3] [4,6] [5,7]

and 8 ranks with TP=2, DP=2, PP=2, EP=2 (rank = tp + 2 (dp + 2 pp)): the EP groups are the TP groups,
the edp groups join the ranks of equal TP rank, [0,2] [1,3] [4,6] [5,7].  With EP=1 and TP > 1 (a model
with experts, ``moe=True``) there is no ep group and the edp group is the whole stage, TP x CP x DP.
The groups exist only where they differ from the dense ones: EP > 1, or TP > 1 with experts.

Expert tensor parallelism (``--expert-tensor-parallel-size`` ETP = TP, config/moe_settings.py) splits each
expert's ffn over ETP ranks; the stage's ranks are then ordered as Megatron-LM orders its expert grid,
expert TP fastest, then EP, then expert-DP: local rank ``etp + ETP (ep + EP edp)``, so ETP x EP x expert-DP =
TP x CP x DP.  With ETP = TP the etp groups are the tp groups and a rank's etp coordinate is its tp rank.
Worked example, 8 ranks with TP=2, DP=2, PP=2, EP=2, ETP=2::

    etp groups    [0,1] [2,3] [4,5] [6,7]   (the tp groups) each expert's ffn split in two
    ep groups     [0,2] [1,3] [4,6] [5,7]   rank 0 holds experts 0 .. E/2-1 (ffn half 0), rank 2 the others
    tp_ep groups  [0,1,2,3] [4,5,6,7]       every piece of a layer's experts (the allgather dispatcher's)
    edp groups    [0] [1] ... [7]           expert-DP 1: no other rank holds the same piece

Every process group of a run is created here, by :func:`initialize_grid`, and read everywhere
else through :func:`get_grid`.  ``torch.distributed.new_group`` must be called by every rank for
every group in the same order, so the constructor walks all groups of each kind, creating them on
every rank and keeping the one this rank belongs to.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch.distributed as dist

# Kinds of group, each named by the grid axes it spans.
GROUP_AXES = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "mp": ("tp", "pp"),          # model-parallel: everything that holds one replica of the model
    "dp_cp": ("cp", "dp"),       # gradients are averaged over DP and CP together
    "tp_cp": ("tp", "cp"),       # the ranks that share a micro-batch (MoE routers count its tokens over them)
}
AXES = ("tp", "cp", "dp", "pp")  # fastest first


@dataclass(frozen=True)
class Coordinates:
    tp: int
    cp: int
    dp: int
    pp: int


def grid_group_ranks(sizes: Dict[str, int], kind: str) -> List[List[int]]:
    """All rank lists of one kind of group, for a grid of ``sizes`` (pure arithmetic, no torch).

    >>> grid_group_ranks({"tp": 2, "cp": 1, "dp": 2, "pp": 2}, "dp")
    [[0, 2], [1, 3], [4, 6], [5, 7]]
    """
    if kind in EXPERT_GROUP_AXES:
        return expert_group_ranks(sizes, kind)
    if kind == "embedding":
        return [[pipeline[0], pipeline[-1]] if len(pipeline) > 1 else pipeline
                for pipeline in grid_group_ranks(sizes, "pp")]
    spanned = GROUP_AXES[kind]
    fixed = [a for a in AXES if a not in spanned]
    groups = []
    # Walk the fixed axes slowest-first so groups come out in ascending order of their first rank.
    for fixed_values in itertools.product(*(range(sizes[a]) for a in reversed(fixed))):
        coords = dict(zip(reversed(fixed), fixed_values))
        members = []
        for spanned_values in itertools.product(*(range(sizes[a]) for a in reversed(spanned))):
            coords.update(zip(reversed(spanned), spanned_values))
            members.append(_rank_of(sizes, coords))
        groups.append(sorted(members))
    return sorted(groups)


EXPERT_GROUP_AXES = {
    "ep": ("ep",),
    "edp": ("edp",),
    "etp": ("etp",),             # expert tensor parallelism: each expert's ffn split over these ranks
    "tp_ep": ("etp", "ep"),      # the allgather dispatcher's group: every rank holding a piece of the experts
}


def expert_group_ranks(sizes: Dict[str, int], kind: str) -> List[List[int]]:
    """The expert groups (module docstring) for a grid of ``sizes`` with ``sizes["ep"]`` and ``sizes["etp"]``
    (default 1): within a stage, local rank ``etp + ETP (ep + EP edp)`` (Megatron-LM's tp-ep-dp order).

    >>> expert_group_ranks({"tp": 1, "cp": 1, "dp": 4, "pp": 2, "ep": 2}, "edp")
    [[0, 2], [1, 3], [4, 6], [5, 7]]
    >>> expert_group_ranks({"tp": 2, "cp": 1, "dp": 2, "pp": 1, "ep": 2, "etp": 2}, "ep")
    [[0, 2], [1, 3]]
    """
    ep, etp, stage = sizes.get("ep", 1), sizes.get("etp", 1), sizes["tp"] * sizes["cp"] * sizes["dp"]
    if stage % (ep * etp):
        sizes = f"expert-parallel size {ep}" + (f" x expert tensor-parallel size {etp}" if etp > 1 else "")
        raise ValueError(f"{sizes} does not divide the TP x CP x DP = {stage} ranks of a pipeline stage; choose "
                         f"sizes whose product divides it")
    expert_sizes = {"etp": etp, "ep": ep, "edp": stage // (ep * etp)}     # fastest first
    spanned = EXPERT_GROUP_AXES[kind]
    fixed = [a for a in expert_sizes if a not in spanned]
    groups = []
    for base in range(0, stage * sizes["pp"], stage):
        for fixed_values in itertools.product(*(range(expert_sizes[a]) for a in fixed)):
            coords = dict(zip(fixed, fixed_values))
            members = []
            for spanned_values in itertools.product(*(range(expert_sizes[a]) for a in spanned)):
                coords.update(zip(spanned, spanned_values))
                members.append(base + coords["etp"] + etp * (coords["ep"] + ep * coords["edp"]))
            groups.append(sorted(members))
    return sorted(groups)


def _rank_of(sizes, coords) -> int:
    return coords["tp"] + sizes["tp"] * (coords["cp"] + sizes["cp"] * (coords["dp"] + sizes["dp"] * coords["pp"]))


def validate_grid(world_size: int, tp: int, pp: int, cp: int = 1, dp: Optional[int] = None) -> int:
    """Return the data-parallel size, or raise a ValueError that names the numbers.

    The command line's sizes were checked with their flag names (``config.ParallelConfig``); this is
    the grid's own invariant, for grids built directly.
    """
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
        if value < 1:
            raise ValueError(f"grid size {name}={value} must be at least 1")
    model_ranks = tp * pp * cp
    if world_size % model_ranks != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) x context ({cp}) "
            f"parallel sizes = {model_ranks}; use a world size that is a multiple of {model_ranks}, "
            f"or sizes whose product divides {world_size}")
    derived_dp = world_size // model_ranks
    if dp is not None and dp != derived_dp:
        raise ValueError(
            f"grid TP={tp} x CP={cp} x DP={dp} x PP={pp} = {tp * cp * dp * pp} ranks does not match "
            f"the world size {world_size}; with these TP, CP and PP sizes DP must be {derived_dp}")
    return derived_dp


class ProcessGrid:
    """This rank's view of the TP x CP x DP x PP grid and every process group on it.

    Attributes: ``tp_size``, ``cp_size``, ``dp_size``, ``pp_size``, ``world_size``, ``rank``;
    this rank's coordinates ``tp_rank``, ``cp_rank``, ``dp_rank``, ``pp_rank``; the groups
    ``tp_group``, ``cp_group``, ``dp_group``, ``pp_group``, ``mp_group`` (tp x pp), ``dp_cp_group``,
    ``tp_cp_group``, ``embedding_group`` (first and last stage of this rank's pipeline), ``ep_group`` and
    ``edp_group`` (the expert groups, ``ep_size`` and ``ep_rank``), ``etp_group`` and ``tp_ep_group`` (expert TP,
    ``etp_size`` and ``etp_rank``), with their member lists in ``ranks[kind]``.

    With a virtual pipeline (interleaved schedule) each rank holds ``virtual_pp_size`` model chunks;
    :meth:`is_first_stage` and :meth:`is_last_stage` name the chunk they are asked about.
    """

    def __init__(self, tp: int = 1, pp: int = 1, cp: int = 1, dp: Optional[int] = None,
                 virtual_pp: Optional[int] = None, cp_comm_type: str = "p2p", ep: int = 1, moe: bool = False,
                 etp: int = 1):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call megalite.parallel.launch.init_distributed() "
                               "(or torch.distributed.init_process_group) before initialize_grid()")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.backend = dist.get_backend()
        self.dp_size = validate_grid(self.world_size, tp, pp, cp, dp)
        self.tp_size, self.pp_size, self.cp_size, self.ep_size, self.etp_size = tp, pp, cp, ep, etp
        self.cp_comm_type = cp_comm_type   # how attention crosses the CP group (parallel/cp_attention.py)
        if virtual_pp is not None and virtual_pp > 1 and pp == 1:
            raise ValueError(f"a virtual pipeline of size {virtual_pp} needs a pipeline size > 1")
        self.virtual_pp_size = virtual_pp if virtual_pp and virtual_pp > 1 else None

        coords = self.coordinates(self.rank)
        self.tp_rank, self.cp_rank, self.dp_rank, self.pp_rank = coords.tp, coords.cp, coords.dp, coords.pp

        self.ranks: Dict[str, List[int]] = {}
        self._groups: Dict[str, dist.ProcessGroup] = {}
        created: Dict[tuple, dist.ProcessGroup] = {}  # kinds with equal members share one group
        expert_kinds = (["ep"] if ep > 1 else []) + (["edp"] if ep > 1 or (moe and tp > 1) else []) + \
            (["etp", "tp_ep"] if etp > 1 else [])
        for kind in list(GROUP_AXES) + ["embedding"] + expert_kinds:
            for members in grid_group_ranks(self.sizes, kind):
                key = tuple(members)
                if key not in created:
                    # Every rank must call new_group for every group, in the same order.
                    created[key] = dist.new_group(members) if len(members) < self.world_size else dist.group.WORLD
                if self.rank in members:
                    self.ranks[kind], self._groups[kind] = members, created[key]
        self.ep_rank = self.ranks["ep"].index(self.rank) if ep > 1 else 0
        self.etp_rank = self.ranks["etp"].index(self.rank) if etp > 1 else 0

    # -- geometry -----------------------------------------------------------------------------
    @property
    def sizes(self) -> Dict[str, int]:
        return {"tp": self.tp_size, "cp": self.cp_size, "dp": self.dp_size, "pp": self.pp_size, "ep": self.ep_size,
                "etp": self.etp_size}

    def coordinates(self, rank: int) -> Coordinates:
        tp = rank % self.tp_size
        cp = rank // self.tp_size % self.cp_size
        dp = rank // (self.tp_size * self.cp_size) % self.dp_size
        pp = rank // (self.tp_size * self.cp_size * self.dp_size)
        return Coordinates(tp, cp, dp, pp)

    def rank_of(self, tp: int = 0, cp: int = 0, dp: int = 0, pp: int = 0) -> int:
        return _rank_of(self.sizes, {"tp": tp, "cp": cp, "dp": dp, "pp": pp})

    def group_ranks(self, kind: str) -> List[List[int]]:
        """Every group of one kind on the grid (not only this rank's), e.g. ``group_ranks("tp")``."""
        return grid_group_ranks(self.sizes, kind)

    # -- groups ---------------------------------------------------------------------------------
    def group(self, kind: str):
        return self._groups[kind]

    tp_group = property(lambda self: self._groups["tp"])
    cp_group = property(lambda self: self._groups["cp"])
    dp_group = property(lambda self: self._groups["dp"])
    pp_group = property(lambda self: self._groups["pp"])
    mp_group = property(lambda self: self._groups["mp"])
    dp_cp_group = property(lambda self: self._groups["dp_cp"])
    tp_cp_group = property(lambda self: self._groups["tp_cp"])
    embedding_group = property(lambda self: self._groups["embedding"])
    # Expert parallelism (module docstring): ep only when EP > 1, edp also at EP 1 with experts and TP > 1
    # (None otherwise: the experts are then replicated like any parameter, over DP x CP).
    ep_group = property(lambda self: self._groups.get("ep"))
    edp_group = property(lambda self: self._groups.get("edp"))   # expert gradients are reduced over it
    # Expert tensor parallelism (ETP > 1 only): the ranks splitting each expert's ffn, and those with EP.
    etp_group = property(lambda self: self._groups.get("etp"))
    tp_ep_group = property(lambda self: self._groups.get("tp_ep"))

    # -- pipeline -------------------------------------------------------------------------------
    def is_first_stage(self, chunk: int = 0) -> bool:
        """True on the stage that holds the embedding (chunk 0 of pipeline rank 0)."""
        return self.pp_rank == 0 and chunk == 0

    def is_last_stage(self, chunk: int = 0) -> bool:
        """True on the stage that holds the output layer and loss (last chunk of the last rank)."""
        return self.pp_rank == self.pp_size - 1 and chunk == (self.virtual_pp_size or 1) - 1

    @property
    def is_embedding_rank(self) -> bool:
        return self.rank in self.ranks.get("embedding", ())  # middle stages belong to no embedding group

    def __repr__(self) -> str:
        return (f"ProcessGrid(rank={self.rank}/{self.world_size}, TP={self.tp_size}, CP={self.cp_size}, "
                f"DP={self.dp_size}, PP={self.pp_size}, vPP={self.virtual_pp_size}, coords=(tp={self.tp_rank}, "
                f"cp={self.cp_rank}, dp={self.dp_rank}, pp={self.pp_rank}))")


_GRID: Optional[ProcessGrid] = None


def initialize_grid(tp: int = 1, pp: int = 1, cp: int = 1, dp: Optional[int] = None,
                    virtual_pp: Optional[int] = None, cp_comm_type: str = "p2p", ep: int = 1,
                    moe: bool = False, etp: int = 1) -> ProcessGrid:
    """Build the grid (collective: every rank calls it with the same sizes) and make it current."""
    global _GRID
    if _GRID is not None:
        raise RuntimeError("the process grid is already initialized; call destroy_grid() first")
    _GRID = ProcessGrid(tp=tp, pp=pp, cp=cp, dp=dp, virtual_pp=virtual_pp, cp_comm_type=cp_comm_type, ep=ep,
                        moe=moe, etp=etp)
    return _GRID


def get_grid() -> ProcessGrid:
    if _GRID is None:
        raise RuntimeError("the process grid is not initialized; call megalite.parallel.state.initialize_grid()")
    return _GRID


def grid_is_initialized() -> bool:
    return _GRID is not None


def destroy_grid() -> None:
    """Forget the grid and destroy its groups (the default group stays)."""
    global _GRID
    if _GRID is None:
        return
    seen = set()
    for group in _GRID._groups.values():
        if group is not dist.group.WORLD and id(group) not in seen:
            seen.add(id(group))
            dist.destroy_process_group(group)
    _GRID = None
