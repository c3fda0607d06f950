"""megalite: small, readable Megatron-style 3D-parallel training for GPT-family models."""
__version__ = "0.1.0"
