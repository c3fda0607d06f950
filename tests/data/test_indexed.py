"""The .bin/.idx writer and reader: exact bytes, round trips, both builders, corrupt files."""
import os
import pickle
import struct

import numpy as np
import pytest

from megalite.data.indexed import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_token_dtype,
    native_data_module,
)

NATIVE = [False] + ([True] if native_data_module() is not None else [])


def write(prefix, docs, dtype=np.uint16, native=False):
    """docs: list of documents, each a list of sequences."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype, native=native)
    for doc in docs:
        for seq in doc:
            builder.add_item(seq)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize("native", NATIVE)
def test_exact_bytes_of_a_hand_checked_case(tmp_path, native):
    prefix = str(tmp_path / "tiny")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16, native=native)
    builder.add_item([1, 2, 3])
    builder.end_document()
    builder.add_document(np.array([7, 65535]), [1, 1])  # one document of two sequences
    builder.finalize(prefix + ".idx")

    expected_bin = struct.pack("<5H", 1, 2, 3, 7, 65535)
    expected_idx = (b"MMIDIDX\x00\x00"
                    + struct.pack("<Q", 1)            # version
                    + struct.pack("<B", 8)            # dtype code 8 = uint16
                    + struct.pack("<Q", 3)            # sequences
                    + struct.pack("<Q", 3)            # document boundaries (2 documents + 1)
                    + struct.pack("<3i", 3, 1, 1)     # sequence lengths
                    + struct.pack("<3q", 0, 6, 8)     # byte pointers
                    + struct.pack("<3q", 0, 1, 3))    # document indices
    assert open(prefix + ".bin", "rb").read() == expected_bin
    assert open(prefix + ".idx", "rb").read() == expected_idx


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_round_trip(tmp_path, native, dtype):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 60000, rng.integers(0, 50)) for _ in range(rng.integers(1, 3))] for _ in range(40)]
    prefix = write(str(tmp_path / "data"), docs, dtype, native)
    ds = IndexedDataset(prefix)
    flat = [seq for doc in docs for seq in doc]
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(flat) and ds.num_documents == len(docs)
    for i, seq in enumerate(flat):
        np.testing.assert_array_equal(ds[i], seq)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(s) for s in flat])
    np.testing.assert_array_equal(ds.document_indices, np.cumsum([0] + [len(d) for d in docs]))
    for got, want in zip(ds[3:9], flat[3:9]):
        np.testing.assert_array_equal(got, want)
    long = max(range(len(flat)), key=lambda i: len(flat[i]))
    np.testing.assert_array_equal(ds.get(long, 2, 5), flat[long][2:7])
    np.testing.assert_array_equal(ds.get(long, 4), flat[long][4:])
    again = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 200  # the prefix, not the data
    np.testing.assert_array_equal(again[long], flat[long])


def test_native_and_python_builders_write_identical_files(tmp_path):
    if len(NATIVE) < 2:
        pytest.skip("megalite._data is not built")
    rng = np.random.default_rng(1)
    docs = [[rng.integers(0, 50000, rng.integers(0, 300))] for _ in range(200)]
    a = write(str(tmp_path / "py"), docs, native=False)
    b = write(str(tmp_path / "cc"), docs, native=True)
    for ext in (".bin", ".idx"):
        assert open(a + ext, "rb").read() == open(b + ext, "rb").read()


@pytest.mark.parametrize("native", NATIVE)
def test_add_index_merges_shards(tmp_path, native):
    rng = np.random.default_rng(2)
    shards = [[[rng.integers(0, 100, rng.integers(1, 20))] for _ in range(n)] for n in (5, 0, 7)]
    prefixes = [write(str(tmp_path / f"shard{i}"), docs) for i, docs in enumerate(shards)]
    merged = IndexedDatasetBuilder(str(tmp_path / "merged.bin"), np.uint16, native=native)
    for prefix in prefixes:
        merged.add_index(prefix)
    merged.finalize(str(tmp_path / "merged.idx"))
    whole = write(str(tmp_path / "whole"), [d for docs in shards for d in docs])
    for ext in (".bin", ".idx"):
        assert open(str(tmp_path / "merged") + ext, "rb").read() == open(whole + ext, "rb").read()


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("source", [np.int64, np.int32, np.uint32, np.int8, np.uint16])
def test_any_integer_input_dtype_writes_the_same_bytes(tmp_path, native, source):
    """Tokens arrive as int64 from tokenizers, int32 from numpy code...: converted while copied."""
    docs = [np.array([0, 5, 127], dtype=source), np.array([3, 1], dtype=source)]
    expected = np.concatenate(docs).astype(np.uint16).tobytes()
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16, native=native)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "d.idx"))
    assert open(tmp_path / "d.bin", "rb").read() == expected
    assert list(IndexedDataset(str(tmp_path / "d")).sequence_lengths) == [3, 2]


@pytest.mark.parametrize("native", NATIVE)
def test_builders_refuse_ids_the_dtype_cannot_hold(tmp_path, native):
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16, native=native)
    with pytest.raises(ValueError, match="token id 70000 does not fit"):
        builder.add_document(np.array([1, 70000], dtype=np.int64), [2])
    with pytest.raises(ValueError, match="token id -1 does not fit"):
        builder.add_item(np.array([-1, 3], dtype=np.int32))
    with pytest.raises(ValueError, match="lengths sum to 3 but the document has 2 tokens"):
        builder.add_document(np.array([1, 2]), [1, 2])


def test_add_index_refuses_a_shard_of_another_dtype(tmp_path):
    prefix = write(str(tmp_path / "wide"), [[[1, 2]]], dtype=np.int32)
    builder = IndexedDatasetBuilder(str(tmp_path / "out.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="wide.idx.*int32.*uint16"):
        builder.add_index(prefix)


def test_token_dtype_threshold():
    assert best_token_dtype(50257) == np.uint16 and best_token_dtype(65500) == np.int32


def corrupt(tmp_path, edit_idx=None, cut_bin=0):
    prefix = write(str(tmp_path / "c"), [[[1, 2, 3]], [[4, 5]]])
    if edit_idx:
        data = bytearray(open(prefix + ".idx", "rb").read())
        data = edit_idx(data)
        open(prefix + ".idx", "wb").write(bytes(data))
    if cut_bin:
        data = open(prefix + ".bin", "rb").read()
        open(prefix + ".bin", "wb").write(data[:-cut_bin])
    return prefix


@pytest.mark.parametrize("edit, message", [
    (lambda d: b"NOTANIDX!" + d[9:], "bad magic"),
    (lambda d: d[:9] + struct.pack("<Q", 2) + d[17:], "version 2"),
    (lambda d: d[:17] + bytes([9]) + d[18:], "unknown dtype code 9"),
    (lambda d: d[:20], "truncated header"),
    (lambda d: d[:-5], "truncated index"),
    (lambda d: d[:-8] + struct.pack("<q", 7), "corrupt document indices"),
])
def test_corrupt_index_is_refused_naming_the_file(tmp_path, edit, message):
    prefix = corrupt(tmp_path, edit_idx=edit)
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(prefix)
    assert "c.idx" in str(info.value)


def test_short_bin_is_refused(tmp_path):
    prefix = corrupt(tmp_path, cut_bin=1)
    with pytest.raises(IndexedDatasetError, match=r"c\.bin: truncated data, 9 bytes .* needs 10"):
        IndexedDataset(prefix)


def test_missing_files_name_the_missing_one(tmp_path):
    prefix = write(str(tmp_path / "m"), [[[1]]])
    os.remove(prefix + ".idx")
    with pytest.raises(FileNotFoundError, match=r"m\.idx") as info:
        IndexedDataset(prefix)
    assert "m.bin" not in str(info.value)


def test_megatron_core_reads_ours_and_writes_the_same_bytes(tmp_path):
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset", reason="megatron-core not installed")
    import torch
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 50000, rng.integers(1, 100)) for _ in range(30)]
    ours = write(str(tmp_path / "ours"), [[d] for d in docs], native=None)
    theirs = str(tmp_path / "theirs")
    builder = mc.IndexedDatasetBuilder(theirs + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    builder.finalize(theirs + ".idx")
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(theirs + ext, "rb").read()
    their_reader, our_reader = mc.IndexedDataset(ours), IndexedDataset(theirs)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(their_reader[i], d)
        np.testing.assert_array_equal(our_reader[i], d)
