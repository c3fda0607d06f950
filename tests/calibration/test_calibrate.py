"""megalite/calibration/calibrate.py: the file has the planner's schema with positive figures, loads as a
Hardware, and the alpha-beta fit recovers a known link."""
import json

import pytest

from megalite.calibration.calibrate import COLLECTIVES, COMPUTE_GAPS, calibrate, fit_alpha_beta
from megalite.calibration.ops import ATTENTION_GRID_QUICK
from megalite.calibration.overhead import split_overhead
from megalite.scaling.hardware import from_calibration


def test_quick_calibration_has_the_schema(tmp_path):
    path = tmp_path / "machine.json"
    returned = calibrate(str(path), ranks=2, quick=True)
    with open(path) as f:
        document = json.load(f)
    assert document == json.loads(json.dumps(returned))
    assert isinstance(document["name"], str) and document["name"]
    assert set(document["peak_tflops"]) == {"float32", "bfloat16"}
    assert all(v > 0 for v in document["peak_tflops"].values())
    assert {(r["dtype"]) for r in document["matmul"]} == {"float32", "bfloat16"}
    for row in document["matmul"]:
        assert all(isinstance(row[key], int) and row[key] > 0 for key in "mnk")
        assert row["tflops"] > 0
    for dtype in ("float32", "bfloat16"):
        assert document["peak_tflops"][dtype] == max(r["tflops"] for r in document["matmul"] if r["dtype"] == dtype)
    assert document["memory_bandwidth_gbs"] > 0 and document["optimizer_bytes_per_s"] > 0
    for link in ("intra_node", "inter_node"):
        assert document["network"][link]["bandwidth_gbs"] > 0
        assert document["network"][link]["latency_us"] >= 0
    assert document["gpus_per_node"] == 2
    assert {(r["dtype"], r["heads"], r["s"], r["d"]) for r in document["attention"]} == {
        (dtype, heads, s, d) for dtype in ("float32", "bfloat16") for heads, s, d in ATTENTION_GRID_QUICK}
    assert all(r["forward_tflops"] > 0 and r["backward_tflops"] > 0 for r in document["attention"])
    assert {(r["dtype"], r["op"]) for r in document["elementwise"]} == {
        (dtype, op) for dtype in ("float32", "bfloat16")
        for op in ("norm", "activation", "add", "cross_entropy", "permute")}
    assert all(r["bytes"] > 0 and r["forward_gbs"] > 0 and r["backward_gbs"] > 0 for r in document["elementwise"])
    hardware = from_calibration(document)
    assert hardware.peak("float32") == document["peak_tflops"]["float32"]
    assert len(hardware.matmul) == len(document["matmul"])
    assert len(hardware.attention) == len(document["attention"]) and len(hardware.elementwise) == len(
        document["elementwise"])
    assert {r["layout"] for r in document["matmul"]} == {"nn", "nt", "tn"}
    assert set(document["collectives"]) == set(COLLECTIVES)
    for fits in document["collectives"].values():
        assert [fit["gap_s"] for fit in fits] == [gap for gap, _calls in COMPUTE_GAPS]
        assert all(fit["bandwidth_gbs"] > 0 and fit["latency_us"] >= 0 for fit in fits)
    first = document["collectives"]["all_reduce"][0]
    link = hardware.intra_node.for_collective("all_reduce", first["gap_s"])
    assert link.bandwidth_gbs == pytest.approx(first["bandwidth_gbs"]) and link.latency_us == first["latency_us"]
    assert set(document["host_overhead"]) == {"layer_s", "micro_batch_s", "step_s"}
    assert all(0 <= v < 0.1 for v in document["host_overhead"].values())
    assert hardware.layer_overhead_s == document["host_overhead"]["layer_s"]
    assert not hardware.overlaps_communication
    baseline = document["runtime_baseline"]      # a real run's peak resident set: at least torch's import
    assert baseline["import_mib"] is None and 100 < baseline["mib"] <= baseline["step_mib"] < 4096
    assert hardware.runtime_bytes == baseline["mib"] * 2**20 and hardware.cpu_activations


@pytest.mark.parametrize("n", [2, 4])
def test_alpha_beta_fit_recovers_a_known_link(n):
    bandwidth_gbs, latency_us = 2.5, 40.0
    samples = []
    for name, model in COLLECTIVES.items():
        hops, factor = model(n)
        for nbytes in (1 << 12, 1 << 16, 1 << 20, 1 << 24):
            samples.append((name, nbytes, hops * latency_us * 1e-6 + factor * nbytes / (bandwidth_gbs * 1e9)))
    fitted_bw, fitted_latency = fit_alpha_beta(samples, n)
    assert fitted_bw == pytest.approx(bandwidth_gbs, rel=1e-9)
    assert fitted_latency == pytest.approx(latency_us, rel=1e-9)


def test_overhead_split_recovers_known_costs():
    layer, micro_batch, step = 0.002, 0.003, 0.005
    times = {(L, m): step + m * (micro_batch + L * layer) for L in (1, 3) for m in (1, 3)}
    assert split_overhead(times) == pytest.approx({"layer_s": layer, "micro_batch_s": micro_batch, "step_s": step})
    assert split_overhead({key: -1.0 for key in times})["step_s"] == 0.0      # clamped: never negative


def test_one_rank_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--ranks 1"):
        calibrate(str(tmp_path / "x.json"), ranks=1)
