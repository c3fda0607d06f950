"""tools/merge_datasets.py: concatenating datasets equals preprocessing the concatenated corpus."""
import json
import os

import pytest

from megalite.data import preprocess
from megalite.data.indexed import IndexedDatasetError
from tools import merge_datasets


def null_preprocess(texts, prefix, vocab_size=100):
    """Ids written as text, tokenized by NullTokenizer (no tokenizer files needed)."""
    with open(prefix + ".jsonl", "w") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess.main(["--input", prefix + ".jsonl", "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
                     "--vocab-size", str(vocab_size), "--quiet"])


def test_merge_datasets(tmp_path):
    texts = [" ".join(str((7 * i + j) % 90) for j in range(1 + i % 5)) for i in range(25)]
    null_preprocess(texts[:10], str(tmp_path / "a"))
    null_preprocess(texts[10:], str(tmp_path / "b"))
    null_preprocess(texts, str(tmp_path / "all"))
    merge_datasets.main(["--input", str(tmp_path / "a"), str(tmp_path / "b"), "--output-prefix", str(tmp_path / "m")])
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"m{ext}", "rb").read() == open(tmp_path / f"all{ext}", "rb").read()
    null_preprocess(["1 2 3"], str(tmp_path / "wide"), vocab_size=70000)
    with pytest.raises(IndexedDatasetError, match="wide.idx: token dtype int32"):
        merge_datasets.merge([str(tmp_path / "a"), str(tmp_path / "wide")], str(tmp_path / "bad"))
    assert not any(n.startswith("bad") for n in os.listdir(tmp_path))
