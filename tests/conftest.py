"""Session-wide: the report header says how multi-rank tests start their ranks, and the CPU
kernel-table fixtures (cpu_isa, native_isa, output_stores) serve the norm and Adam tests.

A failure log from another machine then shows at its top whether ranks were forked from pytest or
from the fork server (megalite/testing.py), which is the first question when ranks misbehave.
"""
import os

from megalite.testing import START_ENV, rank_start_method

pytest_plugins = ["tests.ops.kernel_tables"]


def pytest_report_header(config):
    return f"megalite ranks: {rank_start_method()} ({START_ENV}={os.environ.get(START_ENV, 'auto')})"
