"""Rank-aware printing, the leaf every level may use: Python's ``logging`` (logger ``megalite``) with
one line per message; rank 0 speaks for the run, and a message only one rank knows is prefixed
``[rank N]``.
"""
from __future__ import annotations

import logging
import sys

import torch.distributed as dist

__all__ = ["log", "print_rank0", "print_rank"]


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a message comes (a test's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


log = logging.getLogger("megalite")
if not log.handlers:  # the run's own stream: one line per message, no logging prefixes
    _handler = _StdoutHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print_rank0(message: str) -> None:
    """A message about the whole run, said once (by global rank 0)."""
    if _rank() == 0:
        log.info(message)
        _flush()


def print_rank(message: str) -> None:
    """A message only this rank knows, prefixed with its rank."""
    log.info(f"[rank {_rank()}] {message}")
    _flush()


def _flush() -> None:
    for handler in log.handlers:
        handler.flush()
