"""PretrainingSampler: Megatron's global order, per-rank slices, resume."""
import pytest

from megalite.data.sampler import PretrainingSampler


def batches(total, consumed, mbs, rank, dp):
    return list(PretrainingSampler(total, consumed, mbs, rank, dp))


def test_ranks_take_their_slice_of_each_global_step():
    assert batches(10, 0, 2, 0, 2) == [[0, 1], [4, 5]]
    assert batches(10, 0, 2, 1, 2) == [[2, 3], [6, 7]]  # 8, 9: an incomplete step, dropped


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_ranks_partition_the_samples_and_resume_continues(dp):
    full = [batches(50, 0, 2, r, dp) for r in range(dp)]
    seen = sorted(i for rank in full for b in rank for i in b)
    assert seen == list(range(len(seen))) and len(seen) == (50 // (2 * dp)) * 2 * dp
    consumed = 3 * 2 * dp  # three steps done
    for r in range(dp):
        assert batches(50, consumed, 2, r, dp) == full[r][3:]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="consumed_samples 11 is past"):
        PretrainingSampler(10, 11, 1, 0, 1)
    with pytest.raises(ValueError, match="dp_rank 2"):
        PretrainingSampler(10, 0, 1, 2, 2)


def test_a_finished_run_reads_nothing_more():
    # a run resumed after its last iteration: every sample consumed, nothing left, no error
    assert batches(8, 8, 2, 0, 2) == [] and batches(8, 8, 2, 1, 2) == []
