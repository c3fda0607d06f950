"""Every path that opens a checkpoint reads it through checkpoint/reader.py: generation, conversion to
Hugging Face and --use-checkpoint-args refuse a bit-flipped file with the line training gives, and an
iteration without its manifest is incomplete (resume falls back to the newest complete one and says so)."""
import os

import pytest

from megalite.checkpoint import paths
from megalite.checkpoint.hf import main as convert_main
from megalite.checkpoint.manifest import MANIFEST
from megalite.checkpoint.reader import choose_iteration
from megalite.generate import main as generate_main
from megalite.parallel.testing import RankFailed, run_on_ranks
from megalite.training.arguments import parse_args
from tests.checkpoint.test_integrity import TINY, _train


@pytest.fixture
def saved(tmp_path):
    """Iterations 2 and 4 of a 4-iteration run, and the path of iteration 4's model file."""
    save = str(tmp_path / "ckpt")
    run_on_ranks(_train, 1, TINY + ["--train-iters", "4", "--save", save, "--save-interval", "2"], timeout=120)
    return save, os.path.join(paths.rank_dir(save, 4, 0, 0), "model_optim_rng.pt")


def flip(path):
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    open(path, "wb").write(data)


def test_training_generation_conversion_and_checkpoint_args_refuse_a_flipped_file_alike(saved, tmp_path, capsys):
    save, path = saved
    flip(path)
    line = f"checkpoint file {path} is corrupt: its CRC-32 does not match the manifest"
    with pytest.raises(RankFailed) as training:
        run_on_ranks(_train, 1, TINY + ["--train-iters", "6", "--load", save], timeout=120)
    assert line in str(training.value)
    assert generate_main(["--load", save, "--prompt", "1 2 3", "--max-new-tokens", "2"]) != 0
    assert line in capsys.readouterr().err
    assert convert_main(["--to", "hf", "--load", save, "--save", str(tmp_path / "hf")]) != 0
    assert line in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ValueError, match=line):
        parse_args(TINY + ["--load", save, "--use-checkpoint-args"], world_size=1)


def test_an_iteration_without_its_manifest_is_not_resumed(saved, capsys):
    save, path = saved
    os.remove(os.path.join(paths.iteration_dir(save, 4), MANIFEST))
    flip(path)                              # unverifiable: it must not be read at all
    resumed = run_on_ranks(_train, 1, TINY + ["--train-iters", "6", "--load", save], timeout=120)[0]
    assert [i for i, _ in resumed] == [3, 4, 5, 6]      # from iteration 2
    assert choose_iteration(save) == 2
    out = capsys.readouterr().out
    assert (f"iteration 4 of {save} has no {MANIFEST} (its save did not finish, or the manifest was removed); "
            f"resuming from the newest complete iteration, 2") in out


def test_generation_refuses_an_iteration_without_its_manifest(saved, capsys):
    save, _ = saved
    for iteration in (2, 4):
        os.remove(os.path.join(paths.iteration_dir(save, iteration), MANIFEST))
    assert generate_main(["--load", save, "--prompt", "1 2", "--max-new-tokens", "2"]) != 0
    err = capsys.readouterr().err
    assert f"--load {save} has iter_0000002, iter_0000004 but no iteration that finished saving" in err


def test_use_checkpoint_args_and_load_are_read_from_a_config_file_too(saved, tmp_path):
    save, _ = saved
    config = tmp_path / "run.yaml"
    config.write_text(f"load: {save}\nuse-checkpoint-args: true\n")
    model, *_ = parse_args(["--mock-data", "--config", str(config)], world_size=1)
    assert model.hidden_size == 32 and model.num_layers == 2      # the checkpoint's, not the defaults (64, 2)


def test_an_index_that_disagrees_with_its_files_is_named(saved):
    """A slice whose range is valid for its box but not the size of the saved tensor (the manifest rewritten to
    match, as a save of a different model under the same index would leave it)."""
    import json

    import torch

    from megalite.checkpoint.manifest import file_entry
    from megalite.checkpoint.merge import merge_checkpoint
    save, _ = saved
    folder = paths.iteration_dir(save, 4)
    index_path = os.path.join(folder, paths.TENSOR_INDEX)
    index = torch.load(index_path, weights_only=True)
    part = next(p for p in index["slices"] if p["kind"] == "param" and p["end"] > 1)
    part["end"] -= 1
    torch.save(index, index_path)
    manifest = json.load(open(os.path.join(folder, MANIFEST)))
    manifest["files"][paths.TENSOR_INDEX] = file_entry(index_path)
    json.dump(manifest, open(os.path.join(folder, MANIFEST), "w"))
    with pytest.raises(ValueError, match=f"its index says {part['end']} \\({part['name']}\\); the index does not "
                                         f"match the files"):
        merge_checkpoint(save)
