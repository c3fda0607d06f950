"""Session-wide: say in the report header how multi-rank tests start their ranks.

A failure log from another machine then shows at its top whether ranks were forked from pytest or
from the fork server (megalite/testing.py), which is the first question when ranks misbehave.
"""
from megalite.testing import START_ENV, rank_start_method


def pytest_report_header(config):
    return f"megalite ranks: {rank_start_method()} ({START_ENV}={__import__('os').environ.get(START_ENV, 'auto')})"
