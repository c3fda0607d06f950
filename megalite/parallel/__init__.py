"""Tensor, pipeline, context and data parallelism: the grid, communication and parallel layers.

See docs/architecture.md for the map: ``state`` (the grid) below everything, ``collectives`` and
``mappings`` (communication), ``param_info`` and ``layers`` (parallel layers), ``random``
(RNG streams and recompute), ``data_parallel`` and ``grads`` (gradient reduction), ``pipeline/``.
"""

__all__ = ["collectives", "data_parallel", "grads", "launch", "layers", "mappings", "param_info", "pipeline",
           "random", "state"]
