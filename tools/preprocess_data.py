#!/usr/bin/env python
"""Megatron's name for ``megalite-preprocess`` (megalite/data/preprocess.py); needs megalite installed."""
import sys

from megalite.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main(prog="preprocess_data.py"))
