"""examples/scaling: every published run's flags parse as megalite-train's, and the launcher prints the
planner's prediction, then the training command with the same flags and the sizes the planner chose."""
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from megalite.training.arguments import parse_args

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("scaling_runs", ROOT / "examples" / "scaling" / "runs.py")
runs_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runs_module)
RUNS = runs_module.runs()


def test_table_covers_both_papers():
    assert len([n for n in RUNS if n.startswith("narayanan-")]) == 10
    assert {n for n in RUNS if n.startswith("korthikanti-")} == {f"korthikanti-{s}" for s in ("22b", "175b", "530b",
                                                                                              "1t")}
    assert RUNS["narayanan-1008b"][0] == 3072 and RUNS["narayanan-1.7b"][0] == 32


@pytest.mark.parametrize("name", sorted(RUNS))
def test_flags_parse_as_the_trainers(name):
    """With the smallest virtual size the interleaved rows allow (the planner picks one: test_validate.py)."""
    gpus, flags = RUNS[name]
    if "interleaved" in flags:
        layers = int(flags[flags.index("--num-layers") + 1])
        pp = int(flags[flags.index("--pipeline-model-parallel-size") + 1])
        vpp = min(v for v in range(2, layers // pp + 1) if (layers // pp) % v == 0)
        flags = flags + ["--virtual-pipeline-model-parallel-size", str(vpp)]
    model, parallel, _optimizer, _data, training = parse_args(flags + ["--mock-data"], world_size=gpus)
    assert model.seq_length == 2048 and model.padded_vocab_size(parallel.tensor_model_parallel_size) == 51200
    assert parallel.data_parallel_size * parallel.tensor_model_parallel_size * \
        parallel.pipeline_model_parallel_size == gpus


def test_launcher_plans_then_trains_with_the_same_flags():
    env = dict(os.environ, PY=sys.executable, DRY_RUN="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(["bash", str(ROOT / "examples" / "scaling" / "launch_torchrun.sh"), "korthikanti-22b"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    plan = json.loads(lines[-2])
    command = shlex.split(lines[-1])
    assert plan["fits"] and plan["micro_batch_size"] == 4
    _gpus, flags = RUNS["korthikanti-22b"]
    train = command[command.index("megalite.train") + 1:]
    assert train[:len(flags)] == flags and "--mock-data" in train
    assert command[command.index("--nnodes") + 1] == "1"
