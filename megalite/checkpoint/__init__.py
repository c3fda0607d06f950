"""Checkpoints: save and load (save_load.py), the manifest that proves a save whole (manifest.py),
the tensor index that describes every saved slice (index.py), loading across layouts (reshard.py)
and Hugging Face conversion (hf.py)."""
