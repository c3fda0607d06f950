"""megalite/data/corpus.py's DocumentFilter: generated tables and very long lines are left out, code is kept."""
import os
import sysconfig

import pytest

from megalite.data.corpus import DocumentFilter

CODE = "import os\n\n\ndef size(path):\n    return os.path.getsize(path)  # 0x10 bytes per block\n"
# The shape of encodings/cp1252.py's decoding table.
CHARMAP = "decoding_table = (\n" + "".join(f"    '\\x{i:02x}'     #  0x{i:02X} -> CONTROL\n" for i in range(32)) + ")\n"
ESCAPES = "table = {\n" + "".join(f"    'e{i}': '\\u{0x2000 + i:04x}',\n" for i in range(20)) + "}\n"


@pytest.mark.parametrize("text, reason", [
    (CODE, None),
    (CHARMAP, "table"),
    (ESCAPES, "table"),
    ("x = 1\n" + "y = '" + "a" * 300 + "'\n", "long line"),
    ("", None),
])
def test_reason_to_skip(text, reason):
    assert DocumentFilter(skip_tables=True, max_line_length=200).reason_to_skip(text) == reason


def test_the_default_keeps_everything():
    for text in (CODE, CHARMAP, ESCAPES, "z" * 10_000):
        assert DocumentFilter().reason_to_skip(text) is None


def test_a_line_at_the_limit_is_kept():
    assert DocumentFilter(max_line_length=10).reason_to_skip("a" * 10 + "\n") is None
    assert DocumentFilter(max_line_length=10).reason_to_skip("a" * 11 + "\n") == "long line"


STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.mark.parametrize("name, reason", [
    ("encodings/cp1252.py", "table"), ("html/entities.py", "table"), ("stringprep.py", "table"),
    ("argparse.py", None), ("json/decoder.py", None), ("locale.py", None), ("pickletools.py", None),
])
def test_the_standard_library_the_quickstart_reads(name, reason):
    """The quickstart's corpus: its generated tables are left out, its code (hex constants and all) kept."""
    path = os.path.join(STDLIB, name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not in this Python's standard library")
    with open(path, encoding="utf-8") as f:
        assert DocumentFilter(skip_tables=True).reason_to_skip(f.read()) == reason
