"""Schedule algebra on the unit-cost simulator, run on the same orders the executor trains with."""
from collections import Counter

import pytest

from megalite.parallel.pipeline.orders import build_order, interleaved_table
from megalite.parallel.pipeline.simulator import bubble_time, peak_in_flight, simulate
from megalite.parallel.pipeline.timeline import bubble_fraction

LAYOUTS = [(p, m) for p in (2, 4, 8) for m in (p, 2 * p, 3 * p + 1)]


def order_for(schedule, p, m):
    return build_order(schedule, p, m, 2 if schedule == "interleaved" else None)


@pytest.mark.parametrize("p,m", LAYOUTS)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved", "zb-h1"])
def test_every_pass_exactly_once(schedule, p, m):
    if schedule == "interleaved" and m % p:
        pytest.skip("interleaved needs m % p == 0")
    order = order_for(schedule, p, m)
    kinds = "FBW" if schedule == "zb-h1" else "FB"
    for passes in order.per_rank:
        expected = Counter((k, mb, c) for k in kinds for mb in range(m) for c in range(order.virtual_pp_size))
        assert Counter((s.kind, s.microbatch, s.chunk) for s in passes) == expected
    simulate(order)  # raises if the order deadlocks


@pytest.mark.parametrize("p,m", LAYOUTS)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bubble_of_flat_schedules_is_p_minus_1_over_m(schedule, p, m):
    assert bubble_fraction(simulate(order_for(schedule, p, m))) == pytest.approx((p - 1) / m)


@pytest.mark.parametrize("p,m", [(2, 2), (2, 4), (4, 4), (4, 8), (4, 12), (8, 16)])
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_bubble_is_p_minus_1_over_v_m(p, m, v):
    order = build_order("interleaved", p, m, v)
    assert bubble_fraction(simulate(order)) == pytest.approx((p - 1) / (v * m))


# Qi et al. 2024 derive (p-1)(T_F+T_B-T_W) for T_W <= T_B <= T_F-ish costs; (1,1,1) is their case.
@pytest.mark.parametrize("t_f,t_b,t_w", [(1, 1, 1), (2, 1.5, 1), (1, 1, 0.5), (3, 2, 1.5)])
@pytest.mark.parametrize("p,m", [(2, 2), (2, 5), (4, 4), (4, 9), (8, 16)])
def test_zb_h1_bubble(p, m, t_f, t_b, t_w):
    zb = bubble_time(simulate(build_order("zb-h1", p, m), t_f, t_b, t_w))
    assert max(zb.values()) == pytest.approx((p - 1) * (t_f + t_b - t_w))
    # 1F1B with the same costs (its backward is B + W) leaves (p-1)(T_F+T_B+T_W).
    flat = bubble_time(simulate(build_order("1f1b", p, m), t_f, t_b, t_w))
    assert max(flat.values()) == pytest.approx((p - 1) * (t_f + t_b + t_w))


@pytest.mark.parametrize("p,m", LAYOUTS)
def test_peak_in_flight(p, m):
    assert peak_in_flight(order_for("gpipe", p, m)) == [m] * p
    assert peak_in_flight(order_for("1f1b", p, m)) == [min(p - r, m) for r in range(p)]
    assert max(peak_in_flight(order_for("zb-h1", p, m))) <= p  # 1F1B's peak, on every rank


def test_interleaved_table_example_and_errors():
    assert interleaved_table(2, 2, 4) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    with pytest.raises(ValueError, match="use a multiple of 4 \\(e.g. 4 or 8\\)"):
        build_order("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="virtual pipeline size is 2"):
        build_order("1f1b", 4, 8, 2)
