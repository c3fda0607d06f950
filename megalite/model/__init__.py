"""GPT and LLaMA-style models built from tensor-parallel layers (see gpt.py and transformer.py)."""
from megalite.model.gpt import GPTModel, loss_from_per_token

__all__ = ["GPTModel", "loss_from_per_token"]
