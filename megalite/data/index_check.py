"""Validation of an opened ``.idx`` against its ``.bin`` (the format is in indexed.py's docstring).

Every field is checked once, when a dataset is opened, in O(sequences) vectorized numpy: lengths are
not negative, each pointer is the running sum of the lengths before it times the token size, the
document indices run from 0 to the sequence count without going back, and the ``.bin`` holds exactly
the bytes the lengths add up to (a dtype code that disagrees with the data, uint8 for uint16 say,
shows here as a ``.bin`` of the wrong size).  Each failure is one line naming the file, the
sequence or document and the fix.  indexed.py runs it once per version of a file per process (0.6 s
for 10 M sequences on a 2-core VM).
"""
from __future__ import annotations

import numpy as np

__all__ = ["check_index"]

_FIX = "the index is corrupt or belongs to another .bin; re-run megalite-preprocess for this prefix"


def check_index(idx_path: str, bin_path: str, itemsize: int, lengths: np.ndarray, pointers: np.ndarray,
                document_indices: np.ndarray, bin_bytes: int) -> None:
    """Raise ValueError (one line) at the first field that disagrees with the format or the .bin."""
    n = len(lengths)
    negative = np.flatnonzero(lengths < 0)
    if negative.size:
        i = int(negative[0])
        raise ValueError(f"{idx_path}: sequence {i} has length {int(lengths[i])}; {_FIX}")
    ends = np.cumsum(lengths, dtype=np.int64) * itemsize
    expected = np.concatenate([np.zeros(min(n, 1), np.int64), ends[:-1]])
    wrong = np.flatnonzero(pointers != expected)
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(f"{idx_path}: sequence {i} points at byte {int(pointers[i])} of the .bin, but the lengths "
                         f"before it place it at byte {int(expected[i])}; {_FIX}")
    _check_documents(idx_path, n, document_indices)
    needed = int(ends[-1]) if n else 0
    if bin_bytes != needed:
        what = "truncated data" if bin_bytes < needed else "more data than its index describes"
        raise ValueError(f"{bin_path}: {what}, {bin_bytes} bytes where {idx_path} needs {needed} "
                         f"({n} sequences of {itemsize}-byte tokens); {_FIX}")


def _check_documents(idx_path: str, n: int, document_indices: np.ndarray) -> None:
    d = len(document_indices)
    if d == 0 or document_indices[0] != 0 or document_indices[-1] != n:
        first = document_indices[:1].tolist()
        last = document_indices[-1:].tolist()
        raise ValueError(f"{idx_path}: corrupt document indices (they must run from 0 to the sequence count {n}, "
                         f"got {first}..{last}); {_FIX}")
    back = np.flatnonzero(np.diff(document_indices) < 0)
    if back.size:
        k = int(back[0])
        raise ValueError(f"{idx_path}: document {k + 1} starts at sequence {int(document_indices[k + 1])}, before "
                         f"document {k} (sequence {int(document_indices[k])}); {_FIX}")
