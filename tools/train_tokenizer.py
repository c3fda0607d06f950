#!/usr/bin/env python
"""The checkout's name for ``megalite-train-tokenizer`` (megalite/data/train_tokenizer.py); needs megalite installed."""
import sys

from megalite.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main(prog="train_tokenizer.py"))
