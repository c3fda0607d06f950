"""Fuzz --config YAML documents: mappings of real flag names (and unknown ones) to random values (NaN,
inf, negative, huge, strings, lists, bools, nulls, nested mappings), duplicated keys, documents that are
no mapping, and text or bytes that are no YAML.  parse_args returns configs whose every value is of its
type, finite and in its declared range, or raises ValueError in one line naming the file."""
import os
import tempfile

import yaml
from hypothesis import given
from hypothesis import strategies as st

from megalite.training.arguments import build_parser
from tests.fuzz.configs import judge_parse
from tests.fuzz.fuzzing import fuzz_settings

SURFACE = "yaml"
OPTIONS = sorted(option for action in build_parser()._actions for option in action.option_strings
                 if option.startswith("--"))
KEYS = st.one_of(st.sampled_from([o[2:] for o in OPTIONS]), st.sampled_from([o[2:].replace("-", "_") for o in OPTIONS]),
                 st.sampled_from(["unknown-flag", "lr ", "LR", "", "config", "help", "--lr", "1"]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(0, 64), st.integers(-(2 ** 70), 2 ** 70),
                    st.integers(10 ** 308, 10 ** 400), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["nan", "inf", "-1", "1e3", "abc", "", "969,30,1", "1,nan", "LayerNorm", "rope",
                                     "cosine", "mmap", "gloo", "1f1b"]),
                    st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                            max_size=2), max_leaves=4)


def documents():
    mapping = st.dictionaries(KEYS, VALUES, max_size=5).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    duplicated = st.tuples(KEYS, SCALARS, SCALARS).map(
        lambda k: f"{yaml.safe_dump({k[0]: k[1]})}{yaml.safe_dump({k[0]: k[2]})}")
    not_mapping = VALUES.map(lambda v: yaml.safe_dump(v, allow_unicode=True))
    complex_key = st.sampled_from(["? [a, b]\n: 1\n", "? {a: 1}\n: 2\n", "<<: {lr: 1}\n", "lr: &a 1\nmin-lr: *a\n",
                                   "!!python/object:os.system {}\n", "lr: !!binary aGVsbG8=\n", "{lr: 1, lr: 2}\n",
                                   "lr: 0x10\n", "seed: 0o17\n", "lr: 1_0\n", "seq-length: 12:30\n", "lr: .NaN\n",
                                   "%YAML 1.2\n---\nlr: 1\n", "---\nlr: 1\n---\nlr: 2\n", "lr: [1\n", "\t lr: 1\n"])
    raw = st.one_of(st.text(max_size=40), st.binary(max_size=40))
    return st.one_of(mapping, mapping, mapping, duplicated, not_mapping, complex_key, raw)


@fuzz_settings(500)
@given(document=documents(), cli=st.lists(st.sampled_from(["--lr", "0.1", "--seq-length", "32", "--bf16"]),
                                          max_size=2))
def test_yaml_config_parses_or_is_refused_in_one_line(document, cli):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.yaml")
        with open(path, "wb") as f:
            f.write(document.encode() if isinstance(document, str) else document)
        judge_parse(SURFACE, ["--mock-data", "--config", path, *cli], document)
