"""The process grid: rank layout, every group, first/last stage, refusal of bad grids."""
import pytest
import torch.distributed as dist

from megalite.parallel import state
from megalite.parallel.state import grid_group_ranks, validate_grid
from megalite.parallel.testing import RankFailed, RanksHung, run_on_ranks


def test_worked_example_tp2_dp2_pp2():
    sizes = {"tp": 2, "cp": 1, "dp": 2, "pp": 2}
    assert grid_group_ranks(sizes, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid_group_ranks(sizes, "dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid_group_ranks(sizes, "pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid_group_ranks(sizes, "mp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert grid_group_ranks(sizes, "embedding") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_context_parallel_layout():
    # 8 ranks, TP=2, CP=2, DP=2: rank = tp + 2*(cp + 2*dp)
    sizes = {"tp": 2, "cp": 2, "dp": 2, "pp": 1}
    assert grid_group_ranks(sizes, "cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid_group_ranks(sizes, "dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid_group_ranks(sizes, "dp_cp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert grid_group_ranks(sizes, "pp") == [[r] for r in range(8)]


def test_pipeline_of_four_layout():
    # 8 ranks, TP=1, DP=2, PP=4: stage s holds ranks 2s, 2s+1
    sizes = {"tp": 1, "cp": 1, "dp": 2, "pp": 4}
    assert grid_group_ranks(sizes, "pp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert grid_group_ranks(sizes, "dp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid_group_ranks(sizes, "embedding") == [[0, 6], [1, 7]]
    assert grid_group_ranks(sizes, "mp") == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize("world, tp, pp, cp, dp, message", [
    (8, 3, 1, 1, None, "world size 8 is not divisible by tensor (3) x pipeline (1) x context (1)"),
    (8, 2, 3, 1, None, "= 6"),
    (8, 2, 2, 1, 4, "DP must be 2"),
    (4, 0, 1, 1, None, "grid size tp=0 must be at least 1"),
])
def test_bad_grids_are_refused_with_the_numbers(world, tp, pp, cp, dp, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_grid(world, tp, pp, cp, dp)


def _grid_on_rank(rank, world_size, tp, pp, cp, virtual_pp):
    grid = state.initialize_grid(tp=tp, pp=pp, cp=cp, virtual_pp=virtual_pp)
    assert grid.rank_of(grid.tp_rank, grid.cp_rank, grid.dp_rank, grid.pp_rank) == rank
    # Each group really connects its members: the sum of member ranks over the group.
    sums = {}
    for kind in ("tp", "cp", "dp", "pp", "mp", "dp_cp", "embedding"):
        t = __import__("torch").tensor([float(rank)])
        if rank in grid.ranks[kind]:
            dist.all_reduce(t, group=grid.group(kind))
            sums[kind] = (grid.ranks[kind], t.item())
    firsts = [grid.is_first_stage(chunk=c) for c in range(virtual_pp or 1)]
    lasts = [grid.is_last_stage(chunk=c) for c in range(virtual_pp or 1)]
    # The grid can be destroyed and rebuilt.
    state.destroy_grid()
    again = state.initialize_grid(tp=tp, pp=pp, cp=cp, virtual_pp=virtual_pp)
    same = again.ranks == grid.ranks
    return grid.tp_rank, grid.cp_rank, grid.dp_rank, grid.pp_rank, sums, firsts, lasts, same


def test_grid_groups_on_eight_gloo_ranks():
    results = run_on_ranks(_grid_on_rank, 8, 2, 2, 1, 2)
    for rank, (tp, cp, dp, pp, sums, firsts, lasts, same) in enumerate(results):
        assert (tp, cp, dp, pp) == (rank % 2, 0, rank // 2 % 2, rank // 4)
        for kind, (members, total) in sums.items():
            assert total == sum(members), (rank, kind)
        assert sums["tp"][0] == [rank - rank % 2, rank - rank % 2 + 1]
        # virtual pipeline of 2 chunks: first stage is chunk 0 on pp rank 0, last is chunk 1 on the last
        assert firsts == [pp == 0, False]
        assert lasts == [False, pp == 1]
        assert same


# Rank functions live at module level: the fork server receives them by pickle (megalite/parallel/testing.py).
def _build_grid(rank, world_size, **sizes):
    state.initialize_grid(**sizes)


def test_grid_refuses_world_mismatch_on_ranks():
    with pytest.raises(RankFailed, match="world size 4 is not divisible"):
        run_on_ranks(_build_grid, 4, tp=3)


def test_virtual_pipeline_needs_pipeline():
    with pytest.raises(RankFailed, match="needs a pipeline size > 1"):
        run_on_ranks(_build_grid, 1, tp=1, pp=1, virtual_pp=2)


def _hang_on_rank_one(rank, world_size):
    import time
    if rank == 1:
        time.sleep(60)


def test_harness_names_the_rank_that_hung():
    with pytest.raises(RanksHung, match=r"rank\(s\) \[1\] of 2"):
        run_on_ranks(_hang_on_rank_one, 2, timeout=3)


def test_expert_groups_fold_into_each_stage():
    from megalite.parallel.state import expert_group_ranks
    sizes = {"tp": 1, "cp": 1, "dp": 4, "pp": 2, "ep": 2}      # docs/architecture.md's worked example
    assert expert_group_ranks(sizes, "ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_group_ranks(sizes, "edp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    sizes = {"tp": 2, "cp": 1, "dp": 2, "pp": 1, "ep": 4}      # EP spans TP x DP: one expert-DP rank each
    assert expert_group_ranks(sizes, "ep") == [[0, 1, 2, 3]]
    assert expert_group_ranks(sizes, "edp") == [[0], [1], [2], [3]]
    sizes = {"tp": 2, "cp": 1, "dp": 2, "pp": 2, "ep": 2}      # TP=2 (expert TP 1): the EP groups are the TP groups
    assert expert_group_ranks(sizes, "ep") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_group_ranks(sizes, "edp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    sizes = {"tp": 2, "cp": 1, "dp": 2, "pp": 2, "ep": 1}      # EP 1 at TP 2: the expert-DP group is the stage
    assert expert_group_ranks(sizes, "edp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="expert-parallel size 3 does not divide the TP x CP x DP = 4"):
        expert_group_ranks({"tp": 1, "cp": 1, "dp": 4, "pp": 1, "ep": 3}, "ep")


def test_expert_tensor_parallel_groups_order_expert_tp_first():
    """ETP = TP = 2 (docs/architecture.md's second worked example): Megatron-LM's tp-ep-dp order within a stage,
    local rank etp + ETP (ep + EP edp); the etp groups are the tp groups."""
    from megalite.parallel.state import expert_group_ranks, grid_group_ranks
    sizes = {"tp": 2, "cp": 1, "dp": 2, "pp": 2, "ep": 2, "etp": 2}
    assert expert_group_ranks(sizes, "etp") == grid_group_ranks(sizes, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_group_ranks(sizes, "ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert expert_group_ranks(sizes, "tp_ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expert_group_ranks(sizes, "edp") == [[r] for r in range(8)]
    sizes = {"tp": 2, "cp": 2, "dp": 2, "pp": 1, "ep": 2, "etp": 2}     # expert-DP 2 over CP x DP
    assert expert_group_ranks(sizes, "ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert expert_group_ranks(sizes, "edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ValueError, match="expert-parallel size 4 x expert tensor-parallel size 2 does not divide"):
        expert_group_ranks({"tp": 2, "cp": 1, "dp": 2, "pp": 1, "ep": 4, "etp": 2}, "ep")
