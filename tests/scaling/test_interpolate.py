"""interpolate.py: multilinear in log2 coordinates on a full grid, clamped at its ends; inverse
squared distance where the grid around a point is incomplete."""
import pytest

from megalite.scaling.interpolate import interpolate


def test_a_grid_point_is_read_exactly_and_the_ends_are_clamped():
    rows = [((m, n), float(m + n)) for m in (1, 4) for n in (2, 8)]
    assert interpolate(rows, (4, 2)) == 6.0
    assert interpolate(rows, (64, 8)) == 12.0                 # beyond m's end: m = 4
    assert interpolate(rows, (0.5, 1)) == 3.0                 # below both: (1, 2)
    assert interpolate([], (1, 1)) is None


def test_between_points_it_is_multilinear_in_log2():
    # value = log2 m + 10 log2 n at the corners; multilinear in (log2 m, log2 n) reproduces it inside.
    rows = [((m, n), float(m.bit_length() - 1 + 10 * (n.bit_length() - 1))) for m in (2, 8) for n in (4, 16)]
    assert interpolate(rows, (4, 8)) == pytest.approx(2 + 30)     # both log-midpoints
    assert interpolate(rows, (2 ** 1.5, 16)) == pytest.approx(1.5 + 40)


def test_one_axis_is_piecewise_linear():
    rows = [((1 << 10,), 1.0), ((1 << 12,), 3.0), ((1 << 14,), 4.0)]
    assert interpolate(rows, (1 << 11,)) == pytest.approx(2.0)
    assert interpolate(rows, (1 << 13,)) == pytest.approx(3.5)


def test_an_incomplete_grid_falls_back_to_inverse_distance():
    rows = [((1, 1), 1.0), ((4, 4), 3.0)]                     # the corners (1, 4) and (4, 1) are missing
    assert interpolate(rows, (2, 2)) == pytest.approx(2.0)     # equidistant in log space


def test_missing_corners_leave_the_others_weights_renormalized():
    # the (4, 4) corner was not measured: the point between reads the three that were, reweighted
    rows = [((1, 1), 1.0), ((1, 4), 2.0), ((4, 1), 3.0)]
    assert interpolate(rows, (2, 2)) == pytest.approx((1.0 + 2.0 + 3.0) / 3)
    assert interpolate(rows, (4, 1)) == 3.0
