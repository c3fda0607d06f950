"""Tensor, pipeline, context and data parallelism: the grid, communication and parallel layers."""
