"""GPT sample streams: against a brute-force stream, against megatron-core, caching, mock data."""
import os

import numpy as np
import pytest

from megalite.data.blended import BlendedDataset
from megalite.data.gpt_dataset import MockGPTDataset, build_gpt_datasets, parse_split


def test_parse_split():
    bounds = parse_split("969,30,1")
    assert bounds[0] == (0.0, pytest.approx(0.969)) and bounds[2][1] == pytest.approx(1.0)
    assert parse_split("1,0,0")[1:] == [None, None]
    assert parse_split("98,2")[2] is None
    with pytest.raises(ValueError, match="--split"):
        parse_split("0,0,0")


def brute_force_sample(docs, dataset, idx):
    """The same sample from first principles: concatenate documents in the dataset's document
    order, take the window of the shuffled sample."""
    stream = np.concatenate([docs[d] for d in dataset.document_index])
    j = int(dataset.shuffle_index[idx])
    s = dataset.seq_length
    return stream[j * s: j * s + s + 1]


@pytest.mark.parametrize("split, seq_length, num_samples", [
    ("969,30,1", 16, (40, 5, 0)),      # under one epoch; the test sliver holds no document
    ("80,20,0", 32, (500, 30, 0)),     # several epochs, last one separate or not
    ("1,0,0", 7, (1001, 0, 0)),
])
def test_samples_equal_brute_force_windows(corpora, split, seq_length, num_samples):
    prefix, docs = corpora["a"]
    datasets = build_gpt_datasets([prefix], split, seq_length, 1234, num_samples)
    for dataset, wanted in zip(datasets, num_samples):
        if dataset is None:
            continue
        assert len(dataset) >= wanted
        for idx in range(0, len(dataset), max(1, len(dataset) // 25)):
            item = dataset[idx]
            text = brute_force_sample(docs, dataset, idx)
            np.testing.assert_array_equal(item["tokens"], text[:-1])
            np.testing.assert_array_equal(item["labels"], text[1:])
            assert item["tokens"].dtype == np.int64 and item["loss_mask"].dtype == np.float32
            np.testing.assert_array_equal(item["position_ids"], np.arange(seq_length))


def test_missing_prefix_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.bin and .*nothere\.idx"):
        build_gpt_datasets([str(tmp_path / "nothere")], "1,0,0", 8, 1, (10, 0, 0))


def test_empty_split_is_an_error_that_names_it(corpora):
    prefix, _ = corpora["b"]
    with pytest.raises(ValueError, match="test split .* no tokens"):
        build_gpt_datasets([prefix], "1000,0,1", 8, 1, (10, 0, 5))


def test_cache_builds_once_then_maps(corpora, tmp_path):
    prefix, _ = corpora["a"]
    cache = str(tmp_path / "cache")
    first = build_gpt_datasets([prefix], "90,10,0", 16, 7, (50, 5, 0), cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert sum(f.endswith("-description.json") for f in files) == 2  # train and valid
    second = build_gpt_datasets([prefix], "90,10,0", 16, 7, (50, 5, 0), cache_dir=cache)
    assert sorted(os.listdir(cache)) == files
    assert isinstance(second[0].shuffle_index, np.memmap)
    for a, b in zip(first[:2], second[:2]):
        np.testing.assert_array_equal(a.sample_index, b.sample_index)
        np.testing.assert_array_equal(a[3]["tokens"], b[3]["tokens"])
    build_gpt_datasets([prefix], "90,10,0", 16, 8, (50, 5, 0), cache_dir=cache)  # another seed
    assert len(os.listdir(cache)) > len(files)


def test_weighted_blend_follows_weights(corpora):
    (a, _), (b, _) = corpora["a"], corpora["b"]
    train, _, _ = build_gpt_datasets(["0.3", a, "0.7", b], "1,0,0", 8, 3, (200, 0, 0))
    assert isinstance(train, BlendedDataset) and len(train) == 200
    share_b = np.mean(np.asarray(train.dataset_index) == 1)
    assert abs(share_b - 0.7) < 0.01
    np.testing.assert_array_equal(train[5]["tokens"], train.datasets[int(train.dataset_index[5])][
        int(train.dataset_sample_index[5])]["tokens"])


def test_mock_data_depends_only_on_seed_and_index():
    a = MockGPTDataset(vocab_size=100, seq_length=12, num_samples=50, seed=5)
    b = MockGPTDataset(vocab_size=100, seq_length=12, num_samples=10, seed=5)
    np.testing.assert_array_equal(a[7]["tokens"], b[7]["tokens"])
    assert not np.array_equal(a[7]["tokens"], MockGPTDataset(100, 12, 50, seed=6)[7]["tokens"])
    item = a[3]
    np.testing.assert_array_equal(item["labels"][:-1], item["tokens"][1:])
    stride = (item["tokens"][1] - item["tokens"][0]) % 100
    np.testing.assert_array_equal(np.diff(item["tokens"]) % 100, stride)  # the learnable rule
    assert item["tokens"].max() < 100


def megatron_datasets(blend, split, seq_length, seed, sizes, cache):
    pytest.importorskip("megatron.core.datasets.gpt_dataset", reason="megatron-core not installed")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    class Tokenizer:  # the dataset reads only eod (and probes pad)
        eod = 0
        vocab_size = 1000
        unique_identifiers = {"class": "Tokenizer"}

    config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=get_blend_from_list(blend),
                              split=split, tokenizer=Tokenizer(), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, path_to_cache=cache)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, config).build()


@pytest.mark.parametrize("split, seq_length, seed, sizes", [
    ("90,8,2", 16, 1234, (40, 5, 2)),
    ("80,20,0", 32, 7, (500, 30, 0)),     # multi-epoch
    ("60,40", 5, 3, (150, 400, 0)),
])
def test_stream_equals_megatron_core(corpora, tmp_path, split, seq_length, seed, sizes):
    prefix, _ = corpora["a"]
    theirs = megatron_datasets([prefix], split, seq_length, seed, sizes, str(tmp_path / "mc"))
    ours = build_gpt_datasets([prefix], split, seq_length, seed, sizes)
    for mine, other in zip(ours, theirs):
        assert (mine is None) == (other is None)
        if mine is None:
            continue
        np.testing.assert_array_equal(mine.document_index, other.document_index)
        np.testing.assert_array_equal(mine.sample_index, other.sample_index)
        np.testing.assert_array_equal(mine.shuffle_index, other.shuffle_index)
        assert mine.sample_index.dtype == other.sample_index.dtype
        for idx in range(0, len(mine), max(1, len(mine) // 10)):
            np.testing.assert_array_equal(mine[idx]["tokens"], other[idx]["tokens"].numpy())
            np.testing.assert_array_equal(mine[idx]["labels"], other[idx]["labels"].numpy())


@pytest.mark.parametrize("weighted", [True, False])
def test_blend_equals_megatron_core(corpora, tmp_path, weighted):
    (a, _), (b, _) = corpora["a"], corpora["b"]
    blend = ["0.3", a, "0.7", b] if weighted else [a, b]
    # No cache folder: megatron-core's blend then skips its torch.distributed rank check.
    theirs = megatron_datasets(blend, "90,10,0", 8, 11, (300, 20, 0), None)
    ours = build_gpt_datasets(blend, "90,10,0", 8, 11, (300, 20, 0))
    for mine, other in zip(ours, theirs):
        if mine is None:
            assert other is None
            continue
        np.testing.assert_array_equal(mine.dataset_index, other.dataset_index)
        np.testing.assert_array_equal(mine.dataset_sample_index, other.dataset_sample_index)
        for idx in range(0, len(mine), 17):
            np.testing.assert_array_equal(mine[idx]["tokens"], other[idx]["tokens"].numpy())
