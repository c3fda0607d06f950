"""Named random streams for dropout under tensor parallelism, and recompute that replays them.

Which dropout mask a rank draws decides whether TP still computes the single-rank model:

- activations replicated over TP (hidden states without sequence parallelism) must get the SAME
  mask on every TP rank: they use the default generator, seeded identically across TP;
- attention probabilities of this rank's heads must get masks that DIFFER between TP ranks
  (else head h and head h + a/t would share a mask): the ``TENSOR_PARALLEL_RNG`` stream;
- under sequence parallelism each rank holds different tokens of the hidden states, so each rank
  draws its own masks: the ``SEQUENCE_PARALLEL_RNG`` stream;
- under context parallelism the CP ranks of a group hold different tokens (and attention queries)
  of the same sequences: every stream, the default one included, is seeded apart per CP rank.

A stream is a saved generator state; :meth:`RNGStatesTracker.fork` swaps it into the default
generators (CPU, and CUDA when initialized) for the duration of a ``with`` block and saves the
advanced state back, so forking never disturbs the default stream.

:func:`checkpoint` recomputes a function in backward (activation recompute) with every stream
restored to where it was in forward, so recomputed dropout masks equal the first pass's.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict

import torch
import torch.utils.checkpoint

from megalite.parallel import state

TENSOR_PARALLEL_RNG = "tensor-parallel-rng"      # differs across TP ranks: attention dropout
SEQUENCE_PARALLEL_RNG = "sequence-parallel-rng"  # differs across TP ranks: dropout on a token shard
# Seed offsets (Megatron-LM uses 2718 for its model-parallel stream); any distinct constants work.
_SEED_OFFSETS = {TENSOR_PARALLEL_RNG: 2718, SEQUENCE_PARALLEL_RNG: 3141}
# Seeds of CP rank r are shifted by r x this: above every offset plus TP rank and the training loop's
# 100 x pipeline rank, so no two (TP, CP, PP) coordinates share a stream's seed.
_CP_SEED_STRIDE = 10_000


def _cuda_live() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _state_for_seed(seed: int) -> Dict[str, torch.Tensor]:
    """Generator states (CPU, and CUDA when in use) that ``manual_seed(seed)`` would give."""
    states = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if _cuda_live():
        saved = torch.cuda.get_rng_state()
        torch.cuda.manual_seed(seed)
        states["cuda"] = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(saved)
    return states


class RNGStatesTracker:
    """Named generator states, swapped into the default generators by :meth:`fork`."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._states: Dict[str, Dict[str, torch.Tensor]] = {}
        self._seeds: Dict[str, int] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists (seed {self._seeds[name]}); reset() first")
        if seed in self._seeds.values():
            raise ValueError(f"seed {seed} is already used by another RNG stream; two streams would draw equal masks")
        self._seeds[name] = seed
        self._states[name] = _state_for_seed(seed)

    def names(self):
        return list(self._states)

    def get_states(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """A copy of every stream's state (for checkpoints and recompute)."""
        return {name: {dev: s.clone() for dev, s in states.items()} for name, states in self._states.items()}

    def set_states(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        self._states = {name: {dev: s.clone() for dev, s in dev_states.items()} for name, dev_states in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_RNG):
        """Draw from stream ``name`` inside the block; the default generators are left untouched."""
        if name not in self._states:
            # Not seeded by model_parallel_seed (a bare model in a script or test): derive the
            # streams from the default generator's seed, the same on every TP rank.
            model_parallel_seed(torch.initial_seed() % 2**32, reseed_default=False)
        states = self._states[name]
        if _cuda_live() and "cuda" not in states:
            states["cuda"] = _state_for_seed(self._seeds[name])["cuda"]
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state() if _cuda_live() else None
        torch.set_rng_state(states["cpu"])
        if saved_cuda is not None:
            torch.cuda.set_rng_state(states["cuda"])
        try:
            yield
        finally:
            states["cpu"] = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if saved_cuda is not None:
                states["cuda"] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def model_parallel_seed(seed: int, reseed_default: bool = True) -> None:
    """Seed the default generators (same on every TP rank) and the TP-distinct streams.

    Call once per process after the grid exists; the training loop passes a seed that already
    differs per pipeline stage.  With ``shift = 10000 x cp_rank``: the default generators get
    ``seed + shift`` (hidden-state dropout, replicated over TP, must still differ between the CP
    ranks' tokens) and stream ``name`` gets ``seed + shift + offset(name) + tp_rank``.
    """
    grid = state.get_grid() if state.grid_is_initialized() else None
    tp_rank = grid.tp_rank if grid is not None else 0
    seed += _CP_SEED_STRIDE * (grid.cp_rank if grid is not None else 0)
    if reseed_default:
        torch.manual_seed(seed)
    _TRACKER.reset()
    for name, offset in _SEED_OFFSETS.items():
        _TRACKER.add(name, seed + offset + tp_rank)


def dropout_stream(sequence_parallel: bool):
    """The stream for dropout on hidden states: per-rank under sequence parallelism, else the default."""
    return _TRACKER.fork(SEQUENCE_PARALLEL_RNG) if sequence_parallel else contextlib.nullcontext()


# -- recompute ------------------------------------------------------------------------------------
_RECOMPUTE = {"depth": 0}


def is_recomputing() -> bool:
    """Whether a checkpointed span is being recomputed in backward (code with side effects, such as a router
    counting its tokens, must not repeat them: the forward already did)."""
    return _RECOMPUTE["depth"] > 0


def _tracker_replay_contexts():
    """(forward ctx, recompute ctx) for torch's checkpoint: record the tracker's streams when the
    forward starts, and run the recompute from exactly those streams (restoring the live ones after).

    torch's own ``preserve_rng_state`` covers the default CPU/CUDA generators; this covers ours.
    """
    recorded = {}

    @contextlib.contextmanager
    def forward_context():
        recorded["states"] = _TRACKER.get_states()
        yield

    @contextlib.contextmanager
    def recompute_context():
        live = _TRACKER.get_states()
        _TRACKER.set_states(recorded["states"])
        _RECOMPUTE["depth"] += 1
        try:
            yield
        finally:
            _RECOMPUTE["depth"] -= 1
            _TRACKER.set_states(live)

    return forward_context(), recompute_context()


def checkpoint(function: Callable, *args):
    """``function(*args)``, keeping only its inputs for backward and recomputing the rest there.

    Every RNG stream (default CPU/CUDA generators and the tracker's) is replayed, so dropout inside
    ``function`` draws the same masks in the recompute as in the forward.
    """
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True,
                                             context_fn=_tracker_replay_contexts)
