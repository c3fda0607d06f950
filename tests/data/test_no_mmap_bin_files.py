"""--no-mmap-bin-files: the .bin read by seek and read, never memory-mapped, with the same tokens; and a run
trained from it equals one trained from the map."""
import numpy as np
import pytest

from megalite.data import indexed
from megalite.data.indexed import IndexedDataset
from megalite.parallel.testing import run_on_ranks
from megalite.training.arguments import parse_args
from tests.data.conftest import write_corpus


def _no_bin_maps(monkeypatch):
    real = np.memmap

    def memmap(path, *args, **kwargs):
        if str(path).endswith(".bin"):
            raise AssertionError(f"{path} was memory-mapped")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(indexed.np, "memmap", memmap)


def test_reads_the_same_tokens_without_mapping_the_bin(corpora, monkeypatch):
    prefix, docs = corpora["a"]
    mapped = IndexedDataset(prefix)
    _no_bin_maps(monkeypatch)
    with pytest.raises(AssertionError, match="was memory-mapped"):
        IndexedDataset(prefix)
    read = IndexedDataset(prefix, mmap_bin=False)
    assert len(read) == len(docs)
    for i, doc in enumerate(docs):
        assert np.array_equal(read[i], doc) and np.array_equal(read[i], mapped[i])
    assert np.array_equal(read.get(3, 1, 2), mapped.get(3, 1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(read[5:9], mapped[5:9]))
    assert read.largest_token_id() == mapped.largest_token_id() == max(int(d.max()) for d in docs)


def _losses(rank, world_size, argv, refuse_bin_maps):
    from megalite.training.loop import pretrain
    if refuse_bin_maps:   # this forked rank ends with the run, so the patch is never undone
        _no_bin_maps(pytest.MonkeyPatch())
    return [r["loss"] for r in pretrain(argv)]


def test_training_from_read_files_equals_training_from_maps(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_corpus(prefix, 60, seed=3, vocab=100)
    argv = ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--num-layers", "1",
            "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8", "--max-position-embeddings", "8",
            "--micro-batch-size", "2", "--train-iters", "3", "--eval-iters", "0", "--log-interval", "1000",
            "--data-cache-path", str(tmp_path / "cache")]
    assert parse_args(argv + ["--no-mmap-bin-files"], world_size=1)[3].mmap_bin_files is False
    mapped = run_on_ranks(_losses, 1, argv, False, timeout=120)[0]
    read = run_on_ranks(_losses, 1, argv + ["--no-mmap-bin-files"], True, timeout=120)[0]   # no .bin mapped
    with pytest.raises(Exception, match="was memory-mapped"):     # (the guard works: a mapping run trips it)
        run_on_ranks(_losses, 1, argv + ["--data-cache-path", str(tmp_path / "cache2")], True, timeout=120)
    assert read == mapped and len(read) == 3
