"""The planner's memory against Megatron-LM's own estimator (megatron/training/theoretical_memory_usage.py),
run on the same configurations: its outputs, with the commit and date they came from, are in
data/megatron_theoretical_memory.json (Megatron-LM is not a dependency; its estimator was run once on each
configuration's Megatron arguments).

What must agree: the model state of the most loaded rank (weights, fp32 gradients, fp32 master and Adam
moments: 18 bytes a parameter, 6 + 12/DP with the distributed optimizer; experts over EP and expert-DP) on
every configuration; and the activations where Megatron's formula describes the layer (Korthikanti et al.'s
GPT layer: GELU MLP, multi-head attention, dropout; with sequence parallelism and selective recompute, or
without SP), on the first pipeline stage.  What is allowed to differ, and why:

- the replicated norms and router: megalite splits every layer parameter over TP (under 0.1% of the state);
- Megatron's 5% allowance for optimizer temporaries in its without-SP formula, which megalite does not count
  (divided out here);
- on a one-stage run, the loss: megalite counts the fp32 logits and their gradient (8 bytes a logit, as its
  cross-entropy keeps them), Megatron's formula with sequence parallelism 4 (``4 s b h (1 + V/h) / t``; its
  formula without SP, 2) (``test_one_stage_runs_count_the_logits``);
- MoE layers, which Megatron's activation formula counts as dense (only the Mixtral state is compared).
"""
import json
import pathlib

import pytest

from megalite.scaling.predict import layout_of, memory_per_stage
from megalite.training.arguments import parse_args

DATA = json.loads((pathlib.Path(__file__).parent / "data" / "megatron_theoretical_memory.json").read_text())
CASES = {case["name"]: case for case in DATA["cases"]}
ACTIVATIONS_COMPARED = [name for name in CASES if name.startswith("gpt") and "PP1" not in name]


def first_stage(case):
    model, parallel, optimizer, _data, training = parse_args(case["flags"], world_size=case["world_size"])
    layout = layout_of(parallel, training, optimizer, case["world_size"])
    assert layout.num_microbatches == case["num_microbatches"]
    return memory_per_stage(model, parallel, optimizer, layout)[0], layout


def megatron_activations(case):
    allowance = 1.05 if case["activation_formula"].endswith("without_sp") else 1.0
    return case["activation_bytes"] / allowance


def test_the_data_says_where_it_came_from():
    assert "theoretical_memory_usage.py" in DATA["source"] and "d98e8a64dd" in DATA["source"]
    assert len(CASES) == 12 and len(ACTIVATIONS_COMPARED) == 4


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_state_is_megatrons(name):
    stage, _layout = first_stage(CASES[name])
    state = stage.weights + stage.gradients + stage.optimizer
    assert state == pytest.approx(CASES[name]["weight_and_optimizer_bytes"], rel=1e-3)


@pytest.mark.parametrize("name", ACTIVATIONS_COMPARED)
def test_first_stage_activations_are_megatrons(name):
    stage, layout = first_stage(CASES[name])
    assert layout.pp > 1
    assert stage.activations == pytest.approx(megatron_activations(CASES[name]), rel=0.01)


def test_one_stage_runs_count_the_logits():
    # GPT 22B at TP 8, one stage, micro-batch 4: the layers as Megatron's, plus the loss -- megalite's fp32
    # logits and their gradient (8 bytes a logit) where Megatron counts 4 s b h (1 + V/h) / t.
    case = CASES["gpt 22B, TP8 PP1, SP selective"]
    stage, layout = first_stage(case)
    s, b, h, t, vocab = 2048, 4, 6144, 8, 51200
    megatron_loss = 4 * s * b * h * (1 + vocab / h) / t
    assert stage.logits == pytest.approx(8 * s * b * vocab / t)
    assert stage.activations == pytest.approx(megatron_activations(case) - megatron_loss, rel=0.01)
