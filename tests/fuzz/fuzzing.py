"""What every fuzz surface shares: how many examples to run, the per-surface case counter the summary
prints, and the one rule every case is judged by.

The rule: a case ends in success with a correct result, or in ONE line naming the file or the value
(an exception of the documented kind, or a non-zero exit whose stderr is that line): never a
traceback, never a wrong answer accepted in silence.

``MEGALITE_FUZZ_EXAMPLES=N`` scales every surface to N examples (the checkpoint surface, whose cases
train, to N/10, and megalite-train end to end to N/50); unset, each surface runs its small default and the
whole suite takes well under a minute.
Runs are derandomized: the same examples every time, so CI is reproducible.
"""
from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings

ENV = "MEGALITE_FUZZ_EXAMPLES"

# surface -> outcome -> count; outcomes: "accepted", "refused", "known defect", "traceback", "silent accept".
COUNTS: dict = {}


def examples(default: int, share: float = 1.0) -> int:
    """The number of examples of one test: ``default``, or ``share`` of $MEGALITE_FUZZ_EXAMPLES when it is set."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return default
    return max(1, int(int(wanted) * share))


def fuzz_settings(default: int, share: float = 1.0):
    return settings(max_examples=examples(default, share), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def count(surface: str, outcome: str) -> None:
    COUNTS.setdefault(surface, Counter())[outcome] += 1


def first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def check_one_line(surface: str, message: str, *names: str) -> None:
    """A refusal: one line, no traceback, naming at least one of ``names`` (a path or a value) when given."""
    message = str(message).strip()
    if "Traceback" in message:
        count(surface, "traceback")
        raise AssertionError(f"a traceback instead of one line:\n{message}")
    assert message and "\n" not in message, f"not one line: {message!r}"
    if names:
        assert any(name in message for name in names), f"{message!r} names none of {names}"
    count(surface, "refused")


def silent_accept(surface: str, why: str) -> AssertionError:
    count(surface, "silent accept")
    return AssertionError(f"accepted in silence: {why}")


def traceback_(surface: str, error: BaseException) -> AssertionError:
    count(surface, "traceback")
    return AssertionError(f"{type(error).__name__} escaped (a traceback for the user): {error}")


def summary() -> str:
    parts = [f"{surface} {sum(c.values())} cases "
             f"({c['accepted']} accepted, {c['refused']} refused, {c['known defect']} known defects)"
             for surface, c in sorted(COUNTS.items())]
    tracebacks = sum(c["traceback"] for c in COUNTS.values())
    silent = sum(c["silent accept"] for c in COUNTS.values())
    return f"fuzz: {', '.join(parts)}; tracebacks {tracebacks}, silent accepts {silent}"
