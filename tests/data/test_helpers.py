"""Sample and blending index builders: native vs the Python references (and megatron-core)."""
import numpy as np
import pytest

from megalite.data import helpers
from megalite.data.indexed import native_data_module

native = native_data_module()
needs_native = pytest.mark.skipif(native is None, reason="megalite._data is not built")


def random_corpus(seed, num_docs=300, with_empty=True):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0 if with_empty else 1, 80, num_docs).astype(np.int32)
    sizes[0] = max(sizes[0], 1)
    epochs = int(rng.integers(1, 4))
    document_index = np.tile(np.arange(num_docs, dtype=np.int32), epochs)
    rng.shuffle(document_index)
    return sizes, document_index, epochs, int(sizes.sum())


@needs_native
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("seq_length", [1, 7, 64, 500])
def test_sample_idx_matches_reference(seed, seq_length):
    sizes, document_index, epochs, tokens = random_corpus(seed)
    got = helpers.build_sample_idx(sizes, document_index, seq_length, epochs, tokens)
    want = helpers.build_sample_idx_reference(sizes, document_index, seq_length, epochs, tokens)
    assert got.dtype == want.dtype == np.int32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(3))
def test_sample_idx_matches_megatron_core(seed):
    mc = pytest.importorskip("megatron.core.datasets.helpers", reason="megatron-core not installed")
    sizes, document_index, epochs, tokens = random_corpus(seed, with_empty=False)
    for seq_length in (3, 33):
        want = mc.build_sample_idx(sizes, document_index, seq_length, epochs, tokens, True, True)
        np.testing.assert_array_equal(helpers.build_sample_idx(sizes, document_index, seq_length, epochs, tokens), want)


@needs_native
@pytest.mark.parametrize("seed", range(5))
def test_blending_matches_reference(seed):
    rng = np.random.default_rng(seed)
    weights = rng.random(int(rng.integers(1, 6))) + 0.01
    weights /= weights.sum()
    size = int(rng.integers(1, 3000))
    for got, want in zip(helpers.build_blending_indices(weights, size),
                         helpers.build_blending_indices_reference(weights, size)):
        np.testing.assert_array_equal(got, want)
    sizes = rng.integers(1, 400, len(weights))
    for got, want in zip(helpers.build_exhaustive_blending_indices(sizes),
                         helpers.build_exhaustive_blending_indices_reference(sizes)):
        np.testing.assert_array_equal(got, want)
    dataset_index, sample_index = helpers.build_exhaustive_blending_indices(sizes)
    assert np.bincount(dataset_index, minlength=len(sizes)).tolist() == sizes.tolist()


def test_blending_matches_megatron_core():
    mc = pytest.importorskip("megatron.core.datasets.helpers", reason="megatron-core not installed")
    weights = np.array([0.2, 0.5, 0.3])
    dataset_index, sample_index = np.zeros(999, np.int16), np.zeros(999, np.int64)
    mc.build_blending_indices(dataset_index, sample_index, weights, 3, 999, False)
    got = helpers.build_blending_indices(weights, 999)
    np.testing.assert_array_equal(got[0], dataset_index)
    np.testing.assert_array_equal(got[1], sample_index)
    sizes = np.array([10, 37, 5])
    dataset_index, sample_index = np.zeros(52, np.int16), np.zeros(52, np.int64)
    mc.build_exhaustive_blending_indices(dataset_index, sample_index, sizes, 3)
    got = helpers.build_exhaustive_blending_indices(sizes)
    np.testing.assert_array_equal(got[0], dataset_index)
    np.testing.assert_array_equal(got[1], sample_index)


def test_exhaustive_blending_refuses_empty_members():
    with pytest.raises(ValueError, match="positive dataset sizes"):
        helpers.build_exhaustive_blending_indices([3, 0])
