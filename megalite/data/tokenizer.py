"""Tokenizers: GPT-2 byte-level BPE (ours), tiktoken and Hugging Face adapters, and a null one.

Every tokenizer has ``vocab_size``, ``eod``, ``encode(text) -> list[int]`` and
``decode(ids) -> str``.  ``encode`` treats the spelling of a special token ("<|endoftext|>")
as ordinary text: data can never inject a control token; only ``--append-eod`` adds EOD.

Byte-level BPE (Radford et al. 2019, GPT-2):
  1. split the text with a regex into words (letters, digits, punctuation runs, whitespace),
  2. write each word's UTF-8 bytes as printable characters (bytes_to_unicode below),
  3. repeatedly merge the adjacent pair with the lowest merge rank until no pair is in the merges.
The vocabulary file maps each merged string to its id; the merges file lists pairs by rank.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from functools import lru_cache

import regex

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
                             f"add {ENDOFTEXT!r} to the vocabulary (tools/train_tokenizer.py does)")


class GPT2BPETokenizer:
    """Our GPT-2 byte-level BPE over ``vocab_file`` (encoder.json / vocab.json) and ``merge_file``
    (vocab.bpe / merges.txt).  Pure Python; ``TikTokenizer`` gives the same ids, faster."""

    def __init__(self, vocab_file: str, merge_file: str, cache_size: int = 1 << 16):
        self.encoder = load_vocab(vocab_file)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(load_merges(merge_file))}
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
        ids = []
        for word in self.pattern.findall(text):
            ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


class TikTokenizer:
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


class HuggingFaceTokenizer:
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


class NullTokenizer:
    """Text is already ids separated by spaces; EOD is the extra id ``vocab_size`` (as Megatron)."""

    def __init__(self, vocab_size: int):
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def encode(self, text: str) -> list[int]:
        return [int(piece) for piece in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


TOKENIZER_TYPES = ("GPT2BPETokenizer", "TikTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


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
    """The fastest tokenizer with the same output: TikTokenizer for GPT-2 BPE files when tiktoken
    is installed (tests check the two agree token for token)."""
    if tokenizer_type == "GPT2BPETokenizer":
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            pass
        else:
            tokenizer_type = "TikTokenizer"
    return build_tokenizer(tokenizer_type, **files)
