"""The performance model: activation memory and predict() -- a run's step time, throughput and memory
on a machine (docs/scaling.md).  Parameter and FLOP counts live in megalite/model/flops.py, the
machine's measurements in megalite/calibration/."""

__all__ = ["activations", "hardware", "compute", "communication", "schedule", "memory", "predict",
           "planner", "published", "validate"]
