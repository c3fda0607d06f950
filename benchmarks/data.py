"""Data pipeline benchmarks, megalite beside a peer in one run; prints a table with ratios.

    python benchmarks/data.py                 # defaults: 50M tokens, 20 MB of JSONL
    python benchmarks/data.py --tokens 5e6 --jsonl-mb 5

Rows: builder vs megatron-core's IndexedDatasetBuilder.add_document (when installed); sample
index vs megatron-core's C++ helper; preprocessing (2 workers, shard per worker) vs a pool that
pickles token lists back to a single writer, same tokenizer and cores; our pure-Python GPT-2 BPE
vs tiktoken.  ratio = peer time / megalite time (> 1: megalite is faster).
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import platform
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import numpy as np  # noqa: E402

from megalite.data import helpers  # noqa: E402
from megalite.data.indexed import IndexedDatasetBuilder  # noqa: E402
from megalite.data.tokenizer import build_tokenizer  # noqa: E402

GPT2 = os.path.join(ROOT, ".cache", "gpt2")


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def megatron_core(module):
    try:
        return __import__(f"megatron.core.datasets.{module}", fromlist=["_"])
    except Exception:
        return None


def bench_builder(tmp, num_tokens):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, 1000).astype(np.int64) for _ in range(int(num_tokens) // 1000)]
    ours = timed(lambda: write_ours(os.path.join(tmp, "ours"), docs))
    mc = megatron_core("indexed_dataset")
    if mc is None:
        return ("builder, add_document", ours, None)
    import torch
    tensors = [torch.from_numpy(d) for d in docs]

    def write_theirs():
        builder = mc.IndexedDatasetBuilder(os.path.join(tmp, "theirs.bin"), dtype=np.uint16)
        for t in tensors:
            builder.add_document(t, [len(t)])
        builder.finalize(os.path.join(tmp, "theirs.idx"))
    return (f"builder, add_document ({num_tokens / 1e6:.0f}M tokens)", ours, timed(write_theirs))


def write_ours(prefix, docs):
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(prefix + ".idx")


def bench_sample_idx(num_tokens):
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 2000, int(num_tokens) // 1000).astype(np.int32)
    document_index = np.tile(np.arange(len(sizes), dtype=np.int32), 3)
    rng.shuffle(document_index)
    tokens = int(sizes.sum())
    ours = timed(lambda: helpers.build_sample_idx(sizes, document_index, 128, 3, tokens), repeat=3)
    mc = megatron_core("helpers")
    theirs = None if mc is None else timed(
        lambda: mc.build_sample_idx(sizes, document_index, 128, 3, tokens, True, True), repeat=3)
    return (f"build_sample_idx ({3 * tokens / 1e6:.0f}M tokens, seq 128)", ours, theirs)


def stdlib_texts(max_bytes):
    texts, used = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        text = open(path, encoding="utf-8", errors="replace").read()
        texts.append(text)
        used += len(text)
        if used >= max_bytes:
            break
    return texts


_POOL_TOKENIZER = None


def _pool_encode(text):
    ids = _POOL_TOKENIZER.encode(text)
    ids.append(_POOL_TOKENIZER.eod)
    return ids


def single_writer(jsonl, prefix, workers):
    """The classic design: a pool tokenizes, pickles token lists to the parent, which writes."""
    global _POOL_TOKENIZER
    _POOL_TOKENIZER = build_tokenizer("TikTokenizer", vocab_file=os.path.join(GPT2, "encoder.json"),
                                      merge_file=os.path.join(GPT2, "vocab.bpe"))
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    with open(jsonl, encoding="utf-8") as f, mp.get_context("fork").Pool(workers) as pool:
        texts = (json.loads(line)["text"] for line in f)
        for ids in pool.imap(_pool_encode, texts, chunksize=32):
            builder.add_document(np.asarray(ids, np.uint16), [len(ids)])
    builder.finalize(prefix + ".idx")


def bench_preprocess(tmp, megabytes):
    texts = stdlib_texts(2_000_000)
    jsonl = os.path.join(tmp, "corpus.jsonl")
    with open(jsonl, "w") as f:
        written, i = 0, 0
        while written < megabytes * 1e6:
            line = json.dumps({"text": texts[i % len(texts)]}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    import preprocess_data
    _, args = preprocess_data.parse_args(["--input", jsonl, "--output-prefix", os.path.join(tmp, "pp"),
                                          "--vocab-file", os.path.join(GPT2, "encoder.json"),
                                          "--merge-file", os.path.join(GPT2, "vocab.bpe"), "--append-eod",
                                          "--workers", "2", "--quiet"])
    ours = timed(lambda: preprocess_data.preprocess(args))
    theirs = timed(lambda: single_writer(jsonl, os.path.join(tmp, "sw"), 2))
    same = open(os.path.join(tmp, "pp.bin"), "rb").read() == open(os.path.join(tmp, "sw.bin"), "rb").read()
    return (f"preprocess {written / 1e6:.0f} MB JSONL, 2 workers{'' if same else ' (OUTPUTS DIFFER)'}",
            ours, theirs, f"{written / 1e6 / ours:.1f} vs {written / 1e6 / theirs:.1f} MB/s")


def bench_tokenizer():
    text = "".join(stdlib_texts(1_000_000))
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=os.path.join(GPT2, "encoder.json"),
                           merge_file=os.path.join(GPT2, "vocab.bpe"))
    tik = build_tokenizer("TikTokenizer", vocab_file=os.path.join(GPT2, "encoder.json"),
                          merge_file=os.path.join(GPT2, "vocab.bpe"))
    t_ours = timed(lambda: ours.encode(text))
    t_tik = timed(lambda: tik.encode(text))
    return (f"GPT-2 BPE encode, {len(text) / 1e6:.1f} MB stdlib (pure Python vs tiktoken)", t_ours, t_tik,
            f"{len(text) / 1e6 / t_ours:.2f} vs {len(text) / 1e6 / t_tik:.1f} MB/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=50e6)
    parser.add_argument("--jsonl-mb", type=float, default=20)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}, "
          f"megatron-core {'installed' if megatron_core('helpers') else 'not installed'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(bench_builder(tmp, args.tokens))
        rows.append(bench_sample_idx(args.tokens))
        if os.path.exists(os.path.join(GPT2, "vocab.bpe")):
            rows.append(bench_preprocess(tmp, args.jsonl_mb))
            rows.append(bench_tokenizer())
    print(f"{'what':<62} {'megalite':>10} {'peer':>10} {'ratio':>7}  note")
    for row in rows:
        what, ours, theirs, *note = row
        peer = f"{theirs:9.3f}s" if theirs is not None else "       n/a"
        ratio = f"{theirs / ours:6.2f}x" if theirs is not None else "    n/a"
        print(f"{what:<62} {ours:9.3f}s {peer} {ratio}  {note[0] if note else ''}")


if __name__ == "__main__":
    main()
