"""benchmarks/train_throughput.py --quick end to end: every contender runs in its own process and
the table has one row per (model, metric, megalite variant, peer), each with positive numbers and their ratio."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the peer of benchmarks/train_throughput.py; "
                                           "scripts/setup_env.sh installs it where there is network")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METRICS = ["tokens/s", "step ms (median)", "peak memory MiB", "MFU %"]
NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"


def test_quick_run_prints_the_table():
    # LLaMA only: it has every feature the GPT-2 shape has not (GQA, SwiGLU, RMSNorm, RoPE, untied).
    command = [sys.executable, "-m", "benchmarks.train_throughput", "--quick", "--models", "llama", "--steps", "3",
               "--warmup", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    machine = [i for i, line in enumerate(lines) if line.startswith("# machine: ")]
    assert machine and "torch" in lines[machine[0]] and "transformers" in lines[machine[0]], done.stdout
    header = lines.index(next(line for line in lines if line.startswith("model ")))
    assert lines[header].split() == ["model", "what", "ours", "value", "peer", "peer", "value", "ratio"]
    rows = lines[header + 1:header + 1 + len(METRICS)]
    for row, metric in zip(rows, METRICS):
        match = re.fullmatch(rf"llama\s+{re.escape(metric)}\s+megalite\s+({NUMBER})\s+hf-eager\s+({NUMBER})"
                             rf"\s+({NUMBER})\s*", row)
        assert match, f"{row!r} is not a row for {metric}"
        ours, theirs, ratio = (float(x.replace(",", "")) for x in match.groups())
        assert ours > 0 and theirs > 0 and ratio > 0, row
    assert lines[header + 1 + len(METRICS)].startswith("ratio = ours / peer")
