"""Attention with an explicit boolean mask: the fallback for attention dropout under context
parallelism or per-document masks, which the fused blocks of block_attention.py do not support.

K and V are all-gathered over the CP group (backward reduce-scatters their gradients), put back in
sequence order, and each local query chunk attends to the keys up to its end with the mask
``key <= query`` (and, with documents, ``same document``).  The masked kernel forms the score
matrix of each chunk, ``s/CP x s`` per head: this path is for short sequences only.
"""
from __future__ import annotations

from typing import Optional

import torch

from megalite.parallel.context_parallel import chunk_ids, cp_rank, cp_size, gather_from_cp, merge_sequence
from megalite.parallel.documents import Documents

__all__ = ["masked_attention", "document_index"]


def document_index(documents: Documents, device=None) -> torch.Tensor:
    """[b, s] int64: the index of the document each position belongs to."""
    positions = torch.arange(documents.seq_length, device=device)
    rows = [torch.bucketize(positions, torch.tensor(starts, device=device), right=True) - 1
            for starts in documents.starts]
    return torch.stack(rows)


def masked_attention(q, k, v, attend, documents: Optional[Documents]) -> torch.Tensor:
    """q: [b, a, s/CP, d], k and v: [b, g, s/CP, d] -> [b, a, s/CP, d]; ``attend(q, k, v, mask)``
    with mask [b or 1, 1, sq, sk] bool, True where the query may read the key."""
    size = cp_size()
    c = q.shape[2] // 2 if size > 1 else q.shape[2]
    if size > 1:
        kv = gather_from_cp(torch.stack([k, v]), dim=3)   # one collective for both, CP-rank order
        k, v = merge_sequence(kv.chunk(size, dim=3), dim=3).unbind(0)
    chunks = chunk_ids(size, cp_rank()) if size > 1 else (0,)
    doc = document_index(documents, q.device) if documents is not None else None
    outputs = []
    for slot, chunk in enumerate(chunks):
        # Queries of chunk i sit at positions i c .. i c + c - 1 and read keys 0 .. (i + 1) c - 1.
        keys = (chunk + 1) * c
        mask = torch.ones(c, keys, dtype=torch.bool, device=q.device).tril(diagonal=chunk * c)[None, None]
        if doc is not None:
            same = doc[:, chunk * c:(chunk + 1) * c, None] == doc[:, None, :keys]
            mask = mask & same[:, None]
        outputs.append(attend(q[:, :, slot * c:(slot + 1) * c], k[:, :, :keys], v[:, :, :keys], mask))
    return torch.cat(outputs, dim=2)
