"""benchmarks/moe_step.py's smoke runs: the memory part (--quick) reports each EP, and the experts' state per
rank halves from EP=1 to EP=2 by the optimizer's count, which the parameter count confirms and the resident set
follows; the experts part times both paths.  (The step part is the training path that the suite covers.)"""
from benchmarks import moe_step


def test_quick_run_reports_expert_memory_over_ep(capsys):
    memory = moe_step.main(["--quick", "--parts", "memory", "--ep", "1", "2"])["memory"]
    assert [(row["ep"], row["expert_dp"]) for row in memory] == [(1, 4), (2, 2)]
    one, two = memory
    assert two["optimizer"] * 2 == one["optimizer"] > 0              # E / EP experts per rank
    assert [row["optimizer"] for row in memory] == [row["counted"] for row in memory]
    assert two["allocator"] < one["allocator"]
    out = capsys.readouterr().out
    assert out.startswith("machine:") and "x EP=1" in out


def test_experts_part_times_both_paths_and_counts_empty_experts():
    rows = moe_step.measure_experts([8], [1, 16], hidden=32, width=64, rounds=1)
    assert [(row["experts"], row["tokens_per_expert"]) for row in rows] == [(8, 1), (8, 16)]
    assert rows[0]["empty"] > 0 and rows[1]["empty"] == 0       # 8 rows over 8 experts leave some without
    assert all(row["grouped_s"] > 0 and row["loop_s"] > 0 for row in rows)
    assert "grouped/loop" in moe_step.experts_table(rows)
