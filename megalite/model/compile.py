"""``--compile``: torch.compile of each transformer layer, the unit the compiler fuses.

Each :class:`~megalite.model.transformer.TransformerLayer` is compiled in place
(``nn.Module.compile``), not the whole model: a pipeline chunk still runs its layers one after
another, activation recompute still checkpoints whole layers (replaying the compiled forward in
backward), and the parameters keep their names, so checkpoints do not change.  Inside the compiled
region the norms run their pure-PyTorch reference (``ops.backend.use_native``), which the compiler
fuses with the residual adds and casts around them.  Without dropout a layer is one graph; with
dropout, the switches of RNG stream around it (``parallel/random.py``) split the layer into a few,
and inductor draws the masks from its own generator (so a run with dropout is not bit for bit an
eager run's; without dropout it matches to float32 round-off).
"""
from __future__ import annotations

from torch import nn

from megalite.model.transformer import TransformerLayer

__all__ = ["compile_layers"]


def compile_layers(chunk: nn.Module, backend: str = "inductor") -> int:
    """Compile every TransformerLayer of ``chunk`` in place with ``backend``; returns how many."""
    layers = [module for module in chunk.modules() if isinstance(module, TransformerLayer)]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
