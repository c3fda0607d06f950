"""calibration/baseline.py without launching ranks: the runtime baseline is the tiny run's peak less
the model's own bytes for it, whatever baseline the calibration document being rewritten holds."""
import json
import os
from pathlib import Path

import pytest

from megalite.calibration import baseline

EXAMPLE = Path(__file__).parent.parent / "scaling" / "cpu_calibration.json"


def _fake_launch(module_argv, ranks, threads, folder, timeout):
    """What the two launches leave behind: rank 0's import peak, the tiny run's --log-json records."""
    if module_argv[0] == "megalite.calibration.baseline":
        with open(module_argv[1], "w") as f:
            json.dump({"peak_mib": 290.0, "threads": threads}, f)
    else:
        log = module_argv[module_argv.index("--log-json") + 1]
        with open(os.path.join(folder, log), "w") as f:
            f.write("\n".join(json.dumps({"peak_memory_mb": mib}) for mib in (300.0, 310.0, 305.0)) + "\n")


@pytest.mark.parametrize("held", [None, 500.0])
def test_baseline_is_the_tiny_runs_peak_less_its_model(monkeypatch, held):
    monkeypatch.setattr(baseline, "_launch", _fake_launch)
    document = json.loads(EXAMPLE.read_text())
    document.pop("runtime_baseline", None)
    if held is not None:    # a file measured before: its own baseline must not be subtracted
        document["runtime_baseline"] = {"import_mib": held, "step_mib": held, "mib": held}
    measured = baseline.measure_runtime_baseline(document, 2)
    assert measured["import_mib"] == 290.0 and measured["step_mib"] == 310.0
    assert 308.0 < measured["mib"] < 310.0          # the tiny model's own bytes: under 2 MiB
    assert baseline.measure_runtime_baseline(document, 2, quick=True)["import_mib"] is None
