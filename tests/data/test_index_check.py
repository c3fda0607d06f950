"""Every field of an .idx is checked when the dataset is opened: a corrupt field anywhere (not only at
the last sequence) is refused in one line naming the file, the sequence or document, and the fix."""
import struct

import numpy as np
import pytest

from megalite.data.indexed import HEADER_BYTES, IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError

LENGTHS = [5, 3, 7, 2]


@pytest.fixture
def prefix(tmp_path):
    """Four one-sequence documents of uint16 tokens."""
    prefix = str(tmp_path / "ds")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16, native=False)
    for i, n in enumerate(LENGTHS):
        builder.add_item(np.arange(n) + 100 * i)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def patch(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def length_at(i):
    return HEADER_BYTES + 4 * i


def pointer_at(i):
    return HEADER_BYTES + 4 * len(LENGTHS) + 8 * i


def document_at(k):
    return HEADER_BYTES + 12 * len(LENGTHS) + 8 * k


def test_a_valid_dataset_opens(prefix):
    ds = IndexedDataset(prefix)
    assert [len(ds[i]) for i in range(len(ds))] == LENGTHS and ds[2][0] == 200


def refused(prefix):
    with pytest.raises(IndexedDatasetError) as error:
        IndexedDataset(prefix)
    message = str(error.value)
    assert "\n" not in message and "re-run megalite-preprocess" in message
    return message


def test_a_negative_length_in_the_middle(prefix):
    patch(prefix + ".idx", length_at(1), "<i", -3)
    assert refused(prefix).startswith(f"{prefix}.idx: sequence 1 has length -3;")


def test_a_length_past_the_file_in_the_middle(prefix):
    patch(prefix + ".idx", length_at(1), "<i", 10_000)
    assert refused(prefix).startswith(f"{prefix}.idx: sequence 2 points at byte 16 of the .bin, but the lengths "
                                      f"before it place it at byte 20010;")


def test_a_pointer_that_does_not_match_the_lengths(prefix):
    patch(prefix + ".idx", pointer_at(2), "<q", 4)
    assert refused(prefix).startswith(f"{prefix}.idx: sequence 2 points at byte 4 of the .bin, but the lengths "
                                      f"before it place it at byte 16;")


def test_a_dtype_code_that_disagrees_with_the_data(prefix):
    patch(prefix + ".idx", 17, "<B", 1)             # uint8, for uint16 tokens: every pointer is off
    assert "sequence 1 points at byte 10 of the .bin, but the lengths before it place it at byte 5" in refused(prefix)


def test_documents_that_go_back(prefix):
    patch(prefix + ".idx", document_at(2), "<q", 0)
    assert refused(prefix).startswith(f"{prefix}.idx: document 2 starts at sequence 0, before document 1 "
                                      f"(sequence 1);")


def test_a_bin_longer_than_its_index(prefix):
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    assert refused(prefix).startswith(f"{prefix}.bin: more data than its index describes, 36 bytes where "
                                      f"{prefix}.idx needs 34")


def test_a_truncated_bin(prefix):
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(30)
    assert refused(prefix).startswith(f"{prefix}.bin: truncated data, 30 bytes where {prefix}.idx needs 34")
