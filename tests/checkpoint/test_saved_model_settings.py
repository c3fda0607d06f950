"""A checkpoint's ``settings["model"]`` holds the model's fields only; one that also holds the TP size and the
sequence-parallel flag (the parallel layout, ParallelConfig's) still loads, and the layout it names is ignored."""
import os

import pytest
import torch

from megalite.checkpoint import paths
from megalite.config.settings import ModelConfig, saved_model_fields
from megalite.parallel.testing import run_on_ranks

LAYOUT_KEYS = {"tensor_model_parallel_size": 4, "sequence_parallel": True}
TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--vocab-size", "64", "--make-vocab-size-divisible-by", "16",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--log-interval", "1000",
        "--eval-iters", "0"]


def _save_run(rank, world_size, argv):
    from megalite.training.loop import pretrain
    pretrain(argv)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-rank checkpoint whose settings["model"] is given the layout keys afterwards."""
    root = str(tmp_path_factory.mktemp("legacy"))
    run_on_ranks(_save_run, 1, TINY + ["--save", root], timeout=120)
    path = os.path.join(paths.rank_dir(root, paths.read_latest_iteration(root), 0, 0), "model_optim_rng.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    written = dict(state["settings"]["model"])
    state["settings"]["model"].update(LAYOUT_KEYS)
    torch.save(state, path)
    _rewrite_manifest_entry(root, path)   # as the older megalite that wrote those keys would have
    return root, written


def _rewrite_manifest_entry(root, path):
    import json

    from megalite.checkpoint.manifest import MANIFEST, file_entry
    folder = paths.iteration_dir(root, paths.read_latest_iteration(root))
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    manifest["files"][os.path.relpath(path, folder)] = file_entry(path)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f)


def test_new_checkpoints_keep_no_layout_in_the_model_settings(saved):
    _, written = saved
    assert not set(LAYOUT_KEYS) & set(written)
    assert ModelConfig.from_saved(written) == ModelConfig(**written)


def test_layout_keys_are_dropped():
    fields = saved_model_fields({"hidden_size": 32, **LAYOUT_KEYS})
    assert fields == {"hidden_size": 32}
    assert ModelConfig.from_saved({"hidden_size": 32, "num_attention_heads": 4, **LAYOUT_KEYS},
                                  seq_length=8).seq_length == 8


def test_merge_and_generate_load_it(saved, capsys):
    from megalite import generate
    from megalite.checkpoint import merge
    root, written = saved
    model, settings = merge.load_model(root)
    assert settings["model"]["tensor_model_parallel_size"] == 4          # read as saved, then ignored
    assert model.output_layer.weight.shape[0] == ModelConfig(**written).padded_vocab_size(1) == 64
    assert generate.main(["--load", root, "--max-new-tokens", "3", "--prompt", "1 2"]) == 0
    assert len(capsys.readouterr().out.split()) >= 3


def test_use_checkpoint_args_takes_the_model_and_not_the_layout(saved):
    from megalite.training.arguments import parse_args
    from megalite.training.saved_settings import checkpoint_model_defaults
    root, written = saved
    assert not set(LAYOUT_KEYS) & set(checkpoint_model_defaults(root))
    model, parallel, *_ = parse_args(["--mock-data", "--load", root, "--use-checkpoint-args",
                                      "--tensor-model-parallel-size", "2"], world_size=2)
    assert model == ModelConfig(**written)
    assert parallel.tensor_model_parallel_size == 2 and not parallel.sequence_parallel


def _load_run(rank, world_size, argv):
    from megalite.training.loop import setup
    try:
        setup(argv)
    except ValueError as error:
        return str(error)
    finally:
        from megalite.parallel import state
        if state.grid_is_initialized():
            state.destroy_grid()
    return None


@pytest.mark.parametrize("flags,message", [
    (["--apply-layernorm-1p"], "was trained with --apply-layernorm-1p False, this run has True"),
    (["--openai-gelu"], "was trained with --openai-gelu False, this run has True"),
    (["--norm-epsilon", "1e-6"], "was trained with --norm-epsilon 1e-05, this run has 1e-06"),
])
def test_weights_are_not_loaded_into_a_model_that_computes_something_else(saved, flags, message):
    """Same shapes, other math: without the check the run would load the weights and train another model."""
    root, _ = saved
    error = run_on_ranks(_load_run, 1, TINY + ["--load", root, "--train-iters", "2"] + flags, timeout=120)[0]
    assert error is not None and message in error and "(or --use-checkpoint-args)" in error, error
    assert run_on_ranks(_load_run, 1, TINY + ["--load", root, "--train-iters", "2"], timeout=120)[0] is None
