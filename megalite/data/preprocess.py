"""Tokenize a corpus into a Megatron-compatible ``<output-prefix>.bin`` / ``.idx`` pair: ``megalite-preprocess``.

Inputs: JSONL (``.jsonl``, ``.json``), gzipped JSONL (``.jsonl.gz``), or plain text files and
folders where each file is one document (``--pattern '*.py'`` picks files inside folders).

Design: the inputs are cut, in order, into ``--workers`` shares of about equal bytes; each worker
tokenizes its share and writes its own shard with the native builder (no token lists are pickled
back to one writer); the shards are then concatenated in order (``add_index``), so the output is
the same for any number of workers.  Everything is written under temporary names and renamed
into place only when complete.  Bad lines (invalid JSON, a missing key, bytes that are not UTF-8)
are skipped, counted and listed with their line numbers; ``--strict`` makes them fatal.
Documents that ``--skip-tables`` / ``--max-line-length`` leave out are counted by reason.

    megalite-preprocess --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2/encoder.json --merge-file gpt2/vocab.bpe \\
        --append-eod --workers 2

(``python tools/preprocess_data.py``, Megatron's name, runs the same.)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections import Counter

from megalite.data.corpus import add_corpus_arguments, document_filter, find_files, iter_documents, plan_work
from megalite.data.indexed import IndexedDatasetBuilder, best_token_dtype, bin_path_of, idx_path_of
from megalite.data.tokenizer import TOKENIZER_TYPES, build_fast_tokenizer
from megalite.extras import require

PROG = "megalite-preprocess"

MAX_LISTED_PROBLEMS = 20


def tokenizer_files(args) -> dict:
    return dict(vocab_file=args.vocab_file, merge_file=args.merge_file, tokenizer_model=args.tokenizer_model,
                vocab_size=args.vocab_size)


def worker(rank, units, args, tokenizer, shard_prefix, dtype, progress, result_queue):
    """Tokenize one share into <shard_prefix>.bin/.idx; report (rank, stats) on result_queue.
    Workers are forked, so they share the parent's tokenizer instead of building their own."""
    try:
        builder = IndexedDatasetBuilder(bin_path_of(shard_prefix), dtype)
        problems, docs, tokens, empty, left_out = [], 0, 0, 0, Counter()
        keep = document_filter(args)
        for unit in units:
            for _, text in iter_documents(unit, args.json_keys, problems):
                reason = keep.reason_to_skip(text)
                if reason is not None:
                    left_out[reason] += 1
                    continue
                ids = tokenizer.encode_array(text, args.append_eod)  # int32; the builder narrows it
                if not len(ids):
                    empty += 1  # an empty document has no tokens to learn from: skipped, counted
                    continue
                builder.add_document(ids, [len(ids)])
                docs += 1
                tokens += len(ids)
                progress[2 * rank] = docs
            progress[2 * rank + 1] += unit.size
            if args.strict and problems:
                break
        builder.finalize(idx_path_of(shard_prefix))
        result_queue.put((rank, {"docs": docs, "tokens": tokens, "empty": empty, "left_out": left_out,
                                 "problems": problems}))
    except BaseException as error:  # reported to the parent, which fails the run with it
        result_queue.put((rank, {"error": f"{type(error).__name__}: {error}"}))


def show_progress(progress, num_workers, total_bytes, start, bar):
    docs = sum(progress[2 * r] for r in range(num_workers))
    done = sum(progress[2 * r + 1] for r in range(num_workers))
    elapsed = max(time.perf_counter() - start, 1e-9)
    rate = done / elapsed
    eta = (total_bytes - done) / rate if rate > 0 else float("inf")
    bar.n = done
    bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s, {rate / 1e6:.1f} MB/s, ETA {eta:.0f} s", refresh=False)
    bar.refresh()


def preprocess(args) -> dict:
    files = _check_inputs(args)
    tokenizer = build_fast_tokenizer(args.tokenizer_type, **tokenizer_files(args))  # fail early on bad files
    dtype = best_token_dtype(tokenizer.vocab_size)
    shares = [s for s in plan_work(files, args.workers) if s]
    total_bytes = sum(u.size for share in shares for u in share)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    temporary = f"{args.output_prefix}.tmp-{os.getpid()}"
    tqdm = require("tqdm").tqdm  # a missing extra fails before any worker starts
    shard_prefixes = [f"{temporary}-shard{r}" for r in range(len(shares))]
    start = time.perf_counter()
    try:
        stats = _run_workers(args, shares, tokenizer, shard_prefixes, dtype, total_bytes, start, tqdm)
        problems = _problems(stats, args.strict)
        _merge_shards(shard_prefixes, temporary, dtype, args.output_prefix)
    finally:
        _remove_datasets(shard_prefixes + [temporary])
    return _summary(files, stats, problems, total_bytes, time.perf_counter() - start)


def _check_inputs(args) -> list:
    """The input files; refuses an existing output (without --overwrite), a bad filter or no input."""
    existing = [p for p in (bin_path_of(args.output_prefix), idx_path_of(args.output_prefix)) if os.path.exists(p)]
    if existing and not args.overwrite:
        raise FileExistsError(f"--output-prefix {args.output_prefix}: {' and '.join(existing)} exist already; pass "
                              f"--overwrite to replace them, or choose another prefix")
    document_filter(args)  # a bad --max-line-length fails here, not in every worker
    files = find_files(args.input, args.pattern, tuple(args.exclude))
    if not files:
        raise FileNotFoundError(f"no input files match --pattern {args.pattern!r} under {args.input}")
    return files


