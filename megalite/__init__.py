"""megalite: small, readable Megatron-style 3D-parallel training for GPT-family models.

The map of the package is docs/architecture.md.
"""
__version__ = "0.1.0"

__all__ = ["calibration", "checkpoint", "config", "data", "extras", "generate", "log", "model", "ops", "optim",
           "parallel", "plan", "scaling", "train", "training"]
