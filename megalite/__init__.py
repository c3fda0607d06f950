"""megalite: small, readable Megatron-style 3D-parallel training for GPT-family models.

The map of the package is docs/architecture.md.
"""
__version__ = "0.1.0"

__all__ = ["arguments", "checkpoint", "config", "data", "extras", "generate", "logger", "model", "ops", "optim",
           "parallel", "scaling", "testing", "train", "training"]
