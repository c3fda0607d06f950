#!/usr/bin/env python
"""Megatron-style script name for ``megalite-plan`` (megalite/scaling/plan_cli.py); needs megalite installed."""
import sys

from megalite.scaling.plan_cli import main

if __name__ == "__main__":
    sys.exit(main(prog="plan.py"))
