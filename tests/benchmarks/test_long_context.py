"""benchmarks/long_context.py runs end to end (its --quick smoke run) and reports every configuration."""
import os

import pytest

from benchmarks import long_context


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_quick_run_reports_each_configuration(capsys, tmp_path):
    rows = long_context.main(["--quick", "--cp", "1", "2", "--types", "p2p", "a2a", "--steps", "2",
                              "--plot", str(tmp_path / "memory.png")])
    assert [(r["seq"], r["cp"], r["type"]) for r in rows] == [
        (64, 1, "-"), (64, 2, "p2p"), (64, 2, "a2a"), (128, 1, "-"), (128, 2, "p2p"), (128, 2, "a2a")]
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in rows)
    assert "x one rank" in capsys.readouterr().out
    assert (tmp_path / "memory.png").stat().st_size > 0
