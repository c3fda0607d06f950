"""Small corpora written once per test session."""
import numpy as np
import pytest

from megalite.data.indexed import IndexedDatasetBuilder


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
