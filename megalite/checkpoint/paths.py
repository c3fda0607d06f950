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
    """The iteration in ``latest_checkpointed_iteration.txt``, or None when there is no checkpoint.  The
    file holds ASCII digits; anything else (other bytes, other scripts' digits, a folder) is one line
    naming it."""
    path = os.path.join(root, TRACKER_FILE)
    fix = "write the number of the iteration to resume, or delete it to resume from the newest complete one"
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not the file naming the latest iteration; {fix}")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{path} should hold an iteration number, found {text[:32]!r}; {fix}")
    return int(text)
