from megalite.parallel.pipeline.orders import build_order
from megalite.parallel.pipeline.simulator import simulate
from megalite.parallel.pipeline.timeline import Span, Timeline, bubble_fraction, draw_timeline


def test_timeline_records_spans_in_order():
    ticks = iter(range(10))
    timeline = Timeline(pp_rank=2, clock=lambda: next(ticks))
    with timeline.span("F", 3, 1):
        pass
    assert timeline.spans == [Span(2, "F", 3, 1, 0, 1)]


def test_bubble_fraction_by_hand():
    # stage 0 busy 2 of 4 units, stage 1 busy 4 of 4: mean of 2/2 and 0/4.
    spans = [Span(0, "F", 0, 0, 0, 1), Span(0, "B", 0, 0, 3, 4), Span(1, "F", 0, 0, 0, 4)]
    assert bubble_fraction(spans) == 0.5


def test_draw_simulated_timeline(tmp_path):
    path = draw_timeline(simulate(build_order("zb-h1", 4, 8)), str(tmp_path / "zb.png"), "zb-h1")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
