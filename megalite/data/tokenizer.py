"""Tokenizers: GPT-2 byte-level BPE (ours), tiktoken and Hugging Face adapters, and a null one.

Every tokenizer has ``vocab_size``, ``eod``, ``encode(text) -> list[int]`` and
``decode(ids) -> str``.  ``encode`` treats the spelling of a special token ("<|endoftext|>")
as ordinary text: data can never inject a control token; only ``--append-eod`` adds EOD.

Byte-level BPE (Radford et al. 2019, GPT-2):
  1. split the text with a regex into words (letters, digits, punctuation runs, whitespace),
  2. write each word's UTF-8 bytes as printable characters (bytes_to_unicode below),
  3. repeatedly merge the adjacent pair with the lowest merge rank until no pair is in the merges.
The vocabulary file maps each merged string to its id; the merges file lists pairs by rank.

``GPT2BPETokenizer`` runs the C++ implementation in ``megalite._data`` (csrc/data/bpe.cpp) when it
is built, and the pure-Python one below otherwise (``native=False``, or
``MEGALITE_DATA_NATIVE=0``); the Python one is the specification the tests hold both to.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from functools import lru_cache
from typing import get_args

import numpy as np
import regex

from megalite.config.settings import TokenizerType
from megalite.data.indexed import native_data_module

# GPT-2's pre-tokenizer (the same pattern as tiktoken's r50k/gpt2 and HF's ByteLevel).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
EOD_SPELLINGS = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


class TokenizerFileError(ValueError):
    """A vocabulary / merges / tokenizer file that does not parse; the message names the file."""


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, so a BPE string never holds whitespace or control chars.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in order, to U+0100... .
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=None)
def code_point_classes() -> np.ndarray:
    """One byte per code point for the C++ pre-tokenizer: 1 letter (\\p{L}), 2 number (\\p{N}),
    4 whitespace (\\s), 0 anything else; computed with ``regex``, the Python path's engine."""
    every_code_point = "".join(map(chr, range(0x110000)))
    classes = np.zeros(0x110000, dtype=np.uint8)
    for bit, pattern in ((1, r"\p{L}+"), (2, r"\p{N}+"), (4, r"\s+")):
        for match in regex.finditer(pattern, every_code_point):
            classes[match.start():match.end()] |= bit
    return classes


