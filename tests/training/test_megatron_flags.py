"""Megatron-LM's own example command lines, sample-based schedules, batch-size ramp-up and the log line."""
import json
import re

import pytest

from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import parse_args
from megalite.training.batch_schedule import BatchSchedule

# The flags of Megatron-LM's former examples/gpt3/train_gpt3_857m_distributed.sh (Megatron-LM no longer
# has it; its current scripts are kept and trained in tests/training/test_megatron_scripts.py) and of the
# older GPT-2 345M examples/pretrain_gpt.sh (--data-impl, --distributed-backend, --checkpoint-activations,
# --lr-warmup-fraction, --rampup-batch-size), sizes shrunk to a CPU test; --mock-data stands in for the
# corpus, so the vocabulary flags are left out.
MEGATRON_857M = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
    "--max-position-embeddings", "16", "--attention-backend", "auto",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--rampup-batch-size", "4", "4", "8",
    "--train-iters", "4", "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
    "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5", "--lr-decay-style", "cosine",
    "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001", "--lr-decay-iters", "4",
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
    "--split", "949,50,1", "--log-interval", "1", "--save-interval", "10000", "--eval-interval", "1000",
    "--eval-iters", "1", "--use-flash-attn", "--data-impl", "mmap", "--distributed-backend", "gloo",
    "--checkpoint-activations", "--log-throughput", "--mock-data", "--vocab-size", "64",
    "--make-vocab-size-divisible-by", "64",
]
TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "64",
        "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--log-interval", "1000", "--seed", "7",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0"]


def test_megatron_example_command_line_parses(tmp_path):
    checkpoints = ["--save", str(tmp_path), "--load", str(tmp_path), "--tensorboard-dir", str(tmp_path / "tb")]
    model, parallel, opt, data, train = parse_args(MEGATRON_857M + checkpoints, world_size=1)
    assert (model.recompute_granularity, model.recompute_method) == ("full", "uniform")  # --checkpoint-activations
    assert opt.fp16 and train.rampup_batch_size == [4, 4, 8] and parallel.distributed_backend == "gloo"
    assert train.lr_schedule_steps() == (0, 4)   # warm-up .001 of 4 decay steps rounds to none


def _train(rank, world_size, argv, save):
    from megalite.training.loop import pretrain
    return pretrain(argv + ["--save", save, "--load", save]) if save else pretrain(argv)


def test_megatron_example_trains_and_prints_megatron_log_lines(tmp_path, capfd):
    history = run_on_ranks(_train, 1, MEGATRON_857M, str(tmp_path / "ckpt"), timeout=120)[0]
    # The ramp: one increment of 4 after 8 samples, so two steps of 4, then the full 8.
    assert [r["global_batch_size"] for r in history] == [4, 4, 8, 8]
    assert [r["consumed_samples"] for r in history] == [4, 8, 16, 24]
    out = capfd.readouterr().out
    # A parser written for Megatron's logs (the fields, their order and number formats).
    megatron_line = re.compile(
        r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +(\d+)/ +4 \| consumed samples: +(\d+) \| "
        r"elapsed time per iteration \(ms\): [\d.]+ \| throughput per GPU \(TFLOP/s/GPU\): [\d.]+ \| "
        r"learning rate: ([\d.]+E[+-]\d+) \| global batch size: +(\d+) \| lm loss: ([\d.]+E[+-]\d+) \| "
        r"loss scale: [\d.]+ \| grad norm: [\d.]+ \| number of skipped iterations: +\d+ \| "
        r"number of nan iterations: +0 \|")
    parsed = [m.groups() for m in megatron_line.finditer(out)]
    assert [(int(i), int(c), int(b)) for i, c, _, b, _ in parsed] == [(1, 4, 4), (2, 8, 4), (3, 16, 8), (4, 24, 8)]
    assert [float(loss) for *_, loss in parsed] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    assert "validation loss at iteration 4 | lm loss value:" in out


