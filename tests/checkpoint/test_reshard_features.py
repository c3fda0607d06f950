"""The Hugging Face model switches survive a change of layout: a TP=2 x PP=2 run with sequence
parallelism (--add-qkv-bias, --qk-layernorm, --kv-channels, --rotary-percent, --use-rope-scaling,
--apply-layernorm-1p, --padded-vocab-size) resumes at TP=1 and follows its own curve, so the tensor
index describes the new parameters (the q/k norms, the QKV bias) and the fixed padding."""
from megalite.parallel.testing import run_on_ranks
from tests.checkpoint.test_reshard import MODEL, _assert_same_curve, _train_runs

FEATURES = ["--disable-bias-linear", "--add-qkv-bias", "--qk-layernorm", "--kv-channels", "12",
            "--rotary-percent", "0.5", "--use-rope-scaling", "--rope-scaling-factor", "4", "--apply-layernorm-1p",
            "--padded-vocab-size", "96", "--untie-embeddings-and-output-weights"]


def test_features_reshard_from_tp2_pp2_sp_to_one_rank(tmp_path):
    save = str(tmp_path / "ckpt")
    argv = MODEL + FEATURES + ["--train-iters", "3"]
    source = run_on_ranks(_train_runs, 4, [(argv + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                                    "--pipeline-model-parallel-size", "2", "--save", save,
                                                    "--save-interval", "1"], None)], timeout=180)[0][0]
    assert not isinstance(source, str), source
    resumed = run_on_ranks(_train_runs, 1, [(argv + ["--load", save], (save, 1))], timeout=120)[0][0]
    assert not isinstance(resumed, str), resumed
    _assert_same_curve(resumed, source[1:])
