"""Sample and blending index builders: C++ (``megalite._data``) when built, numpy otherwise.

The Python functions named ``*_reference`` are the specification: short, obviously correct, and
the oracle of the tests.  ``build_sample_idx`` etc. pick the native version when it exists.
"""
from __future__ import annotations

import numpy as np

from megalite.data.indexed import native_data_module


def build_sample_idx_reference(sizes, document_index, seq_length: int, num_epochs: int,
                               tokens_per_epoch: int, add_extra_token: int = 1) -> np.ndarray:
    """sample_idx [num_samples + 1, 2]: (position in document_index, offset) of each sample start.

    Concatenate the documents in ``document_index`` order into one token stream; sample i is
    tokens [i*seq_length, i*seq_length + seq_length + add_extra_token).  A start that falls on a
    document boundary is written as (next non-empty document, 0).  Only whole samples are kept.
    """
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_index)]
    starts = np.concatenate([[0], np.cumsum(lengths)])  # token position where each document begins
    num_samples = (num_epochs * tokens_per_epoch - add_extra_token) // seq_length
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    doc_pos = np.searchsorted(starts, positions, side="right") - 1
    result = np.stack([doc_pos, positions - starts[doc_pos]], axis=1)
    result[0] = 0
    max_value = max(len(document_index), int(np.max(sizes)))
    return result.astype(np.int32 if max_value <= np.iinfo(np.int32).max else np.int64)


def build_blending_indices_reference(weights, size: int):
    """(dataset_index int16 [size], dataset_sample_index int64 [size]) for a weighted blend."""
    weights = np.asarray(weights, dtype=np.float64)
    taken = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    for i in range(size):
        errors = weights * max(i, 1) - taken
        best = int(np.argmax(errors))  # first maximum: ties go to the lowest dataset id
        dataset_index[i], sample_index[i] = best, taken[best]
        taken[best] += 1
    return dataset_index, sample_index


def build_exhaustive_blending_indices_reference(sizes):
    """Blend that takes exactly sizes[d] samples from dataset d, in proportion to the sizes."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    weights = sizes / float(total)
    taken = np.zeros(len(sizes), dtype=np.int64)
    dataset_index = np.zeros(total, dtype=np.int16)
    sample_index = np.zeros(total, dtype=np.int64)
    for i in range(total):
        errors = np.where(taken < sizes, weights * max(i, 1) - taken, -np.inf)
        best = int(np.argmax(errors))
        dataset_index[i], sample_index[i] = best, taken[best]
        taken[best] += 1
    return dataset_index, sample_index


def build_sample_idx(sizes, document_index, seq_length: int, num_epochs: int, tokens_per_epoch: int,
                     add_extra_token: int = 1) -> np.ndarray:
    native = native_data_module()
    if native is None:
        return build_sample_idx_reference(sizes, document_index, seq_length, num_epochs, tokens_per_epoch,
                                          add_extra_token)
    return native.build_sample_idx(np.asarray(sizes, np.int32), np.asarray(document_index, np.int32),
                                   seq_length, num_epochs, tokens_per_epoch, True, add_extra_token)


def build_blending_indices(weights, size: int):
    native = native_data_module()
    if native is None:
        return build_blending_indices_reference(weights, size)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    native.build_blending_indices(dataset_index, sample_index, weights, len(weights), size)
    return dataset_index, sample_index


def build_exhaustive_blending_indices(sizes):
    sizes = np.asarray(sizes, dtype=np.int64)
    if (sizes <= 0).any():
        raise ValueError(f"exhaustive blending needs positive dataset sizes, got {sizes.tolist()}")
    native = native_data_module()
    if native is None:
        return build_exhaustive_blending_indices_reference(sizes)
    total = int(sizes.sum())
    dataset_index = np.zeros(total, dtype=np.int16)
    sample_index = np.zeros(total, dtype=np.int64)
    native.build_exhaustive_blending_indices(dataset_index, sample_index, sizes, len(sizes))
    return dataset_index, sample_index
