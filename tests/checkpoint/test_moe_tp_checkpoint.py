"""Checkpoints of an MoE model at TP 2 with sequence parallelism (expert TP 1), where the expert-parallel
groups span the TP ranks (parallel/state.py): each EP rank's experts are indexed once, from the file of the
first rank of its expert-DP group (checkpoint/expert_files.py).  A resume at the saved layout is bit for bit
the uninterrupted run (TP2 x EP2 on 2 ranks, TP2 x DP2 x EP2 and TP2 x DP2 x EP4 on 4), and TP2 x EP2 <-> 1 rank
reshard both ways within float32 round-off (losses, and parameters after two Adam steps).

The model and runs of test_moe_ep_checkpoint.py: source runs train 4 iterations saving at 2 and 4; resumed
runs rewind to 2, train 2 and save."""
import os

from megalite.checkpoint import merge, paths
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.test_moe_ep_checkpoint import _assert_bit_exact, ep, run_builders
from tests.checkpoint.test_reshard import _assert_same_curve, _assert_same_params, _train_runs

TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]


def test_tp2_moe_checkpoints_resume_bit_exact_and_reshard_to_one_rank(tmp_path):
    folder, resume, straight = run_builders(tmp_path)

    one = run_on_ranks(_train_runs, 1, [straight([], "single")], timeout=240)[0]
    two = run_on_ranks(_train_runs, 2, [
        straight(TP2 + ep(2), "tp2-ep2"), resume("tp2-ep2", TP2 + ep(2), "tp2-ep2-resumed"),
        resume("single", TP2 + ep(2), "single-to-tp2-ep2")], timeout=240)[0]
    four = run_on_ranks(_train_runs, 4, [
        straight(TP2 + ep(2), "tp2-dp2-ep2"), resume("tp2-dp2-ep2", TP2 + ep(2), "tp2-dp2-ep2-resumed"),
        straight(TP2 + ep(4), "tp2-dp2-ep4"), resume("tp2-dp2-ep4", TP2 + ep(4), "tp2-dp2-ep4-resumed")],
        timeout=240)[0]
    back = run_on_ranks(_train_runs, 1, [resume("tp2-ep2", [], "tp2-ep2-to-single")], timeout=240)[0]

    for curve in (one[0], two[0], four[0], four[2]):
        assert not isinstance(curve, str), curve
        assert [i for i, _ in curve] == [1, 2, 3, 4]
    # EP2 at TP2: EP rank 1 is TP rank 1, whose model file holds its experts; EP4 at TP2 x DP2: EP ranks 2
    # and 3 are DP rank 1, which write experts files into their TP folders.
    for root, files in (("tp2-dp2-ep2", [[], []]), ("tp2-dp2-ep4", [["experts_ep002.pt"], ["experts_ep003.pt"]])):
        for tp in (0, 1):
            shard = paths.rank_dir(folder(root), 4, tp, 0)
            assert sorted(f for f in os.listdir(shard) if f.startswith("experts")) == files[tp], (root, tp)
    _assert_bit_exact(two[1], two[0], folder("tp2-ep2-resumed"), folder("tp2-ep2"))
    _assert_bit_exact(four[1], four[0], folder("tp2-dp2-ep2-resumed"), folder("tp2-dp2-ep2"))
    _assert_bit_exact(four[3], four[2], folder("tp2-dp2-ep4-resumed"), folder("tp2-dp2-ep4"))
    for source, source_curve, curve, target in (("single", one[0], two[2], "single-to-tp2-ep2"),
                                                ("tp2-ep2", two[0], back[0], "tp2-ep2-to-single")):
        assert not isinstance(curve, str), f"{target}: {curve}"
        _assert_same_curve(curve, source_curve[2:])
        reference, _ = merge.merge_checkpoint(folder(source), iteration=4)
        _assert_same_params(folder(target), reference)
