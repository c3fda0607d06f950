"""The data a training run reads: its tokenizer, train/valid datasets and per-rank micro-batches,
built from the run's configs (``config.DataConfig`` and friends)."""
from __future__ import annotations

import os
from typing import Dict, Optional, Protocol, Tuple

import numpy as np
import torch

from megalite.config.settings import DataConfig, ModelConfig, TrainingConfig
from megalite.data.gpt_dataset import MockGPTDataset, build_gpt_datasets, parse_blend
from megalite.data.index_cache import cached_indices
from megalite.data.indexed import IndexedDataset, bin_path_of, idx_path_of
from megalite.data.packing import Packing, check_documents_end_with_eod, packing_of
from megalite.data.sampler import PretrainingSampler
from megalite.data.tokenizer import Tokenizer, build_tokenizer
from megalite.parallel.context_parallel import split_for_context_parallel

__all__ = ["SampleDataset", "MicroBatches", "tokenizer_from_config", "datasets_from_config", "check_token_ids",
           "packing_from_config"]


class SampleDataset(Protocol):
    """GPT samples by index: tokens, labels, loss_mask, position_ids, each ``[s]`` (GPTDataset,
    BlendedDataset, MockGPTDataset)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]: ...


class MicroBatches:
    """This DP rank's micro-batches as dicts of tensors: tokens, labels, position_ids [b, s] int64,
    loss_mask [b, s] float32.  Resumable: starts after ``consumed_samples`` (global count).

    Under context parallelism (``cp_size`` > 1) every tensor holds only this CP rank's s/cp tokens
    (``split_for_context_parallel``: two chunks, with their true position ids).  With ``packing``
    (data/packing.py) positions and loss mask follow the documents, and ``documents`` (whole
    samples, not split) tells attention where they start.

    ``num_workers`` (--num-workers): 0 reads the samples in this process; N > 0 has a torch DataLoader's N
    worker processes read and stack them ahead of the step, in the same order."""

    def __init__(self, dataset: SampleDataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device: torch.device, cp_size: int = 1, cp_rank: int = 0, num_workers: int = 0,
                 packing: Optional[Packing] = None):
        self.dataset, self.device, self.packing = dataset, device, packing
        self.cp_size, self.cp_rank = cp_size, cp_rank
        sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
        if num_workers:
            # Its own generator: a DataLoader seeds its workers from torch's global one otherwise, which would
            # shift the training's dropout stream by the choice of --num-workers.
            self.batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                                            collate_fn=stack_samples, generator=torch.Generator()))
        else:
            self.batches = (stack_samples([dataset[i] for i in indices]) for indices in sampler)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        documents = None
        if self.packing is not None:
            batch = self.packing.apply(batch)
            documents = batch.pop("documents", None)
        local = {key: value.to(self.device) for key, value in
                 split_for_context_parallel(batch, self.cp_size, self.cp_rank).items()}
        if documents is not None:
            local["documents"] = documents
        return local


def packing_from_config(data: DataConfig, tokenizer: Optional[Tokenizer], vocab_size: int) -> Optional[Packing]:
    """The packed-document rules asked for, with the EOD token: the tokenizer's, or under --mock-data
    without a tokenizer the last id of the vocabulary (the mock data then packs documents)."""
    asked = [name for name in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss") if getattr(data, name)]
    if asked and tokenizer is None and not data.mock_data:
        raise ValueError(f"--{asked[0].replace('_', '-')} needs the end-of-document token, which comes from "
                         f"--tokenizer-type: give the tokenizer the data was made with")
    eod = tokenizer.eod if tokenizer is not None else vocab_size - 1
    return packing_of(data.reset_position_ids, data.reset_attention_mask, data.eod_mask_loss, eod)


def stack_samples(items) -> Dict[str, torch.Tensor]:
    """A micro-batch from samples: tokens, labels, loss_mask, position_ids each stacked to [b, s]."""
    return {key: torch.from_numpy(np.stack([item[key] for item in items]))
            for key in ("tokens", "labels", "loss_mask", "position_ids")}


def tokenizer_from_config(data: DataConfig, vocab_size: int) -> Optional[Tokenizer]:
    """The ``--tokenizer-type`` tokenizer with its files, or None when no type is given."""
    if data.tokenizer_type is None:
        return None
    return build_tokenizer(data.tokenizer_type, vocab_file=data.vocab_file, merge_file=data.merge_file,
                           tokenizer_model=data.tokenizer_model, vocab_size=vocab_size)


def datasets_from_config(data: DataConfig, model: ModelConfig, training: TrainingConfig,
                         packing: Optional[Packing] = None) -> Tuple[SampleDataset, Optional[SampleDataset]]:
    """(train, valid) datasets sized for the run; valid is None when the split gives it nothing.  With
    ``packing`` mock samples pack documents ended by its EOD, and real data must hold that EOD."""
    train_samples = training.train_iters * training.largest_global_batch_size()
    eval_samples = training.eval_iters * training.global_batch_size
    if data.mock_data:
        # The validation stream uses another seed, so evaluation never sees training samples.
        eod = packing.eod if packing is not None else None
        train = MockGPTDataset(model.vocab_size, model.seq_length, train_samples, model.seed, eod)
        valid = MockGPTDataset(model.vocab_size, model.seq_length, max(eval_samples, 1), model.seed + 1, eod)
        return train, valid
    prefixes = list(data.data_path)
    # As in Megatron: index arrays are cached next to the data unless --data-cache-path says where,
    # so one rank builds them and every other rank (and every later run) memory-maps them.
    cache_dir = data.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[-1])), "cache",
                                                     "GPTDataset_indices")
    train, valid, _ = build_gpt_datasets(prefixes, data.split, model.seq_length, model.seed,
                                         (train_samples, eval_samples, 0), cache_dir=cache_dir,
                                         mmap_bin=data.mmap_bin_files)
    check_token_ids(parse_blend(prefixes)[0], model.vocab_size, cache_dir, data.mmap_bin_files)
    if packing is not None and (packing.reset_attention_mask or packing.reset_position_ids):
        for prefix in parse_blend(prefixes)[0]:
            check_documents_end_with_eod(IndexedDataset(prefix, mmap_bin=data.mmap_bin_files), packing.eod,
                                         f"--data-path {prefix}")
    if train is None:
        raise ValueError(f"--split {data.split!r} leaves no training data; give the first part a positive weight")
    return train, valid


def check_token_ids(prefixes, vocab_size: int, cache_dir: Optional[str], mmap_bin: bool = True) -> None:
    """Refuse data holding ids the model has no row for (the embedding would read zeros and the loss a
    0 logit: a run that trains on garbage and exits 0).  Each dataset's largest id is found once and
    kept beside the index cache."""
    for prefix in prefixes:
        (largest,) = cached_indices(cache_dir, {"largest_token_id": prefix}, [bin_path_of(prefix), idx_path_of(prefix)],
                                    lambda p=prefix: (np.array([IndexedDataset(p, mmap_bin).largest_token_id()]),),
                                    ["largest_token_id"])
        if int(largest[0]) >= vocab_size:
            raise ValueError(f"--data-path {prefix} holds token id {int(largest[0])} but the vocabulary has "
                             f"{vocab_size} ids (--vocab-size or the tokenizer's); use the tokenizer the data was "
                             f"made with")
