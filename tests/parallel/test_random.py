"""The RNG tracker: named streams that leave the default stream alone, same/different across TP as designed."""
import pytest
import torch

from megalite.model.transformer import Dropout
from megalite.parallel import random as tp_random
from megalite.parallel import state
from megalite.testing import run_on_ranks


@pytest.fixture(autouse=True)
def fresh_tracker():
    saved = tp_random.get_rng_tracker().get_states(), torch.get_rng_state()
    yield
    tp_random.get_rng_tracker().set_states(saved[0])
    torch.set_rng_state(saved[1])


def test_fork_leaves_the_default_stream_untouched():
    tp_random.model_parallel_seed(5)
    expected = torch.rand(5)
    tp_random.model_parallel_seed(5)
    with tp_random.get_rng_tracker().fork(tp_random.TENSOR_PARALLEL_RNG):
        torch.rand(3)
    assert torch.equal(torch.rand(5), expected)


def test_a_stream_continues_across_forks_from_its_own_seed():
    tp_random.model_parallel_seed(5)
    tracker = tp_random.get_rng_tracker()
    with tracker.fork(tp_random.TENSOR_PARALLEL_RNG):
        first = torch.rand(3)
    torch.rand(7)  # the default stream moving in between changes nothing
    with tracker.fork(tp_random.TENSOR_PARALLEL_RNG):
        second = torch.rand(3)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(5 + 2718))   # seed + offset + tp_rank 0
    assert torch.equal(torch.cat([first, second]), expected)


def test_states_round_trip():
    tp_random.model_parallel_seed(9)
    tracker = tp_random.get_rng_tracker()
    saved = tracker.get_states()
    with tracker.fork(tp_random.SEQUENCE_PARALLEL_RNG):
        drawn = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork(tp_random.SEQUENCE_PARALLEL_RNG):
        assert torch.equal(torch.rand(4), drawn)


def test_duplicate_names_and_seeds_are_refused():
    tracker = tp_random.RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="seed 1 is already used"):
        tracker.add("b", 1)


def test_unseeded_tracker_seeds_itself_from_the_default_seed():
    tp_random.get_rng_tracker().reset()
    torch.manual_seed(21)
    with tp_random.get_rng_tracker().fork(tp_random.TENSOR_PARALLEL_RNG):
        drawn = torch.rand(2)
    assert torch.equal(drawn, torch.rand(2, generator=torch.Generator().manual_seed(21 + 2718)))


def _draws(rank, world_size):
    state.initialize_grid(tp=world_size)
    tp_random.model_parallel_seed(1234)
    tracker = tp_random.get_rng_tracker()
    x = torch.ones(64, 8)
    out = {"default": torch.rand(4)}
    for name in (tp_random.TENSOR_PARALLEL_RNG, tp_random.SEQUENCE_PARALLEL_RNG):
        with tracker.fork(name):
            out[name] = torch.rand(4)
    out["dropout_replicated"] = Dropout(0.5, sequence_parallel=False)(x)
    out["dropout_sequence_parallel"] = Dropout(0.5, sequence_parallel=True)(x)
    return out


def test_streams_across_tensor_parallel_ranks():
    ranks = run_on_ranks(_draws, 2)
    same = lambda key: torch.equal(ranks[0][key], ranks[1][key])  # noqa: E731
    # Replicated activations: one mask for all TP ranks.
    assert same("default") and same("dropout_replicated")
    # Different heads (attention dropout) and different tokens (SP) draw different masks.
    assert not same(tp_random.TENSOR_PARALLEL_RNG)
    assert not same(tp_random.SEQUENCE_PARALLEL_RNG)
    assert not same("dropout_sequence_parallel")
    assert not torch.equal(ranks[0][tp_random.TENSOR_PARALLEL_RNG], ranks[0][tp_random.SEQUENCE_PARALLEL_RNG])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_fork_and_restore():
    torch.cuda.init()
    tp_random.model_parallel_seed(5)
    expected = torch.rand(5, device="cuda")
    tp_random.model_parallel_seed(5)
    tracker = tp_random.get_rng_tracker()
    with tracker.fork(tp_random.TENSOR_PARALLEL_RNG):
        first = torch.rand(3, device="cuda")
    assert torch.equal(torch.rand(5, device="cuda"), expected)
    with tracker.fork(tp_random.TENSOR_PARALLEL_RNG):
        second = torch.rand(3, device="cuda")
    assert not torch.equal(first, second)
    torch.cuda.manual_seed(5 + 2718)
    assert torch.equal(torch.rand(6, device="cuda"), torch.cat([first, second]))
