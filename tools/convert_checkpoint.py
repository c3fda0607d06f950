#!/usr/bin/env python
"""Megatron's name for ``megalite-convert`` (megalite/hf_checkpoint.py); needs megalite installed."""
import sys

from megalite.hf_checkpoint import main

if __name__ == "__main__":
    sys.exit(main(prog="convert_checkpoint.py"))
