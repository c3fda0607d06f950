"""--calculate-per-token-loss: the step's loss and gradient are sum(m l) / sum(m) over the WHOLE global batch
(every micro-batch, every data-parallel rank), checked against a hand computation on one process with
micro-batches of very unequal valid-token counts."""
import math

import pytest
import torch

from megalite.config.settings import ModelConfig
from megalite.model.gpt import GPTModel
from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import parse_args

SEQ = 16
VALID = [3, 16, 7, 1]      # valid (loss-mask) tokens of the four sequences of the global batch
ARGV = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ), "--vocab-size", "64",
        "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0", "--clip-grad", "0",
        "--train-iters", "1", "--seed", "5", "--log-interval", "1000"]


def _sequences():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (len(VALID), SEQ + 1), generator=generator)
    masks = torch.zeros(len(VALID), SEQ)
    for i, count in enumerate(VALID):
        masks[i, SEQ - count:] = 1.0
    return tokens, masks


def _batch(tokens, masks, i):
    return {"tokens": tokens[i:i + 1, :-1].contiguous(), "labels": tokens[i:i + 1, 1:].contiguous(),
            "position_ids": torch.arange(SEQ).unsqueeze(0), "loss_mask": masks[i:i + 1]}


def by_hand(per_token: bool):
    """(loss, gradient norm) of one process over the four sequences."""
    model_cfg = parse_args(ARGV, world_size=1)[0]
    model = GPTModel(ModelConfig.from_saved(vars(model_cfg)), pre_process=True, post_process=True)
    tokens, masks = _sequences()
    losses = [model(**{k: v for k, v in _batch(tokens, masks, i).items() if k != "loss_mask"}) for i in range(4)]
    sums = [(loss * masks[i]).sum() for i, loss in enumerate(losses)]
    if per_token:
        loss = sum(sums) / masks.sum()
    else:
        loss = sum(s / masks[i].sum() for i, s in enumerate(sums)) / 4
    loss.backward()
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), norm


def _step(rank, world_size, argv):
    from megalite.parallel.context_parallel import split_for_context_parallel
    from megalite.training.loop import setup, train_step
    run = setup(argv)
    tokens, masks = _sequences()
    per_rank, dp_rank = 4 // run.grid.dp_size, run.grid.dp_rank      # DP rank r takes sequences r*per_rank ...
    batches = [_batch(tokens, masks, i) for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)]
    run.train_iter = iter([split_for_context_parallel(b, run.grid.cp_size, run.grid.cp_rank) for b in batches])
    record = train_step(run)
    return record["loss"], record["grad_norm"]


@pytest.mark.parametrize("world_size, layout", [(1, []), (2, []), (2, ["--pipeline-model-parallel-size", "2"]),
                                                (2, ["--context-parallel-size", "2"]),
                                                (2, ["--use-distributed-optimizer", "--overlap-grad-reduce"])],
                         ids=["one rank", "DP=2", "PP=2", "CP=2", "DP=2 ZeRO-1 overlapped"])
def test_per_token_loss_and_gradient_match_the_hand_computation(world_size, layout):
    expected_loss, expected_norm = by_hand(per_token=True)
    mean_of_means = by_hand(per_token=False)
    # The counts are unequal enough that the two normalizations differ clearly.
    assert abs(mean_of_means[0] - expected_loss) > 1e-2 * expected_loss
    assert abs(mean_of_means[1] - expected_norm) > 1e-2 * expected_norm
    results = run_on_ranks(_step, world_size, ARGV + layout + ["--calculate-per-token-loss"], timeout=120)
    for loss, norm in results:
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        assert norm == pytest.approx(expected_norm, rel=1e-4)
    default = run_on_ranks(_step, world_size, ARGV + layout, timeout=120)
    for loss, norm in default:     # without the flag: the mean of micro-batch means, as before
        assert loss == pytest.approx(mean_of_means[0], rel=1e-5)
        assert norm == pytest.approx(mean_of_means[1], rel=1e-4)
