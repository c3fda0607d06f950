"""Scripts beside the console commands (``python tools/<name>.py`` or ``python -m tools.<name>``).

A package so that the benchmarks and tests import them as ``tools.<name>``, never by putting this
folder on ``sys.path``.
"""
