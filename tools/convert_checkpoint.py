#!/usr/bin/env python
"""Megatron's name for ``megalite-convert`` (megalite/checkpoint/hf.py); needs megalite installed."""
import sys

from megalite.checkpoint.hf import main

if __name__ == "__main__":
    sys.exit(main(prog="convert_checkpoint.py"))
