"""Packed documents: where each sample's documents start, and the attention blocks they allow.

With ``--reset-attention-mask`` a sample of ``s`` tokens that packs several documents attends only
within each document: the token after an end-of-document (EOD) token starts a new document, and
the EOD token belongs to the document it ends (Megatron-LM's rule).  :class:`Documents` holds the
start positions per sample, computed on the host from the tokens (megalite/data/packing.py), so
planning the blocks needs no device synchronization.

:func:`span_pairs` turns "queries at positions ``[q, q + n)`` against keys at ``[k, k + n)``" into
the fused-kernel blocks of megalite/parallel/block_attention.py: one block when there are no
documents, otherwise one per document that both ranges touch, each full (keys all earlier) or
causal (the same positions).  Nothing of size ``s x s`` is built.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megalite.parallel.block_attention import Pair

__all__ = ["Documents", "span_pairs"]


@dataclass(frozen=True)
class Documents:
    """``starts[i]``: the ascending start positions of sample i's documents (the first is 0), in the
    whole sequence of ``seq_length`` tokens (also under context parallelism)."""

    starts: Tuple[Tuple[int, ...], ...]
    seq_length: int

    @classmethod
    def from_starts(cls, starts: Sequence[Sequence[int]], seq_length: int) -> "Documents":
        checked = []
        for sample, row in enumerate(starts):
            row = tuple(int(x) for x in row)
            if not row or row[0] != 0 or any(b <= a for a, b in zip(row, row[1:])) or row[-1] >= seq_length:
                raise ValueError(f"sample {sample}: document starts {row} must begin at 0 and ascend "
                                 f"strictly below the sequence length {seq_length}")
            checked.append(row)
        return cls(tuple(checked), int(seq_length))

    def __len__(self) -> int:
        return len(self.starts)

    def spans(self, sample: int, begin: int, end: int) -> Dict[int, Tuple[int, int]]:
        """{document index: its part ``[a, b)`` of ``[begin, end)``} for each document it touches."""
        starts = self.starts[sample]
        parts = {}
        for index in range(bisect_right(starts, begin) - 1, len(starts)):
            doc_begin = starts[index]
            if doc_begin >= end:
                break
            doc_end = starts[index + 1] if index + 1 < len(starts) else self.seq_length
            parts[index] = (max(doc_begin, begin), min(doc_end, end))
        return parts


def span_pairs(q_pos: int, q_row: int, k_pos: int, k_row: int, n: int,
               documents: Optional[Documents]) -> List[Pair]:
    """Blocks joining the queries at positions ``[q_pos, q_pos + n)`` (tensor rows from ``q_row``)
    with the keys at ``[k_pos, k_pos + n)`` (rows from ``k_row``) under the causal mask; the two
    ranges are either equal or disjoint (whole context-parallel chunks, or a whole sequence)."""
    if k_pos > q_pos:
        return []
    causal = k_pos == q_pos
    if documents is None:
        return [Pair(slice(None), slice(q_row, q_row + n), slice(k_row, k_row + n), causal)]
    pairs = []
    for sample in range(len(documents)):
        keys = documents.spans(sample, k_pos, k_pos + n)
        for document, (qa, qb) in documents.spans(sample, q_pos, q_pos + n).items():
            if document in keys:
                ka, kb = keys[document]
                pairs.append(Pair(slice(sample, sample + 1), slice(q_row + qa - q_pos, q_row + qb - q_pos),
                                  slice(k_row + ka - k_pos, k_row + kb - k_pos), causal))
    return pairs
