"""Faults a checkpoint meets (flipped bits, truncation, deleted files, a deleted tracker, another run's
folder) and the silent failures of a reliability probe: each one is refused with one line naming the
file or the value, or handled as it should be."""
import json
import os

import numpy as np
import pytest

from megalite.checkpoint import paths
from megalite.checkpoint.manifest import MANIFEST, complete_iterations
from megalite.generate import main as generate_main
from megalite.parallel.testing import RankFailed, run_on_ranks

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--vocab-size", "64", "--make-vocab-size-divisible-by", "64",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--log-interval", "1000",
        "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0"]


def _train(rank, world_size, argv):
    from megalite.training.loop import pretrain
    return [(r["iteration"], r["loss"]) for r in pretrain(argv)]


def _saved_run(tmp_path, world_size=1, iters=4, interval=2, extra=()):
    save = str(tmp_path / "ckpt")
    argv = TINY + ["--train-iters", str(iters), "--save", save, "--save-interval", str(interval), *extra]
    history = run_on_ranks(_train, world_size, argv, timeout=120)[0]
    return save, history


def _resume(save, world_size=1, iters=6, extra=()):
    return run_on_ranks(_train, world_size, TINY + ["--train-iters", str(iters), "--load", save, *extra],
                        timeout=120)[0]


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    save, _ = _saved_run(tmp_path)
    assert complete_iterations(save) == [2, 4]
    manifest = json.loads(open(os.path.join(paths.iteration_dir(save, 4), MANIFEST)).read())
    assert sorted(manifest["files"]) == ["mp_rank_00_000/model_optim_rng.pt", "mp_rank_00_000/rng_dp000_cp000.pt",
                                         paths.TENSOR_INDEX]
    entry = manifest["files"]["mp_rank_00_000/model_optim_rng.pt"]
    path = os.path.join(paths.rank_dir(save, 4, 0, 0), "model_optim_rng.pt")
    assert entry["bytes"] == os.path.getsize(path) and entry["crc32"] > 0


