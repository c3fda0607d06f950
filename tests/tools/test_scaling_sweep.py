"""tools/scaling_sweep.py --smoke end to end: a real one-rank megalite-train run, its prediction from a
(quick) calibration file, and the table, CSV and JSON with one row of positive figures.  No timing
is asserted: the measured-vs-predicted figures of the full sweep are in docs/scaling_measured.md."""
import csv
import json

import pytest

from megalite.calibration.allocator import ENV
from megalite.calibration.calibrate import calibrate
from tools import scaling_sweep


def test_smoke_sweep_writes_the_table(tmp_path, monkeypatch):
    calibration = tmp_path / "machine.json"
    monkeypatch.setenv(ENV, "131072")          # recorded by the calibration; the runs take it from the file
    calibrate(str(calibration), ranks=2, quick=True)
    monkeypatch.delenv(ENV)
    out = tmp_path / "sweep"
    rows = scaling_sweep.main(["--out", str(out), "--smoke", "--iters", "4", "--calibration", str(calibration)])
    assert [row["name"] for row in rows] == ["h64 1 rank"]
    assert rows[0]["malloc_mmap_threshold"] == 131072
    assert "glibc mmap threshold (runs and calibration): fixed at 131072 bytes" in (out / "sweep.md").read_text()
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1 and list(table[0]) == scaling_sweep.COLUMNS
    row = table[0]
    for column in ("step_s", "pred_step_s", "step_ratio", "tokens_per_s", "peak_mib", "pred_memory_mib",
                   "pred_rank0_mib", "memory_ratio", "pred_layer_act_mib", "cpu_layer_act_mib"):
        assert float(row[column]) > 0, column
    assert float(row["memory_ratio"]) == pytest.approx(float(row["peak_mib"]) / float(row["pred_rank0_mib"]))
    # the prediction counts the calibration's runtime baseline, which the measured peak holds too
    with open(calibration) as f:
        assert float(row["pred_memory_mib"]) > json.load(f)["runtime_baseline"]["mib"]
    assert row["bubble"] == "" and row["pred_bubble"] == ""      # one rank: no pipeline
    with open(out / "sweep.json") as f:
        document = json.load(f)
    assert document["machine"].startswith("cpu") and len(document["rows"]) == 1
    with open(calibration) as f:                 # each rank ran at the threads the calibration was measured at
        assert document["rows"][0]["threads_per_rank"] == json.load(f)["threads_per_rank"]
    assert "| smoke | h64 1 rank | 1 |" in (out / "sweep.md").read_text()


def test_too_few_iterations_are_refused(tmp_path, capsys):
    try:
        scaling_sweep.main(["--out", str(tmp_path), "--smoke", "--iters", "2"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "--iters 2: at least 4" in capsys.readouterr().err


def test_only_takes_several_texts():
    names = [c.name for c in scaling_sweep.grid(False) if scaling_sweep.selected(c, "memory, model size")]
    assert names == ["h128 1 rank", "h256 1 rank", "h512 1 rank", "h256 TP2", "h256 TP2 SP", "h256 TP2 SP selective",
                     "h256 TP2 SP full"]
    assert len([c for c in scaling_sweep.grid(False) if scaling_sweep.selected(c, None)]) == 25
    assert [c.name for c in scaling_sweep.grid(False) if scaling_sweep.selected(c, "MoE")] == [
        "h256 MoE 1 rank", "h256 MoE DP2 EP2", "h256 MoE TP2 SP EP2", "h256 MoE TP2 SP ETP2"]


def test_runs_under_another_allocator_setting_than_the_calibration_are_refused(tmp_path, capsys):
    calibration = tmp_path / "machine.json"
    calibration.write_text(json.dumps({"malloc_mmap_threshold": None}))
    with pytest.raises(SystemExit) as exit:
        scaling_sweep.main(["--out", str(tmp_path / "sweep"), "--smoke", "--iters", "4", "--calibration",
                            str(calibration), "--malloc-mmap-threshold", "131072"])
    assert exit.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--malloc-mmap-threshold 131072" in message and "glibc's default mmap threshold" in message
    assert str(calibration) in message
