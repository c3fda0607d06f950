"""Bad input to examples/pretrain_gpt.py: one line on stderr naming the problem, non-zero exit, no traceback."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt.py")
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "1"]


def run_cli(*argv):
    # The checkout under test, not whichever megalite is installed.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, SCRIPT, *TINY, *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def assert_one_line_error(result, fragment):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pretrain_gpt.py: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_missing_data_path():
    assert_one_line_error(run_cli(), "--data-path is required")


def test_global_batch_not_divisible():
    assert_one_line_error(run_cli("--mock-data", "--global-batch-size", "7"),
                          "--global-batch-size 7 is not divisible by --micro-batch-size 2 x data-parallel size 1")


def test_nonexistent_dataset(tmp_path):
    assert_one_line_error(run_cli("--data-path", str(tmp_path / "nothing"), "--tokenizer-type", "NullTokenizer",
                                  "--vocab-size", "100"), "nothing")


def test_corrupt_and_truncated_idx(tmp_path):
    import numpy as np

    from megalite.data import indexed
    prefix = str(tmp_path / "corpus")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for doc in ([1, 2, 3, 4, 5], [6, 7, 8]):
        builder.add_item(np.array(doc))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    good = open(prefix + ".idx", "rb").read()
    flags = ("--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100")
    with open(prefix + ".idx", "wb") as f:
        f.write(b"NOTANIDX" + good[8:])
    assert_one_line_error(run_cli(*flags), "corpus.idx: bad magic")
    with open(prefix + ".idx", "wb") as f:
        f.write(good[: len(good) // 2])
    assert_one_line_error(run_cli(*flags), "corpus.idx: truncated index")


def test_vocab_file_that_does_not_parse(tmp_path):
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text("{this is not json")
    merges.write_text("#version: 0.2\n")
    assert_one_line_error(run_cli("--mock-data", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
                                  "--merge-file", str(merges)), "vocab.json is not valid JSON")


def test_unknown_flag():
    assert_one_line_error(run_cli("--mock-data", "--no-such-flag"), "unrecognized arguments: --no-such-flag")
