"""megalite-preprocess: formats, sharded workers, bad lines, left-out documents, atomic output."""
import gzip
import json
import os

import numpy as np
import pytest

from megalite.data import preprocess
from megalite.data.indexed import IndexedDataset
from megalite.data.tokenizer import build_tokenizer


def run(inputs, prefix, tokenizer, *extra):
    vocab, merges = tokenizer
    preprocess.main(["--input", *inputs, "--output-prefix", prefix, "--vocab-file", vocab,
                          "--merge-file", merges, "--quiet", *extra])
    return IndexedDataset(prefix)


def write_jsonl(path, texts, bad=()):
    """bad: {line number: raw bytes} inserted at those 1-based line numbers."""
    lines, texts = [], list(texts)
    for number in range(1, len(texts) + len(bad) + 1):
        lines.append(bad[number] if number in bad else json.dumps({"text": texts.pop(0)}).encode())
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


TEXTS = [f"document {i}: " + "words and more words " * (i % 7) for i in range(300)]


def test_jsonl_workers_give_identical_output_and_report_bad_lines(tmp_path, small_tokenizer, capsys):
    bad = {3: b'{"text": broken', 10: b'{"other": "no text key"}', 20: b'{"text": "caf\xe9"}', 25: b'["a list"]'}
    write_jsonl(tmp_path / "in.jsonl", TEXTS, bad)
    one = run([str(tmp_path / "in.jsonl")], str(tmp_path / "w1"), small_tokenizer, "--append-eod")
    report = capsys.readouterr().out
    two = run([str(tmp_path / "in.jsonl")], str(tmp_path / "w2"), small_tokenizer, "--append-eod", "--workers", "2")
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"w1{ext}", "rb").read() == open(tmp_path / f"w2{ext}", "rb").read()
    assert one.num_documents == len(TEXTS) == two.num_documents
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=small_tokenizer[0], merge_file=small_tokenizer[1])
    for i in (0, 1, 150, 299):
        ids = two[i]
        assert ids[-1] == tok.eod and tok.decode(ids[:-1]) == TEXTS[i]
    assert one.dtype == np.uint16
    assert "skipped 4 bad lines" in report
    for line, reason in ((3, "invalid JSON"), (10, "no string under key 'text'"), (20, "not UTF-8"),
                         (25, "not a JSON object")):
        assert f"in.jsonl:{line}: {reason}" in report
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "w1.bin", "w1.idx", "w2.bin", "w2.idx"]  # no leftovers


def test_gzip_folder_pattern_and_plain_text(tmp_path, small_tokenizer):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": t, "title": "T"}) for t in TEXTS[:5]) + "\n")
    ds = run([str(tmp_path / "a.jsonl.gz")], str(tmp_path / "gz"), small_tokenizer, "--json-keys", "text", "title")
    assert ds.num_documents == 10  # each key is its own document
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "one.py").write_text("x = 1\n")
    (src / "pkg" / "two.py").write_text("y = 2\n")
    (src / "notes.md").write_text("not python")
    (src / "empty.py").write_text("")
    ds = run([str(src)], str(tmp_path / "py"), small_tokenizer, "--pattern", "*.py")
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=small_tokenizer[0], merge_file=small_tokenizer[1])
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["x = 1\n", "y = 2\n"]  # the empty file is skipped


def test_strict_fails_on_a_bad_line_and_writes_nothing(tmp_path, small_tokenizer, capsys):
    write_jsonl(tmp_path / "in.jsonl", TEXTS[:20], {7: b"not json"})
    with pytest.raises(SystemExit) as info:
        run([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), small_tokenizer, "--strict", "--workers", "2")
    assert info.value.code == 2 and "in.jsonl:7: invalid JSON" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_a_failing_run_leaves_no_output(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", ["1 2 3", "4 5", "oops not ids", "7"])
    with pytest.raises(SystemExit):
        preprocess.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"),
                         "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--quiet"])
    assert "ValueError" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_left_out_documents_are_counted_by_reason(tmp_path, small_tokenizer, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "code.py").write_text("def f(x):\n    return x + 1\n")
    (src / "table.py").write_text("".join(f"    '\\x{i:02x}'  # 0x{i:02X} -> CHAR {i}\n" for i in range(40)))
    (src / "minified.py").write_text("x = [" + "1, " * 200 + "]\n")
    ds = run([str(src)], str(tmp_path / "out"), small_tokenizer, "--pattern", "*.py", "--skip-tables",
             "--max-line-length", "200")
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=small_tokenizer[0], merge_file=small_tokenizer[1])
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["def f(x):\n    return x + 1\n"]
    assert "left out 2 documents (1 for a long line, 1 for a table)" in capsys.readouterr().out


def test_bad_max_line_length_names_the_flag(tmp_path, small_tokenizer, capsys):
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(SystemExit) as info:
        run([str(tmp_path / "a.py")], str(tmp_path / "out"), small_tokenizer, "--max-line-length", "0")
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("megalite-preprocess: error: --max-line-length 0 must be at least 1")


def test_an_existing_dataset_is_not_overwritten_without_overwrite(tmp_path, small_tokenizer, capsys):
    write_jsonl(tmp_path / "in.jsonl", TEXTS[:5])
    prefix = str(tmp_path / "out")
    first = len(run([str(tmp_path / "in.jsonl")], prefix, small_tokenizer))
    write_jsonl(tmp_path / "in.jsonl", TEXTS[:8])
    with pytest.raises(SystemExit) as info:
        run([str(tmp_path / "in.jsonl")], prefix, small_tokenizer)
    assert info.value.code == 2 and "exist already; pass --overwrite" in capsys.readouterr().err
    assert len(IndexedDataset(prefix)) == first == 5                      # untouched
    assert len(run([str(tmp_path / "in.jsonl")], prefix, small_tokenizer, "--overwrite")) == 8


def test_zero_documents_warn_and_fail_under_strict(tmp_path, small_tokenizer, capsys):
    write_jsonl(tmp_path / "in.jsonl", [""] * 3)
    vocab, merges = small_tokenizer
    argv = ["--input", str(tmp_path / "in.jsonl"), "--vocab-file", vocab, "--merge-file", merges, "--quiet"]
    assert preprocess.main(argv + ["--output-prefix", str(tmp_path / "a")]) == 0
    assert "warning: no document had any text" in capsys.readouterr().err
    assert preprocess.main(argv + ["--output-prefix", str(tmp_path / "b"), "--strict"]) == 2
