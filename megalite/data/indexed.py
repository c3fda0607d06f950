"""Token datasets on disk: Megatron-LM's ``.bin``/``.idx`` pair (MMIDIDX, version 1).

A dataset is a list of *sequences* (token arrays) grouped into *documents*.  For GPT data every
document holds exactly one sequence.  The two files, byte-compatible with Megatron-LM:

``<prefix>.bin``  the tokens of every sequence, back to back, in the token dtype (no header).

``<prefix>.idx``  all little-endian::

    offset  size   field
    0       9      magic  b"MMIDIDX\\x00\\x00"
    9       8      version, <Q, always 1
    17      1      dtype code, <B  (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                    7 float32, 8 uint16)
    18      8      sequence count N, <Q
    26      8      document count D, <Q  (number of documents + 1: the boundaries include 0)
    34      4N     sequence lengths, int32, in tokens
    34+4N   8N     sequence pointers, int64, byte offset of each sequence in the .bin
    34+12N  8D     document indices, int64: document k is sequences [doc[k], doc[k+1])

Writing goes through ``IndexedDatasetBuilder``; the native builder in ``megalite._data`` (C++) is
used when it was compiled and writes the same bytes as the pure-Python one here.
"""
from __future__ import annotations

import os
import shutil
import struct
from array import array

import numpy as np

from megalite.data.index_check import check_index

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8

# Megatron-LM's DType enum (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


# (path, mtime, size, .bin size, .bin mtime) of each .idx this process has validated.
_VALIDATED: set = set()


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that cannot be read; the message names the file and the problem."""


def idx_path_of(prefix: str) -> str:
    return prefix + ".idx"


def bin_path_of(prefix: str) -> str:
    return prefix + ".bin"


def best_token_dtype(vocab_size: int | None):
    """uint16 when every id fits below 65500 (Megatron's threshold), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype not in CODE_OF_DTYPE:
        raise ValueError(f"token dtype {dtype} has no MMIDIDX code; use one of "
                         f"{sorted(str(np.dtype(t)) for t in DTYPE_CODES.values())}")
    return CODE_OF_DTYPE[dtype]


def check_dataset_exists(prefix: str) -> None:
    """Raise FileNotFoundError naming whichever of <prefix>.bin / <prefix>.idx is missing."""
    missing = [p for p in (bin_path_of(prefix), idx_path_of(prefix)) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"dataset prefix {prefix!r}: missing {' and '.join(missing)} "
                                f"(make it with megalite-preprocess --output-prefix {prefix})")


class IndexHeader:
    """The parsed and validated header of an .idx file (see the module docstring)."""

    def __init__(self, idx_path: str):
        self.path = idx_path
        file_bytes = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_BYTES)
        if head[:9] != MAGIC[:len(head[:9])]:
            raise IndexedDatasetError(f"{idx_path}: bad magic {head[:9]!r}, expected {MAGIC!r}: "
                                      f"not a Megatron MMIDIDX index file")
        if len(head) < HEADER_BYTES:
            raise IndexedDatasetError(f"{idx_path}: truncated header ({len(head)} of {HEADER_BYTES} "
                                      f"bytes); re-run preprocessing")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: index version {version}, only version {VERSION} "
                                      f"is supported")
        code = head[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}, expected one of "
                                      f"{sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.sequence_count, self.document_count = struct.unpack("<QQ", head[18:34])
        expected = HEADER_BYTES + 12 * self.sequence_count + 8 * self.document_count
        if file_bytes < expected:
            raise IndexedDatasetError(
                f"{idx_path}: truncated index, {file_bytes} bytes but the header announces "
                f"{self.sequence_count} sequences and {self.document_count} document boundaries "
                f"({expected} bytes); re-run preprocessing")


