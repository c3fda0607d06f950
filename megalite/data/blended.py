"""A weighted mixture of datasets (``--data-path 0.3 a 0.7 b``), as Megatron-LM's BlendedDataset.

Sample i of the blend is sample ``dataset_sample_index[i]`` of dataset ``dataset_index[i]``; the
two arrays come from a greedy rule that keeps every dataset's share of the first i samples as
close as possible to its weight (``helpers.build_blending_indices``).
"""
from __future__ import annotations

import math

import numpy as np

from megalite.data.helpers import build_blending_indices, build_exhaustive_blending_indices
from megalite.data.index_cache import cached_indices

# Megatron builds each member 0.5% longer than its share so that the greedy blend never asks a
# member for a sample past its end.
MEMBER_SURPLUS = 0.005


def normalize(weights) -> list[float]:
    weights = np.array(weights, dtype=np.float64)
    return (weights / weights.sum()).tolist()


def samples_per_dataset(weights, samples_per_split, surplus: float = MEMBER_SURPLUS) -> list[list[int]]:
    """For each dataset, the samples to build per split: ceil(ceil(size * weight) * (1 + surplus))."""
    return [[int(math.ceil(math.ceil(size * w) * (1 + surplus))) for size in samples_per_split]
            for w in normalize(weights)]


class BlendedDataset:
    """datasets blended by weights to ``size`` samples; with ``size=None`` the weights must be
    integer sample counts and every member sample is used exactly once."""

    def __init__(self, datasets, weights, size: int | None, cache_dir: str | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"a blend needs one weight per dataset, got {len(weights)} weights for "
                             f"{len(datasets)} datasets")
        if any(w <= 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        self.datasets = datasets
        self.weights = normalize(weights) if size is not None else [int(w) for w in weights]
        self.size = size
        settings = {"class": "BlendedDataset", "weights": self.weights, "size": size,
                    "members": [getattr(d, "description", repr(type(d))) for d in datasets],
                    "member_lengths": [len(d) for d in datasets]}
        build = ((lambda: build_blending_indices(self.weights, size)) if size is not None
                 else (lambda: build_exhaustive_blending_indices(self.weights)))
        sources = sorted({d.indexed.path_prefix + ".idx" for d in datasets if hasattr(d, "indexed")})
        self.dataset_index, self.dataset_sample_index = cached_indices(
            cache_dir, settings, sources, build, ("dataset_index", "dataset_sample_index"))
        counts = np.bincount(np.asarray(self.dataset_index), minlength=len(datasets))
        for d, (count, dataset) in enumerate(zip(counts, datasets)):
            if count > len(dataset):
                raise IndexError(f"the blend asks dataset {d} for {count} samples but it has {len(dataset)}; "
                                 f"build it with more samples")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict:
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
