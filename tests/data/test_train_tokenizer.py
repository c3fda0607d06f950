"""megalite-train-tokenizer writes GPT-2-format files that both our BPE and tiktoken load."""
import json

import pytest

from megalite.data import train_tokenizer
from megalite.data.tokenizer import build_tokenizer

from .conftest import CORPUS


def test_trained_files_load_and_agree(small_tokenizer):
    vocab, merges = small_tokenizer
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    tik = build_tokenizer("TikTokenizer", vocab_file=vocab, merge_file=merges)
    assert ours.vocab_size == 300 and ours.eod == json.load(open(vocab))["<|endoftext|>"] == tik.eod
    assert open(merges).readline().startswith("#version")
    for text in CORPUS + ["unseen words ünïcödé\t\n  "]:
        ids = ours.encode(text)
        assert ids == tik.encode(text)
        assert ours.decode(ids) == text
        assert ours.eod not in ids
    assert len(ours.encode(CORPUS[1])) < len(CORPUS[1].encode()) / 2  # it learned merges


def test_no_matching_files_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train_tokenizer.main(["--input", str(tmp_path), "--pattern", "*.nothing", "--output-dir", str(tmp_path / "o")])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("megalite-train-tokenizer: error: no files match")