def test_batch_schedule_arithmetic_and_refusals():
    ramp = BatchSchedule(16, micro_batch_size=2, data_parallel_size=2, rampup=(4, 4, 24))
    # 3 increments over 24 samples: +4 every 8 consumed samples.
    assert [ramp.global_batch_size(c) for c in (0, 4, 8, 16, 24, 1000)] == [4, 4, 8, 12, 16, 16]
    assert ramp.num_microbatches(8) == 2
    assert ramp.num_iterations(100) == 2 + 1 + 1 + 5  # 4+4, 8, 12, then 72 left at 16 per step
    with pytest.raises(ValueError, match="not a multiple of micro batch x data-parallel size 4"):
        BatchSchedule(16, 2, 2, rampup=(2, 2, 10))
    with pytest.raises(ValueError, match="does not reach the global batch size 16"):
        BatchSchedule(16, 2, 2, rampup=(4, 8, 10))
    with pytest.raises(ValueError, match="--rampup-batch-size 3 3 6 with --global-batch-size 8"):
        parse_args(TINY + ["--global-batch-size", "8", "--rampup-batch-size", "3", "3", "6"], world_size=1)


def _ramped_against_by_hand(rank, world_size, argv):
    from megalite.parallel import state
    from megalite.training.loop import setup, train_step
    ramped = setup(argv + ["--global-batch-size", "8", "--rampup-batch-size", "2", "2", "12"])
    ramped_losses = [train_step(ramped)["loss"] for _ in range(6)]
    state.destroy_grid()
    plain = setup(argv + ["--global-batch-size", "8"])
    # The sizes the ramp should take, written out: +2 every 4 samples consumed (3 increments over 12
    # samples), so 2 (after 0), 2 (after 2), 4 (after 4), 6 (after 8), then 8.
    by_hand = [train_step(plain, num_microbatches=size // 2)["loss"] for size in (2, 2, 4, 6, 8, 8)]
    return ramped_losses, by_hand, ramped.consumed_samples, plain.consumed_samples


def test_rampup_equals_the_same_batch_sizes_set_by_hand():
    argv = TINY + ["--train-iters", "6", "--lr", "1e-3", "--lr-decay-style", "constant"]
    ramped, by_hand, consumed, consumed_by_hand = run_on_ranks(_ramped_against_by_hand, 1, argv, timeout=120)[0]
    assert ramped == by_hand and consumed == consumed_by_hand == 30


def _lr_history(rank, world_size, argv):
    from megalite.training.loop import pretrain
    return [(r["lr"], r["consumed_samples"]) for r in pretrain(argv)]


def test_sample_based_schedule_counts_samples():
    # 40 samples at 4 per step = 10 steps; warm-up 8 samples (2 steps), linear decay to 0 over 40 samples.
    argv = TINY + ["--global-batch-size", "4", "--train-samples", "40", "--lr", "1e-3", "--lr-warmup-samples", "8",
                   "--lr-decay-samples", "40"]
    _, _, _, _, train = parse_args(argv, world_size=1)
    assert train.train_iters == 10 and train.lr_schedule_steps() == (8, 40)
    history = run_on_ranks(_lr_history, 1, argv, timeout=120)[0]
    assert [c for _, c in history] == list(range(4, 44, 4))
    lrs = [lr for lr, _ in history]
    assert lrs[0] == pytest.approx(1e-3 * 1 / 8)          # sample 1 of an 8-sample warm-up
    assert lrs[1] == pytest.approx(1e-3 * 5 / 8)
    assert lrs[2] == pytest.approx(1e-3 * (1 - (8 - 8) / 32))  # warm-up done: the peak
    assert lrs[-1] == pytest.approx(1e-3 * (1 - (36 - 8) / 32))


@pytest.mark.parametrize("argv, message", [
    (["--train-iters", "5", "--train-samples", "40"], "give --train-iters or --train-samples, not both"),
    (["--train-samples", "40", "--lr-decay-iters", "5"], "--lr-decay-iters goes with --train-iters"),
    (["--train-iters", "5", "--lr-warmup-samples", "4"], "--lr-warmup-samples goes with --train-samples"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "give --lr-warmup-fraction or a warm-up count"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be at most 1, got 1.5"),
    (["--profile-step-start", "5", "--profile-step-end", "5"], "--profile-step-end 5 must come after"),
])
def test_schedule_flags_refuse_mixed_units(argv, message):
    with pytest.raises(ValueError) as error:
        parse_args(TINY + argv, world_size=1)
    assert message in str(error.value)


def test_log_json_records_the_step_batch_size(tmp_path):
    log = tmp_path / "log.jsonl"
    argv = TINY + ["--train-iters", "3", "--global-batch-size", "4", "--rampup-batch-size", "2", "2", "2",
                   "--log-json", str(log)]
    run_on_ranks(_train, 1, argv, None, timeout=120)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["global_batch_size"] for r in records] == [2, 4, 4]
