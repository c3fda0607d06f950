"""The one way megalite reads a checkpoint: an iteration is chosen, its manifest is required, and every
file is checked against the manifest (size, CRC-32) before it is read, by training's loaders (each
rank its own files: save_load.verify_everywhere), generation, conversion and --use-checkpoint-args
(one process: :class:`CheckpointReader`).

An iteration without its manifest is incomplete, whatever else it holds: its save was cut short, or
the manifest was removed, and nothing in it can be verified.  A tracker pointing at one falls back to
the newest complete iteration, as a missing tracker does, and says so.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Optional

import torch

from megalite.checkpoint.manifest import MANIFEST, CheckpointError, complete_iterations, read_manifest, verify_file
from megalite.checkpoint.paths import TRACKER_FILE, iteration_dir, read_latest_iteration
from megalite.log import print_rank0

__all__ = ["load_file", "choose_iteration", "required_manifest", "CheckpointReader", "SliceValues"]


def load_file(path: str, mmap: bool = False):
    """A verified file's contents; never runs code from it (``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - any unpickling fault is this file's, said in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint file {path} cannot be read: {first}") from None


def choose_iteration(root: str, say: Callable[[str], None] = print_rank0) -> Optional[int]:
    """The tracker's iteration when its save finished; else the newest complete one (said once, through
    ``say``); None when ``root`` holds no checkpoint at all (a fresh start)."""
    iteration = read_latest_iteration(root)
    if iteration is not None and os.path.isfile(os.path.join(iteration_dir(root, iteration), MANIFEST)):
        return iteration
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--load {root}: no such directory")
    complete = complete_iterations(root)
    why = (f"{os.path.join(root, TRACKER_FILE)} is missing" if iteration is None else
           f"iteration {iteration} of {root} has no {MANIFEST} (its save did not finish, or the manifest was removed)")
    if complete:
        say(f"{why}; resuming from the newest complete iteration, {complete[-1]}")
        return complete[-1]
    started = sorted(name for name in os.listdir(root) if name.startswith("iter_"))
    if started:
        raise CheckpointError(f"--load {root} has {', '.join(started)} but no iteration that finished saving "
                              f"({why}); move them away to start afresh")
    return None


def required_manifest(root: str, iteration: int) -> dict:
    """The iteration's manifest; an iteration without one is refused by name."""
    manifest = read_manifest(iteration_dir(root, iteration))
    if manifest is None:
        raise CheckpointError(f"--load {root}: iteration {iteration} has no {MANIFEST}: its save did not finish, or "
                              f"the manifest was removed, so none of its files can be verified; load another "
                              f"iteration")
    return manifest


class CheckpointReader:
    """One iteration of a checkpoint, opened on one process: ``iteration`` None takes the tracker's (or
    the newest complete one, said on stderr: a tool's stdout is its output); each file is verified against
    the manifest the first time it is asked for."""

    def __init__(self, root: str, iteration: Optional[int] = None):
        if iteration is None:
            iteration = choose_iteration(root, say=lambda message: print(message, file=sys.stderr))
            if iteration is None:
                raise FileNotFoundError(f"no checkpoint under {root}; train with --save {root} first")
        self.root, self.iteration = root, iteration
        self.folder = iteration_dir(root, iteration)
        self.manifest = required_manifest(root, iteration)
        self._verified: Dict[str, str] = {}

    def path(self, relative: str) -> str:
        """The path of a file of the iteration (relative to its folder), once it is known whole."""
        if relative not in self._verified:
            self._verified[relative] = verify_file(self.folder, relative, self.manifest)
        return self._verified[relative]

    def load(self, relative: str, mmap: bool = False):
        return load_file(self.path(relative), mmap=mmap)


class SliceValues:
    """The saved values of tensor-index slices (index.Slice), as index.fill_slice reads them: each file
    opened once through ``load(relative)`` (memory-mapped by the caller), its size checked against the index."""

    def __init__(self, load: Callable[[str], object]):
        self._load, self._opened = load, {}

    def open(self, relative: str):
        if relative not in self._opened:
            self._opened[relative] = self._load(relative)
        return self._opened[relative]

    def __call__(self, source) -> torch.Tensor:
        value = self.open(source.file)
        for key in source.where:
            value = value[key]
        if value.numel() != source.end - source.start:
            raise ValueError(f"{source.file} holds {value.numel()} elements at {list(source.where)}, its index "
                             f"says {source.end - source.start} ({source.name}); the index does not match the files")
        return value.reshape(-1)