class IndexedDataset:
    """Memory-mapped reader of a ``<prefix>.bin``/``<prefix>.idx`` pair.

    ``ds[i]`` -> tokens of sequence i (a read-only view into the .bin), ``ds[a:b]`` -> list of
    them, ``ds.get(i, offset, length)`` -> a slice of one sequence.  Pickles as its prefix only,
    so DataLoader workers reopen the maps instead of copying them.

    ``mmap_bin=False`` (Megatron's --no-mmap-bin-files): the .bin is not mapped; each read is a seek and
    a read of the bytes it needs (for file systems where mapping large files is slow or unsupported).
    """

    def __init__(self, path_prefix: str, mmap_bin: bool = True):
        self.path_prefix, self.mmap_bin = path_prefix, mmap_bin
        check_dataset_exists(path_prefix)
        idx_path, bin_path = idx_path_of(path_prefix), bin_path_of(path_prefix)
        header = IndexHeader(idx_path)
        self.dtype = header.dtype
        n, d = header.sequence_count, header.document_count
        self._idx_map = np.memmap(idx_path, mode="r", dtype=np.uint8)
        buf = self._idx_map
        self.sequence_lengths = np.frombuffer(buf, np.int32, n, HEADER_BYTES)
        self.sequence_pointers = np.frombuffer(buf, np.int64, n, HEADER_BYTES + 4 * n)
        self.document_indices = np.frombuffer(buf, np.int64, d, HEADER_BYTES + 12 * n)
        bin_bytes = os.path.getsize(bin_path)
        stamp = (os.path.abspath(idx_path), os.stat(idx_path).st_mtime_ns, os.path.getsize(idx_path), bin_bytes,
                 os.stat(bin_path).st_mtime_ns)
        if stamp not in _VALIDATED:     # once per file version per process (forked workers inherit it)
            try:
                check_index(idx_path, bin_path, self.dtype.itemsize, self.sequence_lengths, self.sequence_pointers,
                            self.document_indices, bin_bytes)
            except ValueError as error:
                raise IndexedDatasetError(str(error)) from None
            _VALIDATED.add(stamp)
        # np.memmap refuses empty files; an empty dataset has nothing to map.
        self._bin_path, self._bin_bytes = bin_path, bin_bytes
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_bytes and mmap_bin else np.zeros(0, np.uint8)

    def __getstate__(self):
        return self.path_prefix, self.mmap_bin

    def __setstate__(self, state):
        self.__init__(*state)

    def _tokens(self, count: int, byte_offset: int) -> np.ndarray:
        """``count`` tokens from ``byte_offset`` of the .bin: a view of the map, or read from the file."""
        if self.mmap_bin:
            return np.frombuffer(self._bin, self.dtype, count, byte_offset)
        with open(self._bin_path, "rb") as f:
            f.seek(byte_offset)
            return np.frombuffer(f.read(count * self.dtype.itemsize), self.dtype, count)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def largest_token_id(self) -> int:
        """The largest id in the .bin (-1 when empty), read in 64 MiB slices of the memory map."""
        total, step = self._bin_bytes // self.dtype.itemsize, (64 << 20) // self.dtype.itemsize
        return max((int(self._tokens(min(step, total - i), i * self.dtype.itemsize).max())
                    for i in range(0, total, step)), default=-1)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence idx (to its end when length is None)."""
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return self._tokens(length, start)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError(f"slices of an IndexedDataset must be contiguous, got step {step}")
            if start >= stop:
                return []
            lengths = self.sequence_lengths[start:stop]
            flat = self._tokens(int(lengths.sum()), int(self.sequence_pointers[start]))
            return np.split(flat, np.cumsum(lengths)[:-1])
        if isinstance(idx, (int, np.integer)):
            if idx < 0:
                idx += len(self)
            if not 0 <= idx < len(self):
                raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.path_prefix}")
            return self.get(idx)
        raise TypeError(f"an IndexedDataset is indexed by int or slice, got {type(idx).__name__}")


def write_index(idx_path: str, dtype, sequence_lengths, document_indices) -> None:
    """Write an .idx file (pointers are derived from the lengths)."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QB", VERSION, dtype_code(dtype)))
        f.write(struct.pack("<QQ", len(lengths), len(document_indices)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes())


def native_data_module():
    """``megalite._data`` (the C++ builder, index helpers and BPE), or None when it is not built or
    ``MEGALITE_DATA_NATIVE=0`` asks for the Python implementations."""
    if os.environ.get("MEGALITE_DATA_NATIVE", "1") == "0":
        return None
    try:
        from megalite import _data
    except ImportError:
        return None
    return _data


class PythonIndexedDatasetBuilder:
    """The reference builder: numpy + the array module, one buffered file."""

    def __init__(self, bin_path: str, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        self._bin = open(bin_path, "wb", buffering=1 << 22)
        self._lengths = array("i")
        self._document_indices = array("q", [0])

    def add_item(self, tokens) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(tokens.tobytes())
        self._lengths.append(tokens.size)

    def end_document(self) -> None:
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens, lengths) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(tokens.tobytes())
        self._lengths.frombytes(np.asarray(lengths, np.int32).tobytes())
        self._document_indices.append(len(self._lengths))

    def add_index(self, bin_path: str, lengths, document_indices) -> None:
        offset = len(self._lengths)
        self._lengths.frombytes(np.asarray(lengths, np.int32).tobytes())
        self._document_indices.frombytes((np.asarray(document_indices[1:], np.int64) + offset).tobytes())
        self._bin.flush()
        with open(bin_path, "rb") as src:
            shutil.copyfileobj(src, self._bin, 1 << 22)

    def finalize(self, idx_path: str) -> None:
        self._bin.close()
        write_index(idx_path, self.dtype, np.frombuffer(self._lengths, np.int32),
                    np.frombuffer(self._document_indices, np.int64))


class IndexedDatasetBuilder:
    """Writes ``<prefix>.bin`` while collecting the index, then ``finalize(idx_path)`` writes the .idx.

    ``add_item(tokens)`` appends one sequence; ``end_document()`` closes the current document;
    ``add_document(tokens, lengths)`` appends a whole document whose sequences have ``lengths``;
    ``add_index(prefix)`` appends a finished dataset (its bytes are copied, its index offset).
    Uses the C++ builder when ``megalite._data`` is built (``native=False`` forces Python).
    """

    def __init__(self, bin_path: str, dtype=np.int32, native: bool | None = None):
        self.dtype = np.dtype(dtype)
        self.bin_path = bin_path
        module = native_data_module() if native in (None, True) else None
        if native and module is None:
            raise RuntimeError("the native data builder megalite._data is not built; run "
                               "`python setup.py build_ext --inplace`")
        if module is not None:
            self._impl = module.IndexedDatasetBuilder(bin_path, dtype_code(self.dtype), self.dtype.itemsize)
        else:
            self._impl = PythonIndexedDatasetBuilder(bin_path, self.dtype)
        self.native = module is not None

    def _tokens(self, tokens) -> np.ndarray:
        # The native builder converts any integer array to the dataset's dtype while copying (and
        # refuses ids the dtype cannot hold); only lists and strided views need numpy first.
        if self.native:
            if isinstance(tokens, np.ndarray) and tokens.flags.c_contiguous and tokens.dtype.kind in "iu":
                return tokens
            return np.ascontiguousarray(tokens, dtype=np.int64)
        tokens = np.asarray(tokens)
        if tokens.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"token id {lo if lo < info.min else hi} does not fit the dataset's dtype "
                                 f"{self.dtype}; use a wider dtype / a vocabulary that fits")
        return np.ascontiguousarray(tokens, dtype=self.dtype)

    def add_item(self, tokens) -> None:
        self._impl.add_item(self._tokens(tokens))

    def end_document(self) -> None:
        self._impl.end_document()

    def add_document(self, tokens, lengths) -> None:
        tokens = self._tokens(tokens)
        if self.native:   # checks that the lengths sum to the token count
            self._impl.add_document(tokens, lengths)
            return
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"add_document: the lengths sum to {int(lengths.sum())} but the document "
                             f"has {tokens.size} tokens")
        self._impl.add_document(tokens, lengths)

    def add_index(self, prefix: str) -> None:
        check_dataset_exists(prefix)
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(f"{idx_path_of(prefix)}: token dtype {other.dtype} does not match "
                                      f"this builder's {self.dtype}; shards to merge must share a "
                                      f"tokenizer / dtype")
        lengths = np.ascontiguousarray(other.sequence_lengths)
        documents = np.ascontiguousarray(other.document_indices)
        del other  # close the maps before copying the .bin
        self._impl.add_index(bin_path_of(prefix), lengths, documents)

    def finalize(self, idx_path: str) -> None:
        self._impl.finalize(idx_path)
