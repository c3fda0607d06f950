"""--step-batch-size-schedule: Megatron-LM's format, its token thresholds, and training with it."""
import pytest

from megalite.config.training_settings import step_schedule
from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import parse_args
from megalite.training.batch_schedule import BatchSchedule

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "64",
        "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--log-interval", "1000", "--seed", "7",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0"]


def test_megatrons_gpt3_schedule_reads_as_tokens_per_sequence():
    pairs = step_schedule("0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536")
    assert pairs == [(0, 16), (2_400_000_000, 320), (4_800_000_000, 624), (7_200_000_000, 928),
                     (9_600_000_000, 1232), (12_000_000_000, 1536)]
    schedule = BatchSchedule.from_step_schedule(pairs, seq_length=2048, micro_batch_size=1, data_parallel_size=8)
    # 2.4B tokens are 1,171,875 sequences of 2048: the size changes at that sample count, not before.
    assert schedule.global_batch_size(1_171_874) == 16 and schedule.global_batch_size(1_171_875) == 320
    assert schedule.global_batch_size(10**12) == 1536 and schedule.final == 1536
    assert step_schedule("0:8, 1.5k:16") == [(0, 8), (1500, 16)]   # commas and lower-case suffixes


def test_train_samples_counts_whole_steps_of_the_schedule():
    argv = TINY + ["--step-batch-size-schedule", "0:2 64:4 128:8", "--train-samples", "21"]
    train = parse_args(argv, world_size=1)[4]
    # Sizes by samples consumed (thresholds 64 and 128 tokens = samples 4 and 8): 2, 2, 4, 8, 8 -> 24 >= 21.
    assert train.global_batch_size == 8 and train.train_iters == 5


@pytest.mark.parametrize("schedule, extra, message", [
    ("16:2 64:4", [], "starts at 16 tokens; its first entry must be at 0"),
    ("0:2 x:4", [], "entry 'x:4' is not TOKENS:SIZE"),
    ("0:2 64", [], "entry '64' is not TOKENS:SIZE"),
    ("0:2 0:4", [], "gives 0 tokens twice"),
    ("0:2 8:4", [], "thresholds 0 and 8 tokens fall in the same sample"),
    ("0:2 64:3", [], "size 3 is not a multiple of micro batch x data-parallel size 2"),
    ("0:2 64:4", ["--global-batch-size", "8"], "--global-batch-size 8 differs from the last size 4"),
    ("0:2 64:4", ["--rampup-batch-size", "2", "2", "8"], "not both"),
])
def test_bad_schedules_are_refused_in_one_line(schedule, extra, message):
    with pytest.raises(ValueError) as error:
        parse_args(TINY + ["--step-batch-size-schedule", schedule] + extra, world_size=1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_global_batch_size_may_repeat_the_schedules_last_size():
    train = parse_args(TINY + ["--step-batch-size-schedule", "0:2 64:4", "--global-batch-size", "4"], world_size=1)[4]
    assert train.global_batch_size == 4


def _scheduled_against_by_hand(rank, world_size, argv):
    from megalite.parallel import state
    from megalite.training.loop import setup, train_step
    scheduled = setup(argv + ["--step-batch-size-schedule", "0:2 64:4 128:8"])
    records = [train_step(scheduled) for _ in range(5)]
    state.destroy_grid()
    plain = setup(argv + ["--global-batch-size", "8"])
    # Written out: samples 4 and 8 (64 and 128 tokens of 16) are the thresholds; 0, 2, 4, 8, 16 consumed.
    by_hand = [train_step(plain, num_microbatches=size // 2)["loss"] for size in (2, 2, 4, 8, 8)]
    return [r["global_batch_size"] for r in records], [r["loss"] for r in records], by_hand


def test_training_follows_the_schedule_step_by_step():
    argv = TINY + ["--train-iters", "5", "--lr", "1e-3", "--lr-decay-style", "constant"]
    sizes, losses, by_hand = run_on_ranks(_scheduled_against_by_hand, 1, argv, timeout=120)[0]
    assert sizes == [2, 2, 4, 8, 8]
    assert losses == by_hand
