"""The simulated pipeline against the closed forms of Narayanan et al. 2021 (Sec. 2.2), unit costs."""
import pytest

from megalite.scaling.schedule import pipeline_time


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (4, 16), (8, 8)])
def test_1f1b_bubble_is_p_minus_1_over_m(p, m):
    result = pipeline_time("1f1b", p, 1, m, 1.0, 2.0, 0.0)
    assert result.bubble_fraction == pytest.approx((p - 1) / m)
    assert result.makespan == pytest.approx((m + p - 1) * 3.0)
    assert result.in_flight == tuple(min(p - r, m) for r in range(p))


@pytest.mark.parametrize("p, v, m", [(2, 2, 4), (4, 2, 8), (4, 3, 8), (2, 4, 6)])
def test_interleaved_bubble_is_p_minus_1_over_v_m(p, v, m):
    result = pipeline_time("interleaved", p, v, m, 1.0, 2.0, 0.0)
    assert result.bubble_fraction == pytest.approx((p - 1) / (v * m))


def test_gpipe_and_no_pipeline():
    assert pipeline_time("gpipe", 4, 1, 8, 1.0, 1.0, 0.0).bubble_fraction == pytest.approx(3 / 8)
    flat = pipeline_time(None, 1, 1, 5, 1.0, 2.0, 0.5)
    assert flat.makespan == pytest.approx(17.5) and flat.bubble_fraction == 0.0


def test_zb_h1_fills_the_cool_down_with_weight_passes():
    # Qi et al. 2024: the bubble shrinks from (p-1)(F+B+W) to (p-1)(F+B-W) with equal F, B, W
    p, m = 4, 8
    one_f_one_b = pipeline_time("1f1b", p, 1, m, 1.0, 1.0, 1.0)
    zero_bubble = pipeline_time("zb-h1", p, 1, m, 1.0, 1.0, 1.0)
    assert one_f_one_b.makespan == pytest.approx(m * 3 + (p - 1) * 3)
    assert zero_bubble.makespan == pytest.approx(m * 3 + (p - 1) * 1)
