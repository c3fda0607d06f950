"""Fuzz a saved checkpoint: flipped bits, truncation and deletion of its files, edits of manifest.json
(invalid JSON, no mapping, missing keys, wrong sizes and checksums) and of the tracker file (empty, not a
number, huge, unicode, invalid UTF-8, a folder), then resume training from it, megalite-generate and
megalite-convert --to hf.  Each ends as the pristine checkpoint would (the same losses, text, tensors),
or in one line naming the file or the value."""
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import traceback

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megalite.checkpoint import paths
from megalite.checkpoint.hf import main as convert_main
from megalite.checkpoint.manifest import MANIFEST
from megalite.generate import main as generate_main
from megalite.parallel.testing import run_on_ranks
from tests.fuzz.fuzzing import check_one_line, count, fuzz_settings, silent_accept, traceback_

SURFACE = "checkpoint"
TINY = ["--mock-data", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
        "--seq-length", "8", "--vocab-size", "32", "--make-vocab-size-divisible-by", "32",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "3e-3", "--log-interval", "1000",
        "--eval-iters", "0", "--hidden-dropout", "0", "--attention-dropout", "0"]
ITERATION = 2
MODEL = "mp_rank_00_000/model_optim_rng.pt"
RNG = "mp_rank_00_000/rng_dp000_cp000.pt"
FILES = [MODEL, RNG, paths.TENSOR_INDEX, MANIFEST]


def _train(rank, world_size, argv):
    from megalite.training.loop import SETUP_ERRORS, pretrain
    try:
        return "ok", [(r["iteration"], r["loss"]) for r in pretrain(argv)]
    except BaseException as error:  # noqa: BLE001 - judged by the parent
        return "error", isinstance(error, SETUP_ERRORS), str(error), traceback.format_exc()


def _resume(root):
    return run_on_ranks(_train, 1, TINY + ["--train-iters", str(ITERATION + 2), "--load", root], timeout=120)[0]


def _generate(root, _out):
    return generate_main(["--load", root, "--prompt", "1 2 3", "--max-new-tokens", "4", "--temperature", "0"])


def _convert(root, out):
    shutil.rmtree(out, ignore_errors=True)
    rc = convert_main(["--to", "hf", "--load", root, "--save", out])
    if rc == 0:
        print(hashlib.sha256(open(os.path.join(out, "model.safetensors"), "rb").read()).hexdigest())
    return rc


