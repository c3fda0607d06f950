"""The RNG tracker: named streams that leave the default stream alone, same/different across TP as designed."""
import pytest
import torch

from megalite.model.transformer import Dropout
from megalite.parallel import random as tp_random
from megalite.parallel import state
from megalite.parallel.testing import run_on_ranks


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


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_streams_fork_and_restore_on(device):
    """The tracker on each device's default generator: the default stream is restored after a fork,
    and a stream continues where its last fork left it, from seed + offset + tp_rank.

    "Continues" is checked against a private generator making the same calls, not against one
    longer draw: on CUDA, torch.rand(3) twice is not torch.rand(6) -- element i of a draw comes from
    Philox subsequence i at the generator's offset, and each call advances the offset (by 4 for a
    small tensor), so the second draw starts a new offset, not element 3.  (On the CPU's Mersenne
    Twister the two happen to agree, which is what the CPU-only test above relies on.)
    """
    if device == "cuda":
        torch.cuda.init()  # the tracker keeps a CUDA state only once CUDA is initialised
        saved_cuda = torch.cuda.get_rng_state()
    tp_random.model_parallel_seed(5)
    expected = torch.rand(5, device=device)
    tp_random.model_parallel_seed(5)
    tracker = tp_random.get_rng_tracker()
    with tracker.fork(tp_random.TENSOR_PARALLEL_RNG):
        first = torch.rand(3, device=device)
    assert torch.equal(torch.rand(5, device=device), expected)
    with tracker.fork(tp_random.TENSOR_PARALLEL_RNG):
        second = torch.rand(3, device=device)
    assert not torch.equal(first, second)
    stream = torch.Generator(device=device).manual_seed(5 + 2718)  # seed + offset + tp_rank 0
    assert torch.equal(first, torch.rand(3, device=device, generator=stream))
    assert torch.equal(second, torch.rand(3, device=device, generator=stream))
    if device == "cuda":
        torch.cuda.set_rng_state(saved_cuda)
