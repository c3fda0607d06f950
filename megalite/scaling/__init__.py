"""Scaling arithmetic and the performance model: parameter and FLOP counts, MFU, activation memory,
and predict() -- a run's step time, throughput and memory on a machine (docs/scaling.md)."""

__all__ = ["activations", "flops", "hardware", "compute", "communication", "schedule", "memory", "predict",
           "planner", "published", "validate", "plan_cli"]
