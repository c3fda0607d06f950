"""GPT and LLaMA-style models built from tensor-parallel layers (see gpt.py and transformer.py)."""
from megalite.model.gpt import GPTModel
from megalite.model.loss import language_model_loss

__all__ = ["GPTModel", "language_model_loss"]
