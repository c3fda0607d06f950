#!/usr/bin/env python
"""Megatron-style script name for ``megalite-plan`` (megalite/plan.py); needs megalite installed."""
import sys

from megalite.plan import main

if __name__ == "__main__":
    sys.exit(main(prog="plan.py"))
