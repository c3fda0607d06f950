"""Where a checkpoint's files lie: Megatron-LM's folder layout (save_load.py's docstring draws it)."""
from __future__ import annotations

import os
from typing import Optional

__all__ = ["TRACKER_FILE", "TENSOR_INDEX", "iteration_dir", "rank_dir", "read_latest_iteration"]

TRACKER_FILE = "latest_checkpointed_iteration.txt"
TENSOR_INDEX = "tensor_index.pt"


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_dir(root: str, iteration: int, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(iteration_dir(root, iteration), f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")


def read_latest_iteration(root: str) -> Optional[int]:
    """The iteration in ``latest_checkpointed_iteration.txt``, or None when there is no checkpoint."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path} should hold an iteration number, found {text!r}")
    return int(text)
