"""Small corpora and a small trained tokenizer, written once per test session."""
import numpy as np
import pytest

from megalite.data import train_tokenizer
from megalite.data.indexed import IndexedDatasetBuilder

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "emoji 😀 and CJK 中文 and <|endoftext|> spelled out",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
]


def write_corpus(prefix, num_docs, seed, max_len=60, vocab=1000):
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    docs = []
    for _ in range(num_docs):
        doc = rng.integers(0, vocab, int(rng.integers(1, max_len)))
        docs.append(doc)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return docs


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    """{name: (prefix, docs)} for two small corpora."""
    root = tmp_path_factory.mktemp("corpora")
    out = {}
    for name, n, seed in (("a", 120, 0), ("b", 70, 1)):
        prefix = str(root / name)
        out[name] = (prefix, write_corpus(prefix, n, seed))
    return out


def train_small_tokenizer(root) -> None:
    """megalite-train-tokenizer's byte-level BPE (300 ids) of a tiny corpus, into ``root``/out."""
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(CORPUS * 5):
        (corpus / f"doc{i}.py").write_text(text)
    train_tokenizer.main(["--input", str(corpus), "--pattern", "*.py", "--vocab-size", "300",
                          "--output-dir", str(root / "out")])


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A byte-level BPE trained by megalite-train-tokenizer on a tiny corpus: (vocab, merges)."""
    root = tmp_path_factory.mktemp("tok")
    train_small_tokenizer(root)
    return str(root / "out" / "vocab.json"), str(root / "out" / "merges.txt")
