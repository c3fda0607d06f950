"""benchmarks/pipeline_bubble.py on a tiny model: one real PP=2 row per schedule with its formula and the
simulator's figures (exact numbers), and a measured bubble -- no timing is asserted."""
import pytest

from benchmarks import pipeline_bubble


def test_one_row_per_schedule():
    rows = pipeline_bubble.main(["--microbatches", "4", "--steps", "1", "--num-layers", "4", "--hidden-size", "32",
                                 "--num-attention-heads", "4", "--seq-length", "16"])
    by_schedule = {row["schedule"]: row for row in rows}
    assert set(by_schedule) == {"gpipe", "1f1b", "interleaved", "zb-h1"}
    assert by_schedule["gpipe"]["formula"] == by_schedule["1f1b"]["formula"] == pytest.approx(1 / 4)
    assert by_schedule["interleaved"]["formula"] == pytest.approx(1 / 8)
    assert by_schedule["1f1b"]["sim_unit"] == pytest.approx(1 / 4)   # unit costs: the simulator is the formula
    for row in rows:
        assert row["measured"] >= 0.0   # idle over busy: above 1 when tiny passes wait on messages
        assert row["min"] <= row["measured"] <= row["max"]
        assert set(row["pass_ms"]) == ({"F", "B", "W"} if row["schedule"] == "zb-h1" else {"F", "B"})