@pytest.mark.parametrize("fault, message", [
    ("flip", "is corrupt: its CRC-32 does not match the manifest"),
    ("truncate", "is truncated"),
    ("delete", "is missing"),
])
def test_damaged_model_file_is_named(tmp_path, fault, message):
    save, _ = _saved_run(tmp_path)
    path = os.path.join(paths.rank_dir(save, 4, 0, 0), "model_optim_rng.pt")
    data = bytearray(open(path, "rb").read())
    if fault == "flip":      # 4 bytes in the middle: a weight, as in the probe (it loaded silently)
        data[len(data) // 2:len(data) // 2 + 4] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 4])
        open(path, "wb").write(data)
    elif fault == "truncate":
        open(path, "wb").write(data[:len(data) // 3])
    else:
        os.remove(path)
    with pytest.raises(RankFailed) as error:
        _resume(save)
    assert f"{path} {message}" in str(error.value)


def test_missing_rng_file_is_an_error_unless_no_load_rng(tmp_path):
    save, _ = _saved_run(tmp_path)
    os.remove(os.path.join(paths.rank_dir(save, 4, 0, 0), "rng_dp000_cp000.pt"))
    with pytest.raises(RankFailed, match="rng_dp000_cp000.pt is missing"):
        _resume(save)
    assert [i for i, _ in _resume(save, extra=["--no-load-rng"])] == [5, 6]


def test_a_fault_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    save, _ = _saved_run(tmp_path, world_size=2)
    os.remove(os.path.join(paths.rank_dir(save, 4, 0, 0), "rng_dp001_cp000.pt"))
    with pytest.raises(RankFailed) as error:
        _resume(save, world_size=2)
    text = str(error.value)
    assert "2 of 2 ranks failed" in text                      # rank 0 stops too, instead of waiting
    assert "rank 1: checkpoint file" in text and "rng_dp001_cp000.pt is missing" in text


def test_missing_tracker_resumes_from_the_newest_complete_iteration(tmp_path, capfd):
    save, straight = _saved_run(tmp_path, iters=6, interval=2)
    os.remove(os.path.join(save, paths.TRACKER_FILE))
    os.remove(os.path.join(paths.iteration_dir(save, 6), MANIFEST))   # iteration 6: interrupted mid-save
    resumed = _resume(save, iters=6, extra=["--save", save])
    assert "latest_checkpointed_iteration.txt is missing; resuming from the newest complete iteration, 4" in \
        capfd.readouterr().out
    assert resumed == straight[4:]                           # dropout off: the curve continues exactly
    assert paths.read_latest_iteration(save) == 6


def test_another_runs_iteration_is_never_overwritten(tmp_path):
    save, _ = _saved_run(tmp_path, iters=2)
    before = open(os.path.join(paths.rank_dir(save, 2, 0, 0), "model_optim_rng.pt"), "rb").read()
    settings = open(os.path.join(save, "config.yaml")).read()
    assert "seed: 1234" in settings
    with pytest.raises(RankFailed, match="iteration 2 there was written by another run"):
        run_on_ranks(_train, 1, TINY + ["--train-iters", "2", "--save", save, "--seed", "9"], timeout=120)
    assert open(os.path.join(paths.rank_dir(save, 2, 0, 0), "model_optim_rng.pt"), "rb").read() == before
    assert open(os.path.join(save, "config.yaml")).read() == settings    # nor its settings, at start or at save


def test_log_json_keeps_each_iteration_once_after_a_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    save, _ = _saved_run(tmp_path, iters=5, interval=3, extra=["--log-json", str(log)])
    # A crash after iteration 5 was logged but before it was saved: the tracker still says 3.
    os.remove(os.path.join(paths.iteration_dir(save, 5), MANIFEST))
    open(os.path.join(save, paths.TRACKER_FILE), "w").write("3")
    _resume(save, iters=5, extra=["--log-json", str(log)])
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_fp16_divergence_stops_with_an_error(tmp_path):
    argv = TINY + ["--train-iters", "20", "--fp16", "--lr", "1e6", "--initial-loss-scale", "4",
                   "--max-skipped-iterations-in-a-row", "3"]
    with pytest.raises(RankFailed, match="3 optimizer steps in a row .* were skipped for inf/nan gradients"):
        run_on_ranks(_train, 1, argv, timeout=120)


def _write_dataset(prefix, ids):
    from megalite.data.indexed import PythonIndexedDatasetBuilder
    builder = PythonIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in ids:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(prefix + ".idx")


def test_token_ids_past_the_vocabulary_are_refused(tmp_path):
    prefix = str(tmp_path / "data")
    rng = np.random.default_rng(0)
    _write_dataset(prefix, [rng.integers(0, 1100, 40) for _ in range(20)])  # ids up to 1099; NullTokenizer adds EOD
    argv = [a for a in TINY if a != "--mock-data"] + ["--train-iters", "1", "--data-path", prefix,
                                                       "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"]
    with pytest.raises(RankFailed, match=r"holds token id 10\d\d but the vocabulary has 1001 ids"):
        run_on_ranks(_train, 1, argv, timeout=120)


def test_generate_refuses_prompt_ids_outside_the_vocabulary(tmp_path, capsys):
    save, _ = _saved_run(tmp_path, iters=2)
    assert generate_main(["--load", save, "--prompt", "99999", "--max-new-tokens", "2"]) == 2
    assert "--prompt: token id 99999 is outside the model's vocabulary of 64 ids" in capsys.readouterr().err
    assert generate_main(["--load", save, "--prompt", "3 5", "--max-new-tokens", "2"]) == 0


def _train_until_sigterm(rank, world_size, argv, log):
    import signal
    import threading
    import time

    def preempt():  # the scheduler's notice, once two iterations are logged
        while not os.path.exists(log) or len(open(log).read().splitlines()) < 2:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
    if rank == 0:
        threading.Thread(target=preempt, daemon=True).start()
    from megalite.training.loop import pretrain
    return [r["iteration"] for r in pretrain(argv)]


def test_sigterm_saves_at_the_end_of_the_iteration_and_exits_cleanly(tmp_path):
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "log.jsonl")
    argv = TINY + ["--train-iters", "10000", "--save", save, "--exit-signal-handler", "--log-json", log]
    iterations = run_on_ranks(_train_until_sigterm, 2, argv, log, timeout=120)
    assert iterations[0] == iterations[1] and 2 <= len(iterations[0]) < 10000   # both ranks stopped together
    assert paths.read_latest_iteration(save) == iterations[0][-1]           # and saved where they stopped


def test_exit_duration_stops_and_saves(tmp_path):
    save = str(tmp_path / "ckpt")
    history = run_on_ranks(_train, 1, TINY + ["--train-iters", "10000", "--save", save,
                                              "--exit-duration-in-mins", "0.0001"], timeout=120)[0]
    assert len(history) == 1 and paths.read_latest_iteration(save) == 1


def _setup_output(rank, world_size, argv):
    import contextlib
    import io

    from megalite.parallel import state
    from megalite.training.loop import setup
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        setup(argv)
    state.destroy_grid()
    return out.getvalue()


def test_a_split_without_validation_data_says_evaluation_is_skipped(tmp_path):
    prefix = str(tmp_path / "data")
    rng = np.random.default_rng(0)
    _write_dataset(prefix, [rng.integers(0, 60, 40) for _ in range(20)])
    argv = [a for a in TINY if a != "--mock-data"]
    argv[argv.index("--eval-iters") + 1] = "2"
    argv += ["--train-iters", "1", "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "62",
             "--split", "100,0,0"]
    out = run_on_ranks(_setup_output, 1, argv, timeout=120)[0]
    assert "--split 100,0,0 gives no validation data: evaluation (--eval-iters 2) is skipped" in out


def test_the_save_load_idiom_starts_afresh_however_the_folder_is_spelled(tmp_path):
    save = str(tmp_path / "ckpt")
    history = run_on_ranks(_train, 1, TINY + ["--train-iters", "2", "--save", save, "--load", save + "/",
                                              "--save-interval", "2"], timeout=120)[0]
    assert [i for i, _ in history] == [1, 2] and os.path.isdir(paths.iteration_dir(save, 2))


def test_a_finished_run_restarted_does_not_save_its_last_iteration_again(tmp_path):
    save, _ = _saved_run(tmp_path, iters=2, interval=2)
    manifest = os.path.join(paths.iteration_dir(save, 2), MANIFEST)
    before = os.stat(manifest).st_mtime_ns
    again = run_on_ranks(_train, 1, TINY + ["--train-iters", "2", "--save", save, "--load", save], timeout=120)[0]
    assert again == [] and os.stat(manifest).st_mtime_ns == before
