"""The loop end to end on --mock-data: the loss falls, --log-json has every iteration, eval runs."""
import json
import math

import pytest

from megalite.parallel.testing import run_on_ranks

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "64",
        "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--log-interval", "1000", "--seed", "7"]


def _pretrain(rank, world_size, argv):
    from megalite.training.loop import pretrain
    return [{k: r[k] for k in r} for r in pretrain(argv)]


def test_mock_run_lowers_loss_and_logs_json(tmp_path):
    log = tmp_path / "log.jsonl"
    argv = TINY + ["--train-iters", "30", "--lr", "3e-3", "--lr-warmup-iters", "3", "--lr-decay-style", "cosine",
                   "--eval-interval", "15", "--eval-iters", "2", "--hidden-dropout", "0", "--attention-dropout", "0",
                   "--log-json", str(log)]
    history = run_on_ranks(_pretrain, 1, argv, timeout=120)[0]
    losses = [r["loss"] for r in history]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, (first, last)

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 31))
    for r in records:
        for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_device", "mfu",
                    "peak_memory_mb", "skipped_steps"):
            assert key in r, key
        assert r["tokens_per_sec"] > 0 and r["grad_norm"] > 0
    assert [r["loss"] for r in records] == losses
    assert records[0]["lr"] == pytest.approx(1e-3) and records[2]["lr"] == pytest.approx(3e-3)  # warm-up 1/3, 3/3
    assert records[-1]["lr"] < records[5]["lr"]                            # cosine decay
    evals = [r for r in records if "eval_loss" in r]
    assert [r["iteration"] for r in evals] == [15, 30]
    assert evals[1]["eval_ppl"] == math.exp(evals[1]["eval_loss"])
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
