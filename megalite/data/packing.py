"""Packed documents in a sample: Megatron-LM's ``--reset-position-ids``, ``--reset-attention-mask``
and ``--eod-mask-loss``.

A GPT sample is a window over the concatenated token stream, so it packs the end of one document,
whole documents and the start of another, each ended by the end-of-document (EOD) token.  For
every EOD at input position ``i`` of a sample (Megatron's rules, applied to the inputs):

* ``reset_position_ids``: positions restart at 0 at ``i + 1``;
* ``reset_attention_mask``: tokens from ``i + 1`` on do not attend to tokens up to ``i`` (the EOD
  belongs to the document it ends); the model receives the document starts
  (megalite/parallel/documents.py) and never a dense mask;
* ``eod_mask_loss``: no loss at ``i`` (where the EOD is the input).

Everything here runs on the host, on whole samples, before the context-parallel split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from megalite.parallel.documents import Documents

__all__ = ["Packing", "packing_of", "check_documents_end_with_eod", "DOCUMENTS_CHECKED"]

DOCUMENTS_CHECKED = 64   # documents of a dataset looked at for an EOD before --reset-attention-mask trusts it


@dataclass(frozen=True)
class Packing:
    eod: int
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    def apply(self, batch: Dict[str, torch.Tensor]) -> Dict[str, object]:
        """tokens, labels, loss_mask, position_ids [b, s] -> the same with positions and loss mask
        changed as asked, plus ``documents`` (a Documents) with ``reset_attention_mask``."""
        tokens = batch["tokens"].numpy()
        batch = dict(batch)
        is_eod = tokens == self.eod
        if self.eod_mask_loss:
            batch["loss_mask"] = batch["loss_mask"].masked_fill(torch.from_numpy(is_eod), 0.0)
        starts = [[0] + [int(i) + 1 for i in np.flatnonzero(row[:-1])] for row in is_eod]
        if self.reset_position_ids:
            positions = np.arange(tokens.shape[1], dtype=np.int64)
            rows = []
            for row in starts:
                start_of = np.repeat(row, np.diff(row + [tokens.shape[1]]))
                rows.append(positions - start_of)
            batch["position_ids"] = torch.from_numpy(np.stack(rows))
        if self.reset_attention_mask:
            batch["documents"] = Documents.from_starts(starts, tokens.shape[1])
        return batch


def check_documents_end_with_eod(dataset, eod: int, name: str) -> None:
    """Refuse a dataset none of whose first documents ends with ``eod``: per-document masks would
    silently be the ordinary causal mask (data made without --append-eod, or another tokenizer)."""
    count = min(DOCUMENTS_CHECKED, len(dataset))
    if count and not any(len(doc) and int(doc[-1]) == eod for doc in (dataset.get(i) for i in range(count))):
        raise ValueError(f"--reset-attention-mask/--reset-position-ids: none of the first {count} documents of "
                         f"{name} ends with the end-of-document token {eod}; make the data with "
                         f"tools/preprocess_data.py --append-eod (and the same tokenizer), or drop the flags")


def packing_of(reset_position_ids: bool, reset_attention_mask: bool, eod_mask_loss: bool,
               eod: int) -> Optional[Packing]:
    if not (reset_position_ids or reset_attention_mask or eod_mask_loss):
        return None
    return Packing(eod, reset_position_ids, reset_attention_mask, eod_mask_loss)
