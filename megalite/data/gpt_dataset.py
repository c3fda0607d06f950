"""GPT samples: fixed-length windows over a shuffled token stream, identical to Megatron-LM's.

For one dataset prefix and one split (Megatron-LM core's GPTDataset, same seed -> same stream):

1. documents: the split owns sequences [round(a*N), round(b*N)) of the N in the .idx, where
   (a, b) are the cumulative fractions of the ``--split`` string ("969,30,1").
2. epochs: the fewest E with E * tokens(split) >= num_samples * seq_length + 1.
3. document index: the split's documents repeated E times and shuffled with
   numpy.random.RandomState(seed).  When the last epoch is needed for less than 80% of its
   samples, it is shuffled separately, so the first E-1 epochs are not polluted by a partial one.
4. sample index: cut the concatenated stream into samples of seq_length + 1 tokens that overlap by
   one token (``helpers.build_sample_idx``).
5. shuffle index: a permutation of the samples from the same RandomState (the partial last epoch,
   if separate, again shuffled on its own).

Sample i is tokens = stream[j*s : j*s + s], labels = stream[j*s + 1 : j*s + s + 1] with
j = shuffle_index[i].  Every item is a dict of numpy arrays (layouts [s]):
``tokens`` int64, ``labels`` int64, ``loss_mask`` float32, ``position_ids`` int64.
"""
from __future__ import annotations

import numpy as np

from megalite.config.data_spec import parse_blend, split_weights
from megalite.data.blended import BlendedDataset, samples_per_dataset
from megalite.data.helpers import build_sample_idx
from megalite.data.index_cache import cached_indices
from megalite.data.indexed import IndexedDataset, check_dataset_exists

SPLIT_NAMES = ("train", "valid", "test")
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80  # Megatron's: separate the last epoch below 80% use


def parse_split(split: str) -> list[tuple[float, float] | None]:
    """"969,30,1" -> [(0, .969), (.969, .999), (.999, 1.0)]; None for a split of zero width."""
    weights = split_weights(split)
    weights += [0.0] * (3 - len(weights))
    total = float(np.sum(np.array(weights, dtype=np.float64)))
    fractions = (np.array(weights, dtype=np.float64) / total).tolist()
    bounds, start = [], 0.0
    for fraction in fractions:
        end = start + fraction
        bounds.append((start, end) if end > start else None)
        start = end
    return bounds


def split_document_range(bounds: tuple[float, float], num_sequences: int) -> np.ndarray:
    begin = int(round(bounds[0] * float(num_sequences)))
    end = int(round(bounds[1] * float(num_sequences)))
    return np.arange(begin, end, dtype=np.int32)


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    epochs, tokens, wanted = 1, tokens_per_epoch, num_samples * seq_length + 1
    while tokens < wanted:
        epochs += 1
        tokens += tokens_per_epoch
    return epochs


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_last_epoch: bool) -> np.ndarray:
    if separate_last_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        last = build_document_index(documents, 1, rng, False)
        return np.concatenate([first, last])
    document_index = np.tile(documents, num_epochs).astype(np.int32)
    rng.shuffle(document_index)
    return document_index


def build_shuffle_index(num_shuffled_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_shuffled_first, dtype=dtype)
    rng.shuffle(first)
    if num_shuffled_first == total:
        return first
    last = np.arange(num_shuffled_first, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_gpt_indices(sequence_lengths: np.ndarray, documents: np.ndarray, seq_length: int, seed: int,
                      num_samples: int):
    """(document_index, sample_index, shuffle_index) for one split; see the module docstring."""
    tokens_per_epoch = int(np.sum(sequence_lengths[documents]))
    num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length)
    separate_last_epoch = False
    if num_epochs > 1:
        samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        samples_from_last = num_samples - samples_before_last
        separate_last_epoch = samples_from_last < int(SEPARATE_LAST_EPOCH_THRESHOLD * samples_per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_last_epoch)
    sample_index = build_sample_idx(sequence_lengths, document_index, seq_length, num_epochs, tokens_per_epoch)
    num_built = sample_index.shape[0] - 1
    first = samples_before_last if separate_last_epoch else num_built
    shuffle_index = build_shuffle_index(first, num_built, rng)
    return document_index, sample_index, shuffle_index


def sample_from_tokens(text: np.ndarray) -> dict:
    """text: [s+1] token ids -> the item dict (inputs, labels shifted by one, full loss mask)."""
    text = text.astype(np.int64)
    seq_length = len(text) - 1
    return {"tokens": text[:-1], "labels": text[1:], "loss_mask": np.ones(seq_length, dtype=np.float32),
            "position_ids": np.arange(seq_length, dtype=np.int64)}


