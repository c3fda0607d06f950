"""Fuzz the command line: random values (NaN, inf, negative, huge, wrong type) for the numeric flags the
config dataclasses declare, --split and --data-path blends, through parse_args; and a few through
megalite-train end to end.  Configs whose every value is of its type, finite and in its declared range,
or ValueError in one line."""
import contextlib
import io
import os
import tempfile
import traceback

from hypothesis import given
from hypothesis import strategies as st

from megalite.parallel.testing import run_on_ranks
from tests.fuzz.configs import flag_fields, judge_parse
from tests.fuzz.fuzzing import check_one_line, count, fuzz_settings

SURFACE = "flags"
NUMERIC = [(f, kind, is_list) for f, kind, is_list, _, allowed in flag_fields()
           if kind in (int, float) and allowed is None]
NAMES = {f.name: f for f, _, _ in NUMERIC}

ODD = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "9" * 40, "-" + "9" * 40, "1e-400",
       "abc", "", " ", "1.5", "0x10", "1_000", "٣", "True", "None", "[]", "--", "-1", "0", "-0.0", "1e3", "2**31"]


def value_text():
    return st.one_of(st.sampled_from(ODD), st.integers(0, 64).map(str), st.floats(0, 1).map(repr),
                     st.integers(-10 ** 4, 10 ** 4).map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr),
                     st.integers(-(2 ** 70), 2 ** 70).map(str))


def split_text():
    part = st.one_of(st.sampled_from(["nan", "inf", "-1", "0", "1e3", "1e-3", "..", ".5", "1.", "x", ""]),
                     st.integers(0, 1000).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr))
    return st.builds(lambda parts, sep: sep.join(parts), st.lists(part, min_size=1, max_size=4),
                     st.sampled_from([",", "/", " ", ", "]))


def blend():
    weight = st.one_of(st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e400", "0.5", "1"]),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr))
    return st.lists(st.tuples(weight, st.sampled_from(["a", "b", "data/c"])), min_size=1, max_size=3).map(
        lambda pairs: [x for pair in pairs for x in pair])


def argv_strategy():
    numeric = st.lists(st.tuples(st.sampled_from(sorted(NAMES)), st.lists(value_text(), min_size=1, max_size=3)),
                       max_size=4)
    return st.tuples(numeric, st.none() | split_text(), st.none() | blend(), st.booleans())


def to_argv(numeric, split, data_path, gqa):
    argv = ["--mock-data"]
    for name, values in numeric:
        f = NAMES[name]
        is_list = next(is_list for g, _, is_list in NUMERIC if g is f)
        argv += [f.metadata.get("name") or "--" + name.replace("_", "-"), *(values if is_list else values[:1])]
    if split is not None:
        argv += ["--split", split]
    if data_path is not None:
        argv += ["--data-path", *data_path]
    if gqa:
        argv.append("--group-query-attention")
    return argv


def judge(argv):
    """'accepted' or 'refused'; raises on a traceback or a silent accept."""
    return judge_parse(SURFACE, argv, argv)


@fuzz_settings(500)
@given(case=argv_strategy())
def test_flag_values_parse_or_are_refused_in_one_line(case):
    judge(to_argv(*case))


TINY = ["--mock-data", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
        "--vocab-size", "32", "--make-vocab-size-divisible-by", "32", "--micro-batch-size", "1",
        "--train-iters", "1", "--eval-iters", "0", "--log-interval", "1000"]
# Flags whose value changes nothing about the work's size, so any accepted value trains in a second.
CHEAP = ["--lr", "--min-lr", "--weight-decay", "--adam-beta1", "--adam-beta2", "--adam-eps", "--clip-grad",
         "--seed", "--init-method-std", "--hidden-dropout", "--attention-dropout", "--norm-epsilon",
         "--lr-warmup-fraction", "--rotary-base", "--split"]


def _train_main(rank, world_size, argv):
    from megalite.train import main
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except BaseException:  # noqa: BLE001 - the traceback the user would see
        return "raised", traceback.format_exc()
    return rc, err.getvalue()


@fuzz_settings(6, share=0.02)
@given(pairs=st.lists(st.tuples(st.sampled_from(CHEAP), value_text()), min_size=1, max_size=3),
       folder=st.sampled_from([None, "--save file", "--save new", "--load file", "--load missing"]))
def test_train_main_exits_0_or_says_one_line(pairs, folder):
    argv = TINY + [x for pair in pairs for x in pair]
    with tempfile.TemporaryDirectory() as tmp:
        open(os.path.join(tmp, "file"), "w").close()
        if folder is not None:
            argv += [folder.split()[0], os.path.join(tmp, folder.split()[1])]
        rc, err = run_on_ranks(_train_main, 1, argv, timeout=120)[0]
    if rc == "raised":
        count(SURFACE + " e2e", "traceback")
        raise AssertionError(f"megalite-train {argv} raised:\n{err}")
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    if rc == 0:
        count(SURFACE + " e2e", "accepted")
        return
    assert len(lines) == 1 and "error:" in lines[0], f"rc {rc}, stderr:\n{err}"
    check_one_line(SURFACE + " e2e", lines[0])
