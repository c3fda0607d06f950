"""Reading raw corpora: finding files, and cutting them into documents for preprocessing.

Formats: ``.jsonl`` / ``.json`` (one JSON object per line, text under --json-keys), the same
gzipped (``.jsonl.gz``), and any other file as plain text where the whole file is one document
(a ``.py`` or ``.txt`` file).  Large JSONL files are cut into byte ranges at line boundaries so
several workers share one file while the output keeps the input's order.  A :class:`DocumentFilter`
leaves out documents that are data rather than text: generated tables and very long lines.
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

DEFAULT_EXCLUDE = ("site-packages", "__pycache__", ".git")

# A hex number or a code-point escape: what every line of a generated table holds (the
# encodings/cp*.py charmaps, html/entities.py, stringprep.py) and few lines of written code do.
TABLE_LITERAL = re.compile(r"0x[0-9A-Fa-f]+|\\x[0-9A-Fa-f]{2}|\\u[0-9A-Fa-f]{4}|\\U[0-9A-Fa-f]{8}")
# Share of non-blank lines holding such a literal above which a document is a table.  Measured on
# Python 3.11's standard library: the charmaps and html/entities.py are at 0.94-0.97, stringprep.py
# at 0.7; the most literal-heavy written module (re/_casefix.py, itself generated) is at 0.4 and
# ordinary modules are under 0.05, so 0.5 keeps all code and drops the tables.
TABLE_LINE_SHARE = 0.5


@dataclass(frozen=True)
class DocumentFilter:
    """Which documents to leave out of a corpus.  The default leaves out none."""
    skip_tables: bool = False                # documents whose lines are mostly hex/escape literals
    max_line_length: Optional[int] = None    # documents holding a longer line (minified or generated data)

    def reason_to_skip(self, text: str) -> Optional[str]:
        """None to keep ``text``; else why it is left out ("table" or "long line")."""
        if self.max_line_length is not None and any(len(line) > self.max_line_length for line in text.splitlines()):
            return "long line"
        if self.skip_tables:
            lines = [line for line in text.splitlines() if line.strip()]
            if lines and sum(1 for line in lines if TABLE_LITERAL.search(line)) > TABLE_LINE_SHARE * len(lines):
                return "table"
        return None


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a corpus's files and documents, shared by preprocessing and tokenizer training."""
    parser.add_argument("--input", nargs="+", required=True, help="files and/or folders")
    parser.add_argument("--pattern", default="*", help="file-name glob inside folders, e.g. '*.py' or '*.jsonl'")
    parser.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDE), help="folder names to skip")
    parser.add_argument("--skip-tables", action="store_true",
                        help="leave out documents whose lines are mostly hex numbers or escapes (generated tables)")
    parser.add_argument("--max-line-length", type=int, default=None,
                        help="leave out documents holding a line longer than this many characters")


def document_filter(args: argparse.Namespace) -> DocumentFilter:
    if args.max_line_length is not None and args.max_line_length < 1:
        raise ValueError(f"--max-line-length {args.max_line_length} must be at least 1 (or left out: no limit)")
    return DocumentFilter(skip_tables=args.skip_tables, max_line_length=args.max_line_length)


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


def find_files(inputs, pattern: str = "*", exclude=DEFAULT_EXCLUDE) -> list[str]:
    """Files named in ``inputs`` plus, under each folder, files whose name matches ``pattern``
    (folders named in ``exclude`` are skipped), in a sorted, reproducible order."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, e) for e in exclude))
                files += [os.path.join(root, n) for n in sorted(names) if fnmatch.fnmatch(n, pattern)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"--input {item!r} is neither a file nor a folder")
    return files


@dataclass
class WorkUnit:
    """A file, or the lines of a JSONL file starting in bytes [start, end)."""
    path: str
    start: int = 0
    end: int | None = None

    @property
    def size(self) -> int:
        return (self.end if self.end is not None else os.path.getsize(self.path)) - self.start


def plan_work(files, num_workers: int) -> list[list[WorkUnit]]:
    """Split the files, in order, into ``num_workers`` contiguous shares of about equal bytes.
    Plain-JSONL files larger than a share are cut into byte ranges (at line starts, by the reader)."""
    sizes = [os.path.getsize(f) for f in files]
    share = max(1, sum(sizes) // max(1, num_workers))
    units = []
    for path, size in zip(files, sizes):
        if path.endswith((".jsonl", ".json")) and size > share:
            cuts = list(range(0, size, share)) + [size]
            units += [WorkUnit(path, a, b) for a, b in zip(cuts, cuts[1:])]
        else:
            units.append(WorkUnit(path))
    shares, current, filled = [], [], 0
    for unit in units:
        current.append(unit)
        filled += unit.size
        if filled >= share * (len(shares) + 1) and len(shares) < num_workers - 1:
            shares.append(current)
            current = []
    shares.append(current)
    return shares


def _lines_in_range(path: str, start: int, end: int | None):
    """(line number, raw line) for lines that *start* in [start, end) of a plain file."""
    with open(path, "rb") as f:
        line_number = 1
        if start > 0:
            # Line numbers are true file line numbers: count the newlines before the range.
            remaining = start
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 24))
                line_number += chunk.count(b"\n")
                remaining -= len(chunk)
            f.seek(start - 1)
            if f.read(1) != b"\n":  # start is inside a line: it belongs to the previous range
                f.readline()
                line_number += 1
        while end is None or f.tell() < end:
            line = f.readline()
            if not line:
                break
            yield line_number, line
            line_number += 1


def iter_documents(unit: WorkUnit, json_keys, problems: list):
    """Yield (key, text) documents of one work unit; append (path, line, reason) for bad lines."""
    if not is_jsonl(unit.path):
        with open(unit.path, "rb") as f:
            data = f.read()
        try:
            yield json_keys[0], data.decode("utf-8")
        except UnicodeDecodeError as error:
            problems.append((unit.path, 0, f"not UTF-8 ({error.reason} at byte {error.start})"))
        return
    if unit.path.endswith(".gz"):
        def gz_lines():
            with gzip.open(unit.path, "rb") as f:
                yield from enumerate(f, start=1)
        lines = gz_lines()
    else:
        lines = _lines_in_range(unit.path, unit.start, unit.end)
    for number, raw in lines:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            problems.append((unit.path, number, f"not UTF-8 ({error.reason})"))
            continue
        except json.JSONDecodeError as error:
            problems.append((unit.path, number, f"invalid JSON ({error.msg})"))
            continue
        if not isinstance(record, dict):
            problems.append((unit.path, number, "not a JSON object"))
            continue
        for key in json_keys:
            text = record.get(key)
            if not isinstance(text, str):
                problems.append((unit.path, number, f"no string under key {key!r}"))
                continue
            yield key, text
