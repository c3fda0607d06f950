"""Scaling arithmetic: parameter and FLOP counts, model FLOPs utilization (MFU), activation memory."""

__all__ = ["activations", "flops"]