def _run_workers(args, shares, tokenizer, shard_prefixes, dtype, total_bytes, start, tqdm) -> dict:
    """Each share tokenized into its shard by a forked worker, with a progress bar: rank -> the worker's
    stats.  A worker that died or reported an error fails the run."""
    context = mp.get_context("fork")
    progress = context.Array("q", 2 * len(shares), lock=False)  # per worker: docs, bytes done
    results = context.Queue()
    processes = [context.Process(target=worker,
                                 args=(r, share, args, tokenizer, shard_prefixes[r], dtype, progress, results),
                                 daemon=True) for r, share in enumerate(shares)]
    stats = {}
    try:
        for p in processes:
            p.start()
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr,
                  disable=args.quiet, mininterval=0.5) as bar:
            while len(stats) < len(processes):
                try:
                    rank, result = results.get(timeout=0.5)
                    stats[rank] = result
                except Exception:  # queue.Empty: nobody finished yet
                    if any(p.exitcode not in (None, 0) for p in processes):
                        raise RuntimeError("a preprocessing worker died; see its error above") from None
                show_progress(progress, len(shares), total_bytes, start, bar)
            show_progress(progress, len(shares), total_bytes, start, bar)
        for p in processes:
            p.join()
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
    errors = [f"worker {r}: {s['error']}" for r, s in sorted(stats.items()) if "error" in s]
    if errors:
        raise RuntimeError("; ".join(errors))
    return stats


def _problems(stats: dict, strict: bool) -> list:
    """The bad lines the workers skipped, in input order; under --strict the first one is an error."""
    problems = [p for r in sorted(stats) for p in stats[r]["problems"]]
    if strict and problems:
        path, line, reason = problems[0]
        where = f"{path}:{line}" if line else path
        raise ValueError(f"{where}: {reason} (--strict; drop --strict to skip bad lines)")
    return problems


def _merge_shards(shard_prefixes, temporary: str, dtype, output_prefix: str) -> None:
    """The shards concatenated in order under ``temporary``, then renamed to ``output_prefix``."""
    builder = IndexedDatasetBuilder(bin_path_of(temporary), dtype)
    for prefix in shard_prefixes:
        builder.add_index(prefix)
    builder.finalize(idx_path_of(temporary))
    # The .idx appears last: a reader never sees an index without its data.
    os.replace(bin_path_of(temporary), bin_path_of(output_prefix))
    os.replace(idx_path_of(temporary), idx_path_of(output_prefix))


def _remove_datasets(prefixes) -> None:
    """Delete whatever .bin/.idx files of ``prefixes`` exist (shards, an unfinished output)."""
    for prefix in prefixes:
        for path in (bin_path_of(prefix), idx_path_of(prefix)):
            if os.path.exists(path):
                os.remove(path)


def _summary(files, stats: dict, problems: list, total_bytes: int, seconds: float) -> dict:
    return {"files": len(files), "docs": sum(s["docs"] for s in stats.values()),
            "tokens": sum(s["tokens"] for s in stats.values()), "empty": sum(s["empty"] for s in stats.values()),
            "left_out": sum((s["left_out"] for s in stats.values()), Counter()),
            "problems": problems, "bytes": total_bytes, "seconds": seconds}


def report(summary, args):
    s = summary
    print(f"[preprocess] {s['files']} files, {s['docs']:,} documents, {s['tokens']:,} tokens, "
          f"{s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s ({s['docs'] / s['seconds']:,.0f} docs/s, "
          f"{s['bytes'] / 1e6 / s['seconds']:.1f} MB/s) -> {args.output_prefix}.bin/.idx")
    if s["empty"]:
        print(f"[preprocess] skipped {s['empty']} empty documents (no tokens)")
    if s["left_out"]:
        reasons = ", ".join(f"{count} for a {reason}" for reason, count in sorted(s["left_out"].items()))
        print(f"[preprocess] left out {sum(s['left_out'].values())} documents ({reasons})")
    if s["problems"]:
        print(f"[preprocess] skipped {len(s['problems'])} bad lines:")
        for path, line, reason in s["problems"][:MAX_LISTED_PROBLEMS]:
            print(f"  {path}:{line}: {reason}" if line else f"  {path}: {reason}")
        if len(s["problems"]) > MAX_LISTED_PROBLEMS:
            print(f"  ... and {len(s['problems']) - MAX_LISTED_PROBLEMS} more")


def parse_args(argv=None, prog: str = PROG):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(parser)
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=TOKENIZER_TYPES)
    parser.add_argument("--vocab-file")
    parser.add_argument("--merge-file")
    parser.add_argument("--tokenizer-model", help="tokenizer.json for HuggingFaceTokenizer")
    parser.add_argument("--vocab-size", type=int, help="for NullTokenizer")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-prefix dataset")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers} must be at least 1")
    return parser, args


def main(argv=None, prog: str = PROG) -> int:
    parser, args = parse_args(argv, prog)
    try:
        summary = preprocess(args)
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        parser.exit(2, f"{prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{prog}: interrupted; no output was written\n")
    report(summary, args)
    if summary["docs"] == 0:
        print(f"{prog}: warning: no document had any text, so {args.output_prefix}.bin/.idx hold an empty dataset; "
              f"check --input, --pattern and --json-keys", file=sys.stderr)
        return 2 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m megalite.data.preprocess"))
