"""Fuzz the .idx/.bin pair: byte mutations of headers and bodies, truncation and extension, then open
the dataset and read every sequence.  IndexedDatasetError (one line naming the file) or a dataset whose
structure is whole: a mutation inside token bytes, or one that keeps every field consistent, is
legitimately undetectable."""
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from megalite.data.indexed import HEADER_BYTES, IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from tests.fuzz.fuzzing import check_one_line, count, fuzz_settings, silent_accept, traceback_

SURFACE = "idx"
LENGTHS = [3, 0, 5, 1, 7, 2]
# The header's fields (offset, size): version, dtype code, sequence count, document count.
FIELDS = [(9, 8), (17, 1), (18, 8), (26, 8)]
INTERESTING = [0, 1, 2, 3, 5, 6, 7, 8, 9, 255, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 64 - 1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("idx") / "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i, n in enumerate(LENGTHS):
        builder.add_item(np.arange(n) + 10 * i)
        if i % 2:
            builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def _mutations():
    target = st.sampled_from(["idx", "bin"])
    flip = st.tuples(st.just("flip"), target, st.integers(0, 400), st.integers(1, 255))
    field = st.tuples(st.just("field"), st.just("idx"), st.sampled_from(FIELDS), st.sampled_from(INTERESTING))
    body = st.tuples(st.just("word"), st.just("idx"), st.integers(HEADER_BYTES, 200),
                     st.sampled_from([0, 1, 2, 3, 100, 2 ** 31 - 1, -1, -(2 ** 31), 2 ** 62]))
    truncate = st.tuples(st.just("truncate"), target, st.integers(0, 400), st.just(0))
    extend = st.tuples(st.just("extend"), target, st.binary(min_size=1, max_size=24), st.just(0))
    delete = st.tuples(st.just("delete"), target, st.just(0), st.just(0))
    return st.lists(st.one_of(flip, field, body, truncate, extend, delete), min_size=1, max_size=3)


def _apply(prefix, mutation):
    kind, which, where, value = mutation
    path = f"{prefix}.{which}"
    if not os.path.exists(path):
        return
    if kind == "delete":
        os.remove(path)
        return
    data = bytearray(open(path, "rb").read())
    if kind == "flip" and data:
        data[where % len(data)] ^= value
    elif kind == "field":
        offset, size = where
        data[offset:offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
    elif kind == "word" and len(data) >= where + 8:
        data[where:where + 8] = struct.pack("<q", value)
    elif kind == "truncate":
        del data[where:]
    elif kind == "extend":
        data += where
    open(path, "wb").write(bytes(data))


def _check_structure(ds, prefix):
    """What a dataset that opened must satisfy, whatever its token values."""
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    assert (lengths >= 0).all()
    assert int(lengths.sum()) * ds.dtype.itemsize == os.path.getsize(prefix + ".bin")
    docs = np.asarray(ds.document_indices)
    assert docs[0] == 0 and docs[-1] == len(ds) and (np.diff(docs) >= 0).all()
    for i in range(len(ds)):
        assert len(ds[i]) == lengths[i]
    assert sum(len(s) for s in ds[0:len(ds)]) == int(lengths.sum())


@fuzz_settings(500)
@given(mutations=_mutations())
def test_mutated_dataset_is_refused_in_one_line_or_whole(dataset, mutations):
    with tempfile.TemporaryDirectory() as folder:
        prefix = os.path.join(folder, "data")
        for suffix in (".idx", ".bin"):
            shutil.copy(dataset + suffix, prefix + suffix)
        for mutation in mutations:
            _apply(prefix, mutation)
        try:
            ds = IndexedDataset(prefix)
            ds.largest_token_id()
        except (IndexedDatasetError, FileNotFoundError) as error:
            check_one_line(SURFACE, str(error), prefix + ".idx", prefix + ".bin", repr(prefix))
            return
        except Exception as error:  # noqa: BLE001 - anything else would reach the user as a traceback
            raise traceback_(SURFACE, error) from error
        try:
            _check_structure(ds, prefix)
        except AssertionError as error:
            raise silent_accept(SURFACE, f"{mutations} opened with a broken structure") from error
        count(SURFACE, "accepted")
