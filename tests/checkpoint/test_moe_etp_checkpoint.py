"""Checkpoints of an MoE model under expert tensor parallelism (TP2 + SP x EP2 x ETP2 on 4 ranks, expert-DP 1):
each expert stack is saved as a box split along two dims, experts over EP and the ffn over expert TP
(checkpoint/index.py), each (EP rank, ffn slice) once, from the first rank of its expert-DP group
(checkpoint/expert_files.py).  A resume at the saved layout is bit for bit the uninterrupted run (without ZeRO
and with ZeRO-1, and with the experts' biases), and the checkpoint reshards to one rank (with biases too) and to
expert TP 1, and one rank's to ETP2, within float32 round-off (losses, and parameters after two Adam steps).

The model and runs of test_moe_ep_checkpoint.py: source runs train 4 iterations saving at 2 and 4; resumed
runs rewind to 2, train 2 and save."""
import os

from megalite.checkpoint import merge, paths
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.test_moe_ep_checkpoint import ZERO1, _assert_bit_exact, ep, run_builders
from tests.checkpoint.test_reshard import _assert_same_curve, _assert_same_params, _train_runs

TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
ETP2 = TP2 + ep(2) + ["--expert-tensor-parallel-size", "2"]


def test_etp2_checkpoints_resume_bit_exact_and_reshard(tmp_path):
    folder, resume, straight = run_builders(tmp_path)

    def biased(run):   # the experts with fc1 / fc2 biases (split with fc1's columns; fc2's whole per ETP pair)
        return [flag for flag in run[0] if flag != "--disable-bias-linear"], run[1]

    one = run_on_ranks(_train_runs, 1, [straight([], "single")], timeout=240)[0]
    four = run_on_ranks(_train_runs, 4, [
        straight(ETP2, "etp2"), resume("etp2", ETP2, "etp2-resumed"),
        straight(ETP2 + ZERO1, "etp2-zero1"), resume("etp2-zero1", ETP2 + ZERO1, "etp2-zero1-resumed"),
        resume("single", ETP2, "single-to-etp2"), resume("etp2", TP2 + ep(2), "etp2-to-etp1"),
        biased(straight(ETP2, "etp2-biases")), biased(resume("etp2-biases", ETP2, "etp2-biases-resumed"))],
        timeout=240)[0]
    back = run_on_ranks(_train_runs, 1, [resume("etp2-zero1", [], "etp2-to-single"),
                                         biased(resume("etp2-biases", [], "etp2-biases-to-single"))], timeout=240)[0]

    for curve in (one[0], four[0], four[2]):
        assert not isinstance(curve, str), curve
        assert [i for i, _ in curve] == [1, 2, 3, 4]
    # DP rank 1 (EP rank 1 of both ffn slices) writes an experts file into its TP folder; DP rank 0's model
    # file holds EP rank 0's slice.
    for tp in (0, 1):
        shard = paths.rank_dir(folder("etp2"), 4, tp, 0)
        assert sorted(f for f in os.listdir(shard) if f.startswith("experts")) == ["experts_ep001.pt"], tp
    _assert_bit_exact(four[1], four[0], folder("etp2-resumed"), folder("etp2"))
    _assert_bit_exact(four[3], four[2], folder("etp2-zero1-resumed"), folder("etp2-zero1"))
    _assert_bit_exact(four[7], four[6], folder("etp2-biases-resumed"), folder("etp2-biases"))
    for source, source_curve, curve, target in (("single", one[0], four[4], "single-to-etp2"),
                                                ("etp2", four[0], four[5], "etp2-to-etp1"),
                                                ("etp2-zero1", four[2], back[0], "etp2-to-single"),
                                                ("etp2-biases", four[6], back[1], "etp2-biases-to-single")):
        assert not isinstance(curve, str), f"{target}: {curve}"
        _assert_same_curve(curve, source_curve[2:])
        reference, _ = merge.merge_checkpoint(folder(source), iteration=4)
        _assert_same_params(folder(target), reference)
