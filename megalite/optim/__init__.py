"""Optimizers: fused Adam kernels front, mixed precision, ZeRO-1, learning-rate schedules."""
