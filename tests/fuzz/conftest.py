"""The fuzz suite's closing line: cases per surface, and how many ended in a traceback or a silent accept."""
from tests.fuzz.fuzzing import COUNTS, summary


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        terminalreporter.write_line(summary())
