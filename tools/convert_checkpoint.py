#!/usr/bin/env python
"""Megatron's name for ``megalite-convert`` (megalite/checkpoint/convert.py); needs megalite installed."""
import sys

from megalite.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main(prog="convert_checkpoint.py"))
