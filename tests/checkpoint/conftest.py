"""The megalite checkpoints the Megatron crossing tests convert: one per model family, trained at
TP=2 x PP=2 once per session (four forked ranks on a 2-core machine: the expensive part)."""
import pytest

from megalite.parallel.testing import run_on_ranks

VOCAB = 100
COMMON = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
          "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", str(VOCAB),
          "--make-vocab-size-divisible-by", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--lr", "3e-3", "--log-interval", "1000", "--eval-iters", "0", "--hidden-dropout", "0",
          "--attention-dropout", "0", "--train-iters", "3"]
# GPT-2 with exact GELU (megatron-core's default activation), LLaMA-style with GQA.
FAMILIES = {
    "gpt2": [],
    "llama": ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
              "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--group-query-attention",
              "--num-query-groups", "2", "--ffn-hidden-size", "48"],
}
# Qwen-style attention on the LLaMA family (not in the recorded megatron-core keys: crossed both ways only).
FAMILIES_CROSSED_ONLY = {"qwen": FAMILIES["llama"] + ["--add-qkv-bias", "--qk-layernorm", "--kv-channels", "16",
                                                      "--use-rope-scaling", "--rotary-percent", "0.5"]}
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


def _train(rank, world_size, argv):
    from megalite.training.loop import pretrain
    pretrain(argv)


@pytest.fixture(scope="session")
def megalite_checkpoint(tmp_path_factory):
    """family -> the root of a megalite checkpoint of that family trained at TP=2 x PP=2 (3 steps)."""
    trained = {}

    def get(family):
        if family not in trained:
            root = str(tmp_path_factory.mktemp(f"megalite-{family}") / "ckpt")
            flags = {**FAMILIES, **FAMILIES_CROSSED_ONLY}[family]
            run_on_ranks(_train, 4, COMMON + flags + TP2_PP2 + ["--save", root], timeout=240)
            trained[family] = root
        return trained[family]
    return get


# A LLaMA-style MoE model (4 experts top-2 in every layer, a gated shared expert, sigmoid scores with the expert
# bias) as tests/checkpoint/test_megatron_core_moe.py's moe_hand_args describes it to megatron-core.
MOE = FAMILIES["llama"] + ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "24",
                           "--moe-shared-expert-intermediate-size", "16", "--moe-shared-expert-gate",
                           "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                           "--moe-router-bias-update-rate", "1e-2", "--moe-aux-loss-coeff", "1e-2"]


@pytest.fixture(scope="session")
def megalite_moe_checkpoint(tmp_path_factory):
    """The root of a megalite checkpoint of the MoE model trained at DP2 x EP2 (3 steps; its expert biases
    moved off zero)."""
    root = str(tmp_path_factory.mktemp("megalite-moe") / "ckpt")
    run_on_ranks(_train, 2, COMMON + MOE + ["--expert-model-parallel-size", "2", "--save", root], timeout=240)
    return root
