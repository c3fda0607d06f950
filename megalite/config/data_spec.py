"""The two data flags that are text to be parsed: ``--split "969,30,1"`` and ``--data-path``'s blend
``0.3 a 0.7 b``.  DataConfig checks them when the command line is read, and the data pipeline reads them
with the same functions, so what is accepted is exactly what is trained on."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

__all__ = ["split_weights", "parse_blend"]


def split_weights(split: str) -> List[float]:
    """"969,30,1" (or "969/30/1") -> [969.0, 30.0, 1.0]: up to three finite, non-negative numbers with a
    positive sum, else ValueError (one line naming the value)."""
    parts = str(split).replace("/", ",").split(",")
    if parts and not parts[-1].strip():
        parts = parts[:-1]            # a trailing comma ("98,2,") adds nothing; an empty part inside would shift
    if any(not p.strip() for p in parts):
        raise ValueError(f"--split {split!r} has an empty part; give train, valid and test a number each, "
                         f"e.g. 969,30,1")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split {split!r} must be comma-separated numbers, e.g. 969,30,1") from None
    if not weights or len(weights) > 3 or not all(math.isfinite(w) and w >= 0 for w in weights) \
            or sum(weights) <= 0:
        raise ValueError(f"--split {split!r} must be up to three finite, non-negative numbers with a positive "
                         f"sum, e.g. 969,30,1")
    return weights


def parse_blend(data_path) -> Tuple[List[str], Optional[List[float]]]:
    """["a"] / ["a", "b"] / ["0.3", "a", "0.7", "b"] -> (prefixes, weights or None).  A list of even length
    whose every other item is a number is a blend; its weights must be finite and positive."""
    if isinstance(data_path, str):
        data_path = data_path.split()
    if len(data_path) % 2 == 0:
        try:
            weights = [float(w) for w in data_path[0::2]]
        except ValueError:
            return list(data_path), None
        bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"--data-path weight {bad[0]} must be a finite, positive number (the blend reads "
                             f"weight prefix weight prefix ...), got weights {weights}")
        return list(data_path[1::2]), weights
    return list(data_path), None
