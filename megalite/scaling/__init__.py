"""Scaling arithmetic: parameter and FLOP counts, model FLOPs utilization (MFU)."""

__all__ = ["flops"]
