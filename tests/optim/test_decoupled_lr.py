"""--decoupled-lr / --decoupled-min-lr: the input embedding and output layer on their own rates (Megatron's
meaning), visible in the optimizer's groups, following the same schedule, and applied by training."""
import math

import pytest

from megalite.config.settings import ModelConfig, OptimizerConfig
from megalite.model.gpt import GPTModel
from megalite.optim import build_optimizer
from megalite.optim.schedulers import LRScheduler
from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import parse_args

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "64",
        "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--log-interval", "1000", "--seed", "7",
        "--eval-iters", "0"]


def _groups(untie: bool, **optimizer):
    model = GPTModel(ModelConfig(untie_embeddings_and_output_weights=untie, num_layers=1, hidden_size=16,
                                 num_attention_heads=2, seq_length=8), pre_process=True, post_process=True)
    optimizer = build_optimizer([model], OptimizerConfig(**optimizer), grid=None)
    names = {id(p): name for name, p in model.named_parameters()}
    return optimizer, [(g, sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]


def test_embedding_and_output_layer_form_their_own_groups():
    _, groups = _groups(True, lr=1e-3, decoupled_lr=5e-4, weight_decay=0.1)
    decoupled = [(g["lr"], g["weight_decay"], names) for g, names in groups if g.get("decoupled_lr")]
    assert decoupled == [(5e-4, 0.1, ["embedding.word_embeddings.weight", "output_layer.weight"])]
    others = [name for g, names in groups if not g.get("decoupled_lr") for name in names]
    assert "embedding.position_embeddings.weight" in others and all(g["lr"] == 1e-3 for g, _ in groups
                                                                        if not g.get("decoupled_lr"))
    _, tied = _groups(False, decoupled_lr=5e-4)        # tied on one stage: one tensor, once
    assert [names for g, names in tied if g.get("decoupled_lr")] == [["embedding.word_embeddings.weight"]]


def test_without_the_flag_the_groups_are_as_before():
    _, groups = _groups(True, lr=1e-3)
    assert [g["weight_decay"] for g, _ in groups] == [0.01, 0.0] and not any("decoupled_lr" in g for g, _ in groups)


def test_the_schedule_moves_both_rates_on_one_curve():
    optimizer, _ = _groups(True, lr=1e-3, min_lr=1e-4, decoupled_lr=5e-4, decoupled_min_lr=4.5e-5)
    scheduler = LRScheduler(optimizer, 1e-3, 1e-4, 2, 10, "cosine", decoupled=(5e-4, 4.5e-5))

    def by_hand(n, peak, end):
        if n <= 2:
            return peak * n / 2
        ratio = (n - 1 - 2) / 8
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * ratio))

    for n in range(1, 14):
        rates = {bool(g.get("decoupled_lr")): g["lr"] for g in optimizer.param_groups}
        assert rates[True] == pytest.approx(by_hand(n, 5e-4, 4.5e-5) if n <= 11 else 4.5e-5), n
        assert rates[False] == pytest.approx(by_hand(n, 1e-3, 1e-4) if n <= 11 else 1e-4), n
        scheduler.step()


@pytest.mark.parametrize("argv, message", [
    (["--decoupled-min-lr", "1e-5"], "--decoupled-min-lr 1e-05 takes effect only with --decoupled-lr"),
    (["--decoupled-lr", "1e-5", "--min-lr", "1e-4", "--lr", "1e-3"], "the decoupled minimum 0.0001"),
    (["--decoupled-lr", "-1"], "--decoupled-lr must be at least 0"),
    # The check after the decoupled ones in OptimizerConfig still runs.
    (["--decoupled-lr", "1e-4", "--min-loss-scale", "8", "--initial-loss-scale", "4"], "--min-loss-scale 8.0 is above"),
])
def test_inconsistent_decoupled_rates_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(TINY + argv, world_size=1)


def test_default_decoupled_end_is_min_lr():
    opt = parse_args(TINY + ["--decoupled-lr", "5e-4", "--min-lr", "1e-5"], world_size=1)[2]
    assert opt.decoupled_lr_range() == (5e-4, 1e-5)


def _changes(rank, world_size, argv):
    from megalite.parallel.data_parallel import unwrap_model
    from megalite.training.loop import setup, train_step
    run = setup(argv)
    model = unwrap_model(run.model[0])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):
        train_step(run)
    return {name: float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()}


def test_training_with_a_zero_decoupled_rate_leaves_exactly_those_weights():
    argv = TINY + ["--train-iters", "2", "--lr", "1e-2", "--decoupled-lr", "0", "--untie-embeddings-and-output-weights",
                   "--lr-decay-style", "constant", "--weight-decay", "0.1"]
    changes = run_on_ranks(_changes, 1, argv, timeout=120)[0]
    assert changes["embedding.word_embeddings.weight"] == 0 and changes["output_layer.weight"] == 0
    assert changes["embedding.position_embeddings.weight"] > 0 and changes["final_norm.weight"] > 0
    assert all(change > 0 for name, change in changes.items() if name.startswith("decoder."))


def _history(rank, world_size, argv):
    from megalite.training.loop import pretrain
    return [(r["loss"], r["lr"]) for r in pretrain(argv)]


def test_a_resumed_run_keeps_the_decoupled_groups_and_their_schedule(tmp_path):
    argv = TINY + ["--lr", "1e-2", "--decoupled-lr", "3e-2", "--decoupled-min-lr", "1e-3", "--lr-decay-iters", "4",
                   "--lr-decay-style", "cosine", "--untie-embeddings-and-output-weights", "--hidden-dropout", "0",
                   "--attention-dropout", "0"]
    whole = run_on_ranks(_history, 1, argv + ["--train-iters", "4"], timeout=120)[0]
    folder = str(tmp_path / "ckpt")
    first = run_on_ranks(_history, 1, argv + ["--train-iters", "2", "--save", folder], timeout=120)[0]
    rest = run_on_ranks(_history, 1, argv + ["--train-iters", "4", "--save", folder, "--load", folder], timeout=120)[0]
    assert first + rest == whole


def _setup_error(rank, world_size, argv):
    from megalite.training.loop import setup
    try:
        setup(argv)
    except ValueError as error:
        return str(error)
    return None


def test_resuming_without_the_decoupled_groups_is_refused_naming_the_flag(tmp_path):
    argv = TINY + ["--lr", "1e-2", "--untie-embeddings-and-output-weights"]
    folder = str(tmp_path / "ckpt")
    run_on_ranks(_history, 1, argv + ["--decoupled-lr", "3e-2", "--train-iters", "1", "--save", folder], timeout=120)
    error = run_on_ranks(_setup_error, 1, argv + ["--train-iters", "2", "--load", folder], timeout=120)[0]
    assert error is not None and "saved with --decoupled-lr and this run is without it" in error, error