def utf8(text: str) -> bytes:
    """UTF-8 bytes of text.  A JSON "\\ud83d\\ude00" escape pair becomes its character and a lone
    surrogate becomes one U+FFFD, as in tiktoken (through UTF-16, which pairs surrogates)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def load_vocab(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerFileError(f"vocabulary file {path} is not valid JSON ({error}); expected GPT-2's "
                                 f"encoder.json / a vocab.json mapping token -> id") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerFileError(f"vocabulary file {path} must be a JSON object mapping token strings to "
                                 f"integer ids")
    return vocab


def load_merges(path: str) -> list[tuple[str, str]]:
    merges = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as error:
        raise TokenizerFileError(f"merges file {path} is not UTF-8 text ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerFileError(f"merges file {path}, line {number}: expected two tokens separated "
                                     f"by one space (GPT-2 vocab.bpe / merges.txt format), got {line[:80]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def find_eod(vocab: dict[str, int], path: str) -> int:
    for spelling in EOD_SPELLINGS:
        if spelling in vocab:
            return vocab[spelling]
    raise TokenizerFileError(f"{path} has no end-of-document token (looked for {', '.join(EOD_SPELLINGS)}); "
                             f"add {ENDOFTEXT!r} to the vocabulary (megalite-train-tokenizer does)")


class Tokenizer:
    """What every tokenizer here has besides ``encode``/``decode``/``eod``/``vocab_size``."""

    def encode_array(self, text: str, append_eod: bool = False) -> np.ndarray:
        """The ids as an int32 array (what the dataset builder takes), EOD appended if asked."""
        ids = self.encode(text)
        if append_eod:
            ids.append(self.eod)
        return np.asarray(ids, dtype=np.int32)


class GPT2BPETokenizer(Tokenizer):
    """Our GPT-2 byte-level BPE over ``vocab_file`` (encoder.json / vocab.json) and ``merge_file``
    (vocab.bpe / merges.txt): C++ when ``megalite._data`` is built (``native=None``), else Python."""

    def __init__(self, vocab_file: str, merge_file: str, cache_size: int = 1 << 16, native: bool | None = None):
        self.vocab_file_name = vocab_file
        self.encoder = load_vocab(vocab_file)
        self.decoder = {i: s for s, i in self.encoder.items()}
        merges = load_merges(merge_file)
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.pattern = regex.compile(GPT2_SPLIT_PATTERN)
        self.eod = find_eod(self.encoder, vocab_file)
        self.vocab_size = len(self.encoder)
        self._cache: OrderedDict[str, list[int]] = OrderedDict()  # word -> ids, least recent first
        self._cache_size = cache_size
        for (left, right) in list(self.bpe_ranks)[:1]:
            if left + right not in self.encoder:
                raise TokenizerFileError(f"{merge_file} does not belong to {vocab_file}: the first merge "
                                         f"{left + right!r} is not in the vocabulary")
        self._native = self._build_native(merges, cache_size) if native is not False else None
        if native and self._native is None:
            raise RuntimeError("native=True but megalite._data is not available: build it (pip install "
                               "--no-build-isolation -e .) and leave MEGALITE_DATA_NATIVE unset")

    def _build_native(self, merges, cache_size):
        module = native_data_module()
        if module is None:
            return None
        as_bytes = {c: bytes([b]) for b, c in self.byte_encoder.items()}
        to_bytes = lambda token: b"".join(as_bytes[c] for c in token)  # noqa: E731
        vocab = [(to_bytes(t), i) for t, i in self.encoder.items() if all(c in as_bytes for c in t)
                 and t not in EOD_SPELLINGS]
        try:
            return module.ByteLevelBPE(code_point_classes(), vocab, [(to_bytes(a), to_bytes(b)) for a, b in merges],
                                       cache_size)
        except ValueError as error:  # a vocabulary/merges pair that is not byte-level BPE
            raise TokenizerFileError(f"{self.vocab_file_name}: {error}") from None

    def __getstate__(self):  # the C++ object does not pickle: rebuilt from the ranks on arrival
        return dict(self.__dict__, _native=self._native is not None)

    def __setstate__(self, state):
        native = state.pop("_native")
        self.__dict__.update(state, _native=None)
        if native:
            self._native = self._build_native(sorted(self.bpe_ranks, key=self.bpe_ranks.get), self._cache_size)

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.bpe_ranks.get(pair, None), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            ranked = [(rank, i) for rank, i in pairs if rank is not None]
            if not ranked:
                break
            first = min(ranked)[1]
            best = parts[first], parts[first + 1]
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            self._cache.move_to_end(word)
            return ids
        mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        ids = [self.encoder[part] for part in self._bpe(mapped)]
        self._cache[word] = ids
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ids

    def encode(self, text: str) -> list[int]:
        if self._native is not None:
            return self._native.encode(utf8(text)).tolist()
        return self.encode_python(text)

    def encode_array(self, text: str, append_eod: bool = False) -> np.ndarray:
        if self._native is not None:
            return self._native.encode(utf8(text), self.eod if append_eod else -1)
        return super().encode_array(text, append_eod)

    def encode_python(self, text: str) -> list[int]:
        """The pure-Python encoding: the reference the C++ one is tested against."""
        ids = []
        for word in self.pattern.findall(utf8(text).decode("utf-8")):
            ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


class TikTokenizer(Tokenizer):
    """The same byte-level BPE through ``tiktoken`` (Rust), built offline from the same files.

    tiktoken merges by the rank of the *merged* token; we use the vocabulary id as that rank,
    which equals GPT-2's merge order (and a trained tokenizer's, whose ids grow with each merge).
    """

    def __init__(self, vocab_file: str, merge_file: str):
        import tiktoken

        vocab = load_vocab(vocab_file)
        load_merges(merge_file)  # validate: a broken merges file is an error here too
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        mergeable, special = {}, {}
        for token, rank in vocab.items():
            if all(c in byte_decoder for c in token) and token not in EOD_SPELLINGS:
                mergeable[bytes(byte_decoder[c] for c in token)] = rank
            else:
                special[token] = rank
        self.eod = find_eod(vocab, vocab_file)
        self.vocab_size = len(vocab)
        self.encoding = tiktoken.Encoding(name=f"megalite:{vocab_file}", pat_str=GPT2_SPLIT_PATTERN,
                                          mergeable_ranks=mergeable, special_tokens=special)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)  # never matches special-token spellings

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids], errors="replace")


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, tokenizer_file: str):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as error:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerFileError(f"tokenizer file {tokenizer_file} does not parse as a Hugging Face "
                                     f"tokenizer.json ({error})") from None
        # Special tokens spelled inside the text are tokenized as text, not as control tokens.
        self.tokenizer.encode_special_tokens = True
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.eod = find_eod(vocab, tokenizer_file)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(Tokenizer):
    """Text is already ids separated by spaces; EOD is the extra id ``vocab_size`` (as Megatron)."""

    def __init__(self, vocab_size: int):
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def encode(self, text: str) -> list[int]:
        return [int(piece) for piece in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


TOKENIZER_TYPES = get_args(TokenizerType)


def build_tokenizer(tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None,
                    tokenizer_model: str | None = None, vocab_size: int | None = None):
    """Build a tokenizer by its Megatron ``--tokenizer-type`` name."""
    def need(value, flag):
        if value is None:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag}")
        return value

    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(need(vocab_file, "--vocab-file"), need(merge_file, "--merge-file"))
    if tokenizer_type == "TikTokenizer":
        return TikTokenizer(need(vocab_file, "--vocab-file"), need(merge_file, "--merge-file"))
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(need(tokenizer_model or vocab_file, "--tokenizer-model (a tokenizer.json)"))
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(need(vocab_size, "--vocab-size"))
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")


def build_fast_tokenizer(tokenizer_type: str, **files):
    """The fastest tokenizer with the same output.  For GPT-2 BPE files that is our C++ BPE when
    ``megalite._data`` is built, else tiktoken when installed, else the Python BPE (tests check
    all three agree token for token)."""
    if tokenizer_type == "GPT2BPETokenizer":
        if native_data_module() is None:
            try:
                import tiktoken  # noqa: F401
            except ImportError:
                pass
            else:
                tokenizer_type = "TikTokenizer"
    return build_tokenizer(tokenizer_type, **files)
