import os
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools")
sys.path.insert(0, TOOLS)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "emoji 😀 and CJK 中文 and <|endoftext|> spelled out",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
]


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A byte-level BPE trained by tools/train_tokenizer.py on a tiny corpus: (vocab, merges)."""
    import train_tokenizer
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(CORPUS * 5):
        (corpus / f"doc{i}.py").write_text(text)
    train_tokenizer.main(["--input", str(corpus), "--pattern", "*.py", "--vocab-size", "300",
                          "--output-dir", str(root / "out")])
    return str(root / "out" / "vocab.json"), str(root / "out" / "merges.txt")
