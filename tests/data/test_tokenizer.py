"""Tokenizers: GPT-2 BPE known ids, parity with tiktoken's gpt2, adapters, bad files."""
import glob
import json
import os
import sysconfig

import pytest

from megalite.data.indexed import native_data_module
from megalite.data.tokenizer import GPT2BPETokenizer, NullTokenizer, TokenizerFileError, build_tokenizer

GPT2_DIR = os.environ.get("MEGALITE_GPT2_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".cache", "gpt2")
VOCAB, MERGES = os.path.join(GPT2_DIR, "encoder.json"), os.path.join(GPT2_DIR, "vocab.bpe")
needs_gpt2 = pytest.mark.skipif(not (os.path.exists(VOCAB) and os.path.exists(MERGES)),
                                reason=f"GPT-2 vocabulary not in {GPT2_DIR} (python tools/fetch_gpt2_vocab.py)")

EDGE_CASES = [
    "Hello world", "", " ", "   leading spaces", "trailing spaces   ", "a" + " " * 40 + "b", "\n\n\t\n  \n",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷", "CJK 中文字符 日本語のテキスト 한국어", "combining: e\u0301 n\u0303 a\u030a\u0323",  # noqa: E501
    "<|endoftext|>", "text<|endoftext|>more <|endoftext|>", "It's they're we've I'm you'll he'd 'S",
    "numbers 12345 3.14159 1e-10 0x1F", "tabs\tand\r\nwindows\r\nlines", "\u00a0nbsp and \u2028 separators",
    "mixed123abc___!!!???", "ﬁ ligature Ω ß Straße", "\x00\x01 control \x7f bytes",
]


def native_built():
    return native_data_module() is not None


@pytest.fixture(scope="module", params=["native", "python"])
def gpt2(request):
    """Both implementations of our GPT-2 BPE: the C++ one (csrc/data/bpe.cpp) and the Python one."""
    if request.param == "native" and not native_built():
        pytest.skip("megalite._data is not built")
    return GPT2BPETokenizer(VOCAB, MERGES, native=request.param == "native")


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    """tiktoken's own gpt2 encoding, built offline from the same two files."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")  # read the local files, cache nothing
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=MERGES, encoder_json_file=VOCAB)
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


@needs_gpt2
def test_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.eod == 50256 and gpt2.vocab_size == 50257
    assert gpt2.decode([15496, 995]) == "Hello world"


@needs_gpt2
def test_pickles_for_spawned_workers(gpt2):
    import pickle
    copy = pickle.loads(pickle.dumps(gpt2))
    assert (copy._native is None) == (gpt2._native is None)
    text = "It's 3.14 — ünïcode  spaces\n"
    assert copy.encode(text) == gpt2.encode(text) == gpt2.encode_python(text)


@needs_gpt2
def test_special_token_spelling_is_plain_text(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert gpt2.eod not in ids and gpt2.decode(ids) == "a<|endoftext|>b"


@needs_gpt2
@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_tiktoken(gpt2, tiktoken_gpt2, text):
    expected = tiktoken_gpt2.encode_ordinary(text)
    assert gpt2.encode(text) == expected
    tik = build_tokenizer("TikTokenizer", vocab_file=VOCAB, merge_file=MERGES)
    assert tik.encode(text) == expected
    assert gpt2.decode(expected) == tiktoken_gpt2.decode(expected)


@needs_gpt2
def test_stdlib_sources_match_tiktoken(gpt2, tiktoken_gpt2):
    # A fixed slice of the standard library: ~150 kB of Python, comments and docstrings.
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    text, budget = [], 150_000
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text.append(f.read(budget - sum(map(len, text))))
        if sum(map(len, text)) >= budget:
            break
    text = "".join(text)
    assert len(text) > 50_000
    assert gpt2.encode(text) == tiktoken_gpt2.encode_ordinary(text)


@needs_gpt2
def test_lone_surrogates_match_tiktoken(gpt2, tiktoken_gpt2):
    # JSON text may hold "\\ud800" escapes: a lone surrogate is one U+FFFD, a pair is its character.
    for text in ["\ud800abc \udfff", "x\ud83d\ude00y", "\udfff\ud800"]:
        assert gpt2.encode(text) == tiktoken_gpt2.encode_ordinary(text)


@needs_gpt2
@pytest.mark.skipif(not native_built(), reason="megalite._data is not available")
def test_native_splits_every_code_point_like_the_regex():
    # The C++ pre-tokenizer classifies code points through a table built with `regex`; each code
    # point below U+20000 (and every 97th above) sits between separators that exercise every
    # alternative of the pattern: contractions, optional leading space, whitespace runs.
    import random
    rng = random.Random(0)
    separators = [" ", "  ", "\n", "a", "1", "'s", " x", "", "\u3000", "\u00e9", "\t\t", " \n ", "'ll", "!"]
    points = [c for c in list(range(0x20000)) + list(range(0x20000, 0x110000, 97)) if not 0xD800 <= c < 0xE000]
    text = "".join(chr(c) + rng.choice(separators) for c in points)
    native = GPT2BPETokenizer(VOCAB, MERGES, native=True)
    python = GPT2BPETokenizer(VOCAB, MERGES, native=False)
    assert native.encode(text) == python.encode(text)
    array = native.encode_array("Hello world", append_eod=True)
    assert array.dtype.name == "int32" and array.tolist() == [15496, 995, native.eod]


@pytest.mark.skipif(not native_built(), reason="megalite._data is not available")
def test_native_refuses_a_vocabulary_that_is_not_byte_level(tmp_path):
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    merges.write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerFileError, match="vocab.json: vocabulary lacks the single byte 0"):
        GPT2BPETokenizer(str(vocab), str(merges), native=True)


def test_bad_vocab_file_names_the_file(tmp_path):
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text('{"a": 0, "b": ')
    merges.write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerFileError, match="vocab.json is not valid JSON"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))


def test_bad_merges_file_names_the_file_and_line(tmp_path):
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    merges.write_text("#version: 0.2\na b\nthis line is wrong\n")
    with pytest.raises(TokenizerFileError, match="merges.txt, line 3"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))


def test_missing_files_and_types_are_named():
    with pytest.raises(ValueError, match="needs --vocab-file"):
        build_tokenizer("GPT2BPETokenizer")
    with pytest.raises(ValueError, match="'Bogus' is not one of"):
        build_tokenizer("Bogus")


def test_null_tokenizer():
    tok = NullTokenizer(100)
    assert tok.encode("1 2  99") == [1, 2, 99] and tok.eod == 100 and tok.vocab_size == 101
    assert tok.decode([3, 4]) == "3 4"


def test_huggingface_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["hello world, hello tokens"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=path)
    assert tok.eod == 0
    ids = tok.encode("hello <|endoftext|>")
    assert tok.eod not in ids and len(ids) > 2
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(TokenizerFileError, match="broken.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "broken.json"))
