"""The published pipeline splits the planner accepts (pipeline_split.py): the embedding and the loss
counted as layers, with a virtual pipeline."""
import pytest

from megalite.scaling.hardware import PRESETS
from megalite.scaling.options import PlanOptions
from megalite.scaling.pipeline_split import stage_layer_counts
from megalite.scaling.planner import plan, predict_argv

BOTH = PlanOptions(account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True)


def test_llama_405b_split_with_a_virtual_pipeline():
    # 126 layers + embedding + loss = 128 units on 16 stages x 2 chunks: 4 each, the first and last one short
    counts = stage_layer_counts(126, 16, 2, None, None, BOTH)
    assert len(counts) == 32 and sum(counts) == 126
    assert counts[0] == 3 and counts[-1] == 3 and set(counts[1:-1]) == {4}
    # rank 0 holds chunk 0 (3) and chunk 1 (4); rank 15 chunk 0 (4) and chunk 1 (3)
    assert [counts[c * 16] for c in range(2)] == [3, 4] and [counts[c * 16 + 15] for c in range(2)] == [4, 3]
    loss_only = stage_layer_counts(127, 16, None, None, None, PlanOptions(account_for_loss_in_pipeline_split=True))
    assert loss_only[-1] == 7 and loss_only[0] == 8


def test_split_refusals_are_one_line():
    with pytest.raises(ValueError, match="= 129 do not split .* multiple of 32 units"):
        stage_layer_counts(127, 16, 2, None, None, BOTH)
    with pytest.raises(ValueError, match="drop --decoder-first"):
        stage_layer_counts(126, 16, 2, 7, None, BOTH)


MODEL = ["--num-layers", "30", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "2048",
         "--max-position-embeddings", "2048", "--vocab-size", "32000", "--bf16", "--micro-batch-size", "1",
         "--global-batch-size", "64", "--pipeline-model-parallel-size", "8"]


def test_the_planner_runs_a_layout_the_trainer_cannot_split():
    # 30 layers do not split over 8 stages; 30 + 2 = 32 units do, 2 virtual chunks of 2 each
    with pytest.raises(ValueError, match="do not split evenly"):
        predict_argv(MODEL + ["--virtual-pipeline-model-parallel-size", "2"], PRESETS["h100-sxm"], 64)
    flags = MODEL + ["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"]
    p = predict_argv(flags + ["--virtual-pipeline-model-parallel-size", "2"], PRESETS["h100-sxm"], 64)
    assert p.params > 0 and p.layout["vpp"] == 2
    chosen = plan(flags, PRESETS["h100-sxm"], 64)      # the virtual size chosen among the divisors of 4
    assert chosen.prediction.layout["vpp"] in (1, 2, 4)
    # the first and last ranks carry one layer fewer beside the embedding / output layer: lighter than
    # an even split that gives them 4 layers each (the same model with 32 layers, two more)
    even = predict_argv(["--num-layers", "32"] + MODEL[2:] + ["--virtual-pipeline-model-parallel-size", "2"],
                        PRESETS["h100-sxm"], 64)
    assert p.memory_gb_per_stage[0] < even.memory_gb_per_stage[0]
    assert p.iteration_time_s < even.iteration_time_s