def _call(main, root, out):
    """(rc, stdout, stderr) of an entry point run in this process; rc 'raised' when an exception escaped."""
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(root, out)
    except SystemExit as error:
        rc = error.code
    except Exception:  # noqa: BLE001 - the traceback the user would see
        return "raised", stdout.getvalue(), traceback.format_exc()
    return rc, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The pristine checkpoint and what each consumer makes of it."""
    root = str(tmp_path_factory.mktemp("fuzz_ckpt") / "ckpt")
    argv = TINY + ["--train-iters", str(ITERATION), "--save", root, "--save-interval", str(ITERATION)]
    assert run_on_ranks(_train, 1, argv, timeout=120)[0][0] == "ok"
    out = str(tmp_path_factory.mktemp("fuzz_hf"))
    expected = {"resume": _resume(root), "generate": _call(_generate, root, out), "convert": _call(_convert, root, out)}
    assert expected["resume"][0] == "ok" and expected["generate"][0] == 0 and expected["convert"][0] == 0, expected
    return root, expected


MANIFEST_EDITS = ["{", "", "[]", "1", '"files"', "null", '{"files": []}', '{"run_id": "x"}', "\xff", "{}",
                  "drop-entry", "entry-string", "entry-empty", "bytes+1", "bytes-string", "crc+1", "crc-float",
                  "crc-huge", "run_id", "iteration", "extra-entry", "files-null"]
TRACKER_EDITS = ["", "abc", "9" * 30, "2\n", " 2 ", "٢", "²", "-1", "1", "0", "2.0", "0x2", "\x00", "é",
                 b"\xff\xfe", b"2\xff", "folder", "delete", "4"]


def mutations():
    target = st.sampled_from(FILES)
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), target, st.integers(0, 10 ** 6), st.integers(1, 255)),
        st.tuples(st.just("truncate"), target, st.floats(0, 1), st.just(0)),
        st.tuples(st.just("delete"), target, st.just(0), st.just(0)),
        st.tuples(st.just("manifest"), st.just(MANIFEST), st.sampled_from(MANIFEST_EDITS), st.sampled_from([MODEL, RNG,
                                                                                          paths.TENSOR_INDEX])),
        st.tuples(st.just("tracker"), st.just(paths.TRACKER_FILE), st.sampled_from(TRACKER_EDITS), st.just(0)),
    ), min_size=1, max_size=2)


def _edit_manifest(path, edit, entry):
    if not os.path.isfile(path):
        return
    try:
        manifest = json.load(open(path))
        files = manifest["files"]
    except (ValueError, TypeError, KeyError):
        return
    if edit in ("{", "", "[]", "1", '"files"', "null", '{"files": []}', '{"run_id": "x"}', "\xff", "{}"):
        open(path, "w", encoding="latin-1").write(edit)
        return
    changes = {"drop-entry": lambda: files.pop(entry, None), "entry-string": lambda: files.update({entry: "x"}),
               "entry-empty": lambda: files.update({entry: {}}), "files-null": lambda: manifest.update(files=None),
               "bytes+1": lambda: files[entry].update(bytes=files[entry]["bytes"] + 1),
               "bytes-string": lambda: files[entry].update(bytes=str(files[entry]["bytes"])),
               "crc+1": lambda: files[entry].update(crc32=files[entry]["crc32"] + 1),
               "crc-float": lambda: files[entry].update(crc32=files[entry]["crc32"] + 0.5),
               "crc-huge": lambda: files[entry].update(crc32=2 ** 80),
               "run_id": lambda: manifest.update(run_id="another"), "iteration": lambda: manifest.update(iteration=7),
               "extra-entry": lambda: files.update({"mp_rank_09_000/x.pt": {"bytes": 1, "crc32": 1}})}
    try:
        changes[edit]()
    except (KeyError, TypeError, AttributeError):
        return
    open(path, "w").write(json.dumps(manifest))


def _apply(root, mutation):
    kind, name, how, extra = mutation
    folder = paths.iteration_dir(root, ITERATION)
    path = os.path.join(root if kind == "tracker" else folder, name)
    if kind == "tracker":
        if os.path.isdir(path):
            return
        if os.path.exists(path):
            os.remove(path)
        if how == "folder":
            os.makedirs(path)
        elif how != "delete":
            open(path, "wb").write(how if isinstance(how, bytes) else how.encode())
        return
    if not os.path.isfile(path):
        return
    if kind == "manifest":
        _edit_manifest(path, how, extra)
        return
    data = bytearray(open(path, "rb").read())
    if kind == "flip" and data:
        data[how % len(data)] ^= extra
    elif kind == "truncate":
        del data[int(how * len(data)):]
    elif kind == "delete":
        os.remove(path)
        return
    open(path, "wb").write(bytes(data))


def _judge_resume(root, expected):
    result = _resume(root)
    if result[0] == "ok":
        if result != expected:
            raise silent_accept(SURFACE, f"resume gave {result[1]}, the pristine checkpoint {expected[1]}")
        count(SURFACE, "accepted")
        return
    _, reported, message, trace = result
    if not reported:
        count(SURFACE, "traceback")
        raise AssertionError(f"resume raised a bug, not a one-line error:\n{trace}")
    check_one_line(SURFACE, message.splitlines()[0] if message else "", root)


def _judge_entry_point(name, main, root, out, expected):
    rc, stdout, stderr = _call(main, root, out)
    if rc == "raised":
        raise traceback_(SURFACE, AssertionError(f"megalite-{name} raised:\n{stderr}"))
    if rc == 0:
        # The result is the last line (generated text, the exported file's hash); notices may come before.
        if stdout.strip().splitlines()[-1:] != expected[1].strip().splitlines()[-1:]:
            raise silent_accept(SURFACE, f"megalite-{name} printed {stdout[:200]!r}, not the pristine result")
        count(SURFACE, "accepted")
        return
    lines = stderr.strip().splitlines()
    assert lines, f"megalite-{name} exited {rc} and said nothing"
    check_one_line(SURFACE, "\n".join(lines), root)


@fuzz_settings(90, share=0.1)
@given(mutation=mutations(), consumer=st.sampled_from(["resume", "generate", "convert"]))
def test_damaged_checkpoint_is_refused_in_one_line_or_read_whole(saved, mutation, consumer):
    pristine, expected = saved
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, "ckpt")
        shutil.copytree(pristine, root)
        for step in mutation:
            _apply(root, step)
        if consumer == "resume":
            _judge_resume(root, expected["resume"])
        else:
            main = _generate if consumer == "generate" else _convert
            _judge_entry_point(consumer, main, root, os.path.join(folder, "hf"), expected[consumer])
