"""Reading a calibration's measured tables between their grid points.

The calibration (``calibration/calibrate.py``, ``calibration/ops.py``) measures rates on a grid of shapes: GEMMs
over (m, n, k), the attention core over (heads, s, d), elementwise ops over bytes, each axis in
powers of two.  A model's shapes fall between the points, so a rate is read multilinearly in the
log2 of each coordinate from the ``2^d`` grid points around it (clamped to the grid's ends: no
extrapolation).  Where some of those grid points were not measured (the attention grid leaves out
its largest corner; a hand-written ``--cluster`` table may hold a few points only), the weights of
the ones that were are scaled up to sum to 1; where none was, the table is read by inverse squared
distance in the same log space.
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["interpolate"]

Point = Tuple[float, ...]


def _bracket(axis: Sequence[float], x: float) -> Tuple[float, float, float]:
    """(low, high, weight of high) of ``x`` on the sorted ``axis`` of log2 values, clamped to its ends."""
    if x <= axis[0]:
        return axis[0], axis[0], 0.0
    if x >= axis[-1]:
        return axis[-1], axis[-1], 0.0
    for low, high in zip(axis, axis[1:]):
        if x <= high:
            return low, high, (x - low) / (high - low)
    raise AssertionError("unreachable: x lies inside the axis")


def _inverse_distance(table: Dict[Point, float], point: Point) -> float:
    weights, total = 0.0, 0.0
    for coordinates, value in table.items():
        distance = sum((a - b) ** 2 for a, b in zip(point, coordinates))
        if distance < 1e-12:
            return value
        weights, total = weights + 1.0 / distance, total + value / distance
    return total / weights


def interpolate(rows: Sequence[Tuple[Sequence[float], float]], point: Sequence[float]) -> Optional[float]:
    """The value of ``rows`` (coordinates, value) at ``point``, read in log2 coordinates; None if empty."""
    if not rows:
        return None
    table = {tuple(math.log2(c) for c in coordinates): value for coordinates, value in rows}
    target = tuple(math.log2(c) for c in point)
    axes = [sorted({coordinates[d] for coordinates in table}) for d in range(len(target))]
    brackets = [_bracket(axis, x) for axis, x in zip(axes, target)]
    total, weights = 0.0, 0.0
    for corner in itertools.product((0, 1), repeat=len(target)):
        weight, coordinates = 1.0, []
        for (low, high, t), side in zip(brackets, corner):
            weight *= t if side else 1.0 - t
            coordinates.append(high if side else low)
        value = table.get(tuple(coordinates))
        if weight > 0.0 and value is not None:
            total, weights = total + weight * value, weights + weight
    return total / weights if weights > 0.0 else _inverse_distance(table, target)
