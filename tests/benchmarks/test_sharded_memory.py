"""benchmarks/sharded_memory.py --quick at DP=2: one row per configuration, and ZeRO-3 keeps only shards of
the parameters between steps, as the allocator measures it."""
import pytest

from benchmarks import sharded_memory


@pytest.mark.skipif(not sharded_memory.measurable(), reason="needs glibc's mallinfo2 and Linux's peak-RSS reset")
def test_quick_run_reports_each_configuration_and_zero3_shards_parameters(capsys):
    result = sharded_memory.main(["--quick", "--dp", "2", "--strategies", "no_shard", "optim_grads",
                                  "optim_grads_params", "--no-overlap", "--warmup", "1", "--steps", "1"])
    rows = {(r["strategy"], r["overlap"]): r for r in result["rows"]}
    assert list(rows) == [("no_shard", False), ("optim_grads", False), ("optim_grads_params", False)]
    for row in rows.values():
        assert row["resident"] > 0 and row["peak"] > 0 and row["step_s"] > 0, row
    none, zero2, zero3 = (rows[(s, False)] for s in ("no_shard", "optim_grads", "optim_grads_params"))
    assert zero3["gathers"] > 0 and zero2["gathers"] == 0
    assert none["reduce_wait_s"] > 0 and zero2["reduce_wait_s"] > 0    # the gradient collectives were timed
    # Sharding the parameters over 2 ranks frees 2 of their 4 bytes each; ask for at least half of that, as
    # the allocator sees it, against ZeRO-2 (which differs from ZeRO-3 in the parameters only).
    param_bytes = 4 * zero3["num_params"]
    assert zero3["resident"] < zero2["resident"] - param_bytes / 4, (zero2["resident"], zero3["resident"])
    assert zero3["resident"] < none["resident"]
    assert set(result["summary"]) == {"zero3_over_none_resident", "zero3_over_none_peak"}
    out = capsys.readouterr().out
    assert "resident MiB" in out and "ZeRO-2" in out and "zero3_over_none_resident" in out