class GPTDataset:
    """One split of one .bin/.idx dataset; ``len`` is the number of samples built (>= requested)."""

    def __init__(self, indexed: IndexedDataset, split_name: str, documents: np.ndarray, seq_length: int,
                 seed: int, num_samples: int, cache_dir: str | None = None):
        if len(documents) == 0 or int(np.sum(indexed.sequence_lengths[documents])) < 2:
            raise ValueError(f"the {split_name} split of {indexed.path_prefix} has no tokens "
                             f"({len(documents)} documents): give it a larger share in --split or more data")
        self.indexed, self.split_name, self.seq_length = indexed, split_name, seq_length
        self.description = settings = {"class": "GPTDataset", "prefix": indexed.path_prefix, "split": split_name,
                    "documents": [int(documents[0]), int(documents[-1]) + 1], "seq_length": seq_length,
                    "seed": seed, "num_samples": num_samples}
        arrays = cached_indices(cache_dir, settings, [indexed.path_prefix + ".idx"],
                                lambda: build_gpt_indices(indexed.sequence_lengths, documents, seq_length,
                                                          seed, num_samples),
                                ("document_index", "sample_index", "shuffle_index"))
        self.document_index, self.sample_index, self.shuffle_index = arrays

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of sample idx (after the shuffle)."""
        j = int(self.shuffle_index[idx])
        (doc_begin, offset_begin), (doc_end, offset_end) = self.sample_index[j], self.sample_index[j + 1]
        doc_begin, offset_begin, doc_end, offset_end = int(doc_begin), int(offset_begin), int(doc_end), int(offset_end)
        if doc_begin == doc_end:
            return self.indexed.get(int(self.document_index[doc_begin]), offset_begin, offset_end - offset_begin + 1)
        parts = [self.indexed.get(int(self.document_index[doc_begin]), offset_begin)]
        parts += [self.indexed.get(int(self.document_index[k])) for k in range(doc_begin + 1, doc_end)]
        parts.append(self.indexed.get(int(self.document_index[doc_end]), 0, offset_end + 1))
        return np.concatenate(parts)

    def __getitem__(self, idx: int) -> dict:
        return sample_from_tokens(self.sample_tokens(idx))


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], cache_dir: str | None = None, mmap_bin: bool = True):
    """(train, valid, test) GPT datasets, None for a split of zero width in ``split``.

    data_path: one prefix, several prefixes (blended in proportion to their sizes) or
    alternating weights and prefixes (``0.3 a 0.7 b``).  cache_dir: where the index arrays are
    kept as .npy files keyed by a hash of the settings (None: build in memory every time).
    """
    prefixes, weights = parse_blend(data_path)
    for prefix in prefixes:
        check_dataset_exists(prefix)
    bounds = parse_split(split)

    def one_dataset(prefix, samples_per_split):
        indexed = IndexedDataset(prefix, mmap_bin)
        built = []
        for name, bound, samples in zip(SPLIT_NAMES, bounds, samples_per_split):
            if bound is None:
                built.append(None)
                continue
            documents = split_document_range(bound, len(indexed))
            if len(documents) == 0 and samples == 0:
                built.append(None)  # a sliver too thin to hold a document, and nobody asks for it
                continue
            built.append(GPTDataset(indexed, name, documents, seq_length, seed, samples, cache_dir))
        return built

    if len(prefixes) == 1:
        return tuple(one_dataset(prefixes[0], num_samples))

    # Without weights each member is one epoch (0 samples asks for the minimum, one epoch) and the
    # blend follows the members' sizes, as in Megatron.
    per_dataset = samples_per_dataset(weights, num_samples) if weights else [(0, 0, 0)] * len(prefixes)
    splits_per_dataset = [one_dataset(p, n) for p, n in zip(prefixes, per_dataset)]
    result = []
    for i, name in enumerate(SPLIT_NAMES):
        if bounds[i] is None:
            result.append(None)
            continue
        members = [datasets[i] for datasets in splits_per_dataset]
        if weights:
            size = sum(n[i] for n in samples_per_dataset(weights, num_samples, surplus=0.0))
            result.append(BlendedDataset(members, weights, size, cache_dir))
        else:
            lengths = [len(d) for d in members]
            result.append(BlendedDataset(members, lengths, min(num_samples[i], sum(lengths)), cache_dir))
    return tuple(result)


class MockGPTDataset:
    """Synthetic samples that depend only on (seed, sample index), never on the parallel layout.

    Each sample is an arithmetic progression modulo the vocabulary with a random start and a
    random stride in [1, 8): after two tokens every next token is predictable, so a model's loss
    falls quickly and visibly.  Given an ``eod`` id, each sample also packs documents: the EOD
    token replaces the progression every 1 to s/2 tokens (data/packing.py).
    """

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int = 1234,
                 eod: int | None = None):
        if vocab_size < 2:
            raise ValueError(f"MockGPTDataset needs a vocabulary of at least 2 tokens, got {vocab_size}")
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed
        self.eod = eod

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"mock sample {idx} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, int(idx)])
        start = int(rng.integers(self.vocab_size))
        stride = int(rng.integers(1, 8))
        text = (start + stride * np.arange(self.seq_length + 1, dtype=np.int64)) % self.vocab_size
        if self.eod is not None:
            end = int(rng.integers(0, self.seq_length // 2 + 1))
            while end <= self.seq_length:
                text[end] = self.eod
                end += int(rng.integers(1, self.seq_length // 2 + 2))
        return sample_from_tokens(text)
