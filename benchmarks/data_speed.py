"""Data pipeline benchmarks, megalite beside a peer in one run; prints a table with ratios.

    python -m benchmarks.data_speed                 # defaults: 50M tokens, 20 MB of JSONL
    python -m benchmarks.data_speed --tokens 5e6 --jsonl-mb 5

Rows: builder vs megatron-core's IndexedDatasetBuilder.add_document (when installed); sample
index vs megatron-core's C++ helper; preprocessing (2 workers, shard per worker) vs a pool that
pickles token lists back to a single writer (Megatron's preprocess_data.py design), same tokenizer
and cores, once with our C++ GPT-2 BPE and once with tiktoken; our GPT-2 BPE (C++, and the
pure-Python reference) vs tiktoken.  ratio = peer time / megalite time (> 1: megalite is faster).
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import platform
import sysconfig
import tempfile
import time

import numpy as np

from benchmarks.side_by_side import alternating
from megalite.data import helpers
from megalite.data.indexed import IndexedDatasetBuilder, native_data_module
from megalite.data.tokenizer import GPT2BPETokenizer, build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def bench_builder(tmp, num_tokens, rounds):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, 1000).astype(np.int64) for _ in range(int(num_tokens) // 1000)]
    mc = megatron_core("indexed_dataset")
    if mc is None:
        return ("builder, add_document", timed(lambda: write_ours(os.path.join(tmp, "ours"), docs)), None)
    import torch
    tensors = [torch.from_numpy(d) for d in docs]

    def write_theirs():
        builder = mc.IndexedDatasetBuilder(os.path.join(tmp, "theirs.bin"), dtype=np.uint16)
        for t in tensors:
            builder.add_document(t, [len(t)])
        builder.finalize(os.path.join(tmp, "theirs.idx"))
    ours, theirs = alternating([lambda: write_ours(os.path.join(tmp, "ours"), docs), write_theirs], rounds)
    return (f"builder, add_document ({num_tokens / 1e6:.0f}M tokens)", ours, theirs)


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


def _pool_encode(line):
    """A pool worker's job in the single-writer design: parse one JSON line, return its ids."""
    ids = _POOL_TOKENIZER.encode(json.loads(line)["text"])
    ids.append(_POOL_TOKENIZER.eod)
    return ids


def single_writer(jsonl, prefix, workers, tokenizer_type):
    """The classic design: the parent reads lines, a pool parses and tokenizes them and pickles the
    token lists back, and the parent writes every document through one builder."""
    global _POOL_TOKENIZER
    _POOL_TOKENIZER = build_tokenizer(tokenizer_type, vocab_file=os.path.join(GPT2, "encoder.json"),
                                      merge_file=os.path.join(GPT2, "vocab.bpe"))
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    with open(jsonl, encoding="utf-8") as f, mp.get_context("fork").Pool(workers) as pool:
        for ids in pool.imap(_pool_encode, f, chunksize=32):
            builder.add_document(np.asarray(ids, np.uint16), [len(ids)])
    builder.finalize(prefix + ".idx")


def write_jsonl(path, megabytes):
    texts = stdlib_texts(2_000_000)
    with open(path, "w") as f:
        written, i = 0, 0
        while written < megabytes * 1e6:
            line = json.dumps({"text": texts[i % len(texts)]}) + "\n"
            f.write(line)
            written += len(line)
            i += 1
    return written


def bench_preprocess(tmp, jsonl, written, tokenizer_type, label, rounds):
    from megalite.data import preprocess as preprocess_data
    _, args = preprocess_data.parse_args(["--input", jsonl, "--output-prefix", os.path.join(tmp, "pp"),
                                          "--tokenizer-type", tokenizer_type,
                                          "--vocab-file", os.path.join(GPT2, "encoder.json"),
                                          "--merge-file", os.path.join(GPT2, "vocab.bpe"), "--append-eod",
                                          "--workers", "2", "--quiet", "--overwrite"])
    ours, theirs = alternating([lambda: preprocess_data.preprocess(args),
                                lambda: single_writer(jsonl, os.path.join(tmp, "sw"), 2, tokenizer_type)], rounds)
    same = open(os.path.join(tmp, "pp.bin"), "rb").read() == open(os.path.join(tmp, "sw.bin"), "rb").read()
    return (f"preprocess {written / 1e6:.0f} MB JSONL, 2 workers, {label}{'' if same else ' (OUTPUTS DIFFER)'}",
            ours, theirs, f"{written / 1e6 / ours:.1f} vs {written / 1e6 / theirs:.1f} MB/s")


def bench_tokenizer(native):
    text = "".join(stdlib_texts(1_000_000 if not native else 5_000_000))
    ours = GPT2BPETokenizer(os.path.join(GPT2, "encoder.json"), os.path.join(GPT2, "vocab.bpe"), native=native)
    tik = build_tokenizer("TikTokenizer", vocab_file=os.path.join(GPT2, "encoder.json"),
                          merge_file=os.path.join(GPT2, "vocab.bpe"))
    repeat = 3 if native else 1  # best of 3: the first pass also fills our piece cache
    t_ours = timed(lambda: ours.encode(text), repeat)
    t_tik = timed(lambda: tik.encode(text), repeat)
    kind = "C++" if native else "pure Python"
    return (f"GPT-2 BPE encode, {len(text) / 1e6:.1f} MB stdlib ({kind} vs tiktoken)", t_ours, t_tik,
            f"{len(text) / 1e6 / t_ours:.2f} vs {len(text) / 1e6 / t_tik:.1f} MB/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=50e6)
    parser.add_argument("--jsonl-mb", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3,
                        help="builder and preprocessing: median of this many alternating rounds")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, numpy {np.__version__}, "
          f"megatron-core {'installed' if megatron_core('helpers') else 'not installed'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(bench_builder(tmp, args.tokens, args.rounds))
        rows.append(bench_sample_idx(args.tokens))
        if os.path.exists(os.path.join(GPT2, "vocab.bpe")):
            jsonl = os.path.join(tmp, "corpus.jsonl")
            written = write_jsonl(jsonl, args.jsonl_mb)
            if native_data_module() is not None:
                rows.append(bench_preprocess(tmp, jsonl, written, "GPT2BPETokenizer", "our C++ BPE",
                                             args.rounds))
            rows.append(bench_preprocess(tmp, jsonl, written, "TikTokenizer", "tiktoken", args.rounds))
            if native_data_module() is not None:
                rows.append(bench_tokenizer(native=True))
            rows.append(bench_tokenizer(native=False))
    print(f"{'what':<62} {'megalite':>10} {'peer':>10} {'ratio':>7}  note")
    for row in rows:
        what, ours, theirs, *note = row
        peer = f"{theirs:9.3f}s" if theirs is not None else "       n/a"
        ratio = f"{theirs / ours:6.2f}x" if theirs is not None else "    n/a"
        print(f"{what:<62} {ours:9.3f}s {peer} {ratio}  {note[0] if note else ''}")


if __name__ == "__main__":
    main()
