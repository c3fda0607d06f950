"""Train a byte-level BPE tokenizer on local files, written in GPT-2's file format: ``megalite-train-tokenizer``.

Writes ``vocab.json`` and ``merges.txt`` (plus ``<|endoftext|>``) into --output-dir; load them with
``--tokenizer-type GPT2BPETokenizer --vocab-file DIR/vocab.json --merge-file DIR/merges.txt``
(TikTokenizer reads the same pair).  Training runs in the Rust ``tokenizers`` library (the ``data``
extra).  ``--skip-tables`` / ``--max-line-length`` leave out the same documents as ``megalite-preprocess``.

    megalite-train-tokenizer --input "$(python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \\
        --pattern "*.py" --skip-tables --vocab-size 4096 --output-dir data/tokenizer

(``python tools/train_tokenizer.py`` runs the same.)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from megalite.data.corpus import DocumentFilter, add_corpus_arguments, document_filter, find_files
from megalite.extras import require

ENDOFTEXT = "<|endoftext|>"
PROG = "megalite-train-tokenizer"


def read_texts(files, max_bytes: int | None, keep: DocumentFilter = DocumentFilter()):
    """Yield each file's text (undecodable bytes replaced) until max_bytes have been read; ``keep``
    leaves documents out (their bytes still count: max_bytes bounds the reading, not the training)."""
    used = 0
    for path in files:
        if max_bytes is not None and used >= max_bytes:
            return
        try:
            with open(path, "rb") as f:
                data = f.read() if max_bytes is None else f.read(max_bytes - used)
        except OSError as error:
            print(f"[train_tokenizer] skipping {path}: {error}", file=sys.stderr)
            continue
        used += len(data)
        text = data.decode("utf-8", errors="replace")
        if keep.reason_to_skip(text) is None:
            yield text


def train(files, vocab_size: int, output_dir: str, max_bytes: int | None = None, min_frequency: int = 2,
          keep: DocumentFilter = DocumentFilter()):
    tokenizers = require("tokenizers")
    Tokenizer, decoders, models = tokenizers.Tokenizer, tokenizers.decoders, tokenizers.models
    pre_tokenizers, trainers = tokenizers.pre_tokenizers, tokenizers.trainers

    if vocab_size < 257:
        raise ValueError(f"--vocab-size {vocab_size} is below 257 (256 bytes + {ENDOFTEXT})")
    tokenizer = Tokenizer(models.BPE())
    # GPT-2's split regex, no prefix space: the same pre-tokenizer as GPT2BPETokenizer.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[ENDOFTEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(read_texts(files, max_bytes, keep), trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.model.save(output_dir)  # vocab.json + merges.txt
    return os.path.join(output_dir, "vocab.json"), os.path.join(output_dir, "merges.txt")


def main(argv=None, prog: str = PROG) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(parser)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-bytes", type=int, default=None, help="stop reading after this many bytes")
    parser.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to merge")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        files = find_files(args.input, args.pattern, tuple(args.exclude))
        if not files:
            raise FileNotFoundError(f"no files match --pattern {args.pattern!r} under {args.input}")
        vocab, merges = train(files, args.vocab_size, args.output_dir, args.max_bytes, args.min_frequency,
                              document_filter(args))
    except (OSError, ValueError, ImportError) as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    print(f"[train_tokenizer] {len(files)} files -> {vocab}, {merges} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m megalite.data.train_tokenizer"))
