// GPT-2 byte-level BPE in C++: the same ids as megalite/data/tokenizer.py's pure-Python
// reference (and tiktoken's gpt2), several times faster than either.
//
// Encoding is two steps:
//  1. Pre-tokenize the UTF-8 text with GPT-2's pattern
//       's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//     written out by hand (split_next below) over a per-code-point class table that Python
//     builds with the `regex` module, so both implementations agree on what a letter is.
//  2. BPE each piece: start from one symbol per byte and repeatedly merge every occurrence of the
//     adjacent pair with the lowest merge rank, left to right, until no pair is in the merges.
//     Pieces repeat a lot in real text, so results are cached (bounded: cleared when full).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "data.h"

namespace megalite_data {

namespace {
constexpr uint8_t kSpace = 4;  // the class of whitespace; letters are 1, numbers 2, other 0
constexpr size_t kMaxCodePoint = 0x110000;
constexpr size_t kMaxCachedPiece = 64;  // longer pieces (long runs of one class) are rare: not cached

// Decodes the code point starting at s[i] (valid UTF-8: Python produced it); sets its length.
inline uint32_t decode_utf8(const unsigned char* s, size_t i, size_t* length) {
  const unsigned char c = s[i];
  if (c < 0x80) { *length = 1; return c; }
  if (c < 0xE0) { *length = 2; return ((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu); }
  if (c < 0xF0) { *length = 3; return ((c & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu); }
  *length = 4;
  return ((c & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu);
}

size_t round_up_to_power_of_two(size_t n) {
  size_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
}  // namespace

ByteLevelBPE::ByteLevelBPE(py::array_t<uint8_t, py::array::c_style | py::array::forcecast> classes,
                           const std::vector<std::pair<py::bytes, int32_t>>& vocab,
                           const std::vector<std::pair<py::bytes, py::bytes>>& merges, size_t cache_size)
    : slots_(round_up_to_power_of_two(2 * std::max<size_t>(cache_size, 16))) {
  if (classes.ndim() != 1 || static_cast<size_t>(classes.shape(0)) != kMaxCodePoint)
    throw std::invalid_argument("code-point class table must have 0x110000 entries, got " +
                                std::to_string(classes.size()));
  classes_.assign(classes.data(), classes.data() + kMaxCodePoint);
  for (const auto& [token, id] : vocab) vocab_.emplace(std::string(token), id);
  for (int b = 0; b < 256; ++b) {
    auto it = vocab_.find(std::string(1, static_cast<char>(b)));
    if (it == vocab_.end())
      throw std::invalid_argument("vocabulary lacks the single byte " + std::to_string(b) +
                                  "; a byte-level BPE vocabulary holds all 256 bytes");
    byte_ids_[b] = it->second;
  }
  int32_t rank = 0;
  for (const auto& [left_bytes, right_bytes] : merges) {
    const std::string left(left_bytes), right(right_bytes);
    auto l = vocab_.find(left), r = vocab_.find(right), m = vocab_.find(left + right);
    if (l == vocab_.end() || r == vocab_.end() || m == vocab_.end())
      throw std::invalid_argument("merge " + std::to_string(rank + 1) + " names a token that is not in the vocabulary");
    // A pair listed twice keeps its last rank, as GPT-2's encoder.py (a dict built in order) does.
    merges_.insert_or_assign(pair_key(l->second, r->second), Merge{rank, m->second});
    ++rank;
  }
}

// Byte length of the next pre-token at text[i] (i < n).  The cases follow the pattern's
// alternatives in order; a regex engine takes the first alternative that matches.
size_t ByteLevelBPE::split_next(const unsigned char* s, size_t i, size_t n) const {
  // 's 't 'm 'd 're 've 'll
  if (s[i] == '\'' && i + 1 < n) {
    const unsigned char a = s[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 < n) {
      const unsigned char b = s[i + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
  }
  size_t len;
  const uint8_t first = char_class(decode_utf8(s, i, &len));
  // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': an optional ASCII space, then a run of one class.
  size_t start = i;
  uint8_t run_class = first;
  if (s[i] == ' ' && i + 1 < n) {
    size_t next_len;
    const uint8_t next = char_class(decode_utf8(s, i + 1, &next_len));
    if (next != kSpace) { start = i + 1; run_class = next; }
  }
  if (run_class != kSpace) {
    size_t j = start;
    while (j < n) {
      size_t l;
      if (char_class(decode_utf8(s, j, &l)) != run_class) break;
      j += l;
    }
    return j - i;
  }
  // '\s+(?!\S)' then '\s+': a whitespace run; before a non-space it leaves its last character
  // (which then starts the next piece, e.g. " word"), unless the run is that one character.
  size_t j = i, last = i;
  while (j < n) {
    size_t l;
    if (char_class(decode_utf8(s, j, &l)) != kSpace) break;
    last = j;
    j += l;
  }
  if (j == n || last == i) return j - i;
  return last - i;
}

// A code point's class; letters, numbers and whitespace are disjoint, anything else is "other" (0).
inline uint8_t ByteLevelBPE::char_class(uint32_t cp) const {
  return cp < kMaxCodePoint ? classes_[cp] : 0;
}

void ByteLevelBPE::bpe(const unsigned char* piece, size_t n, std::vector<int32_t>* out) {
  std::vector<int32_t>& parts = scratch_;
  parts.clear();
  for (size_t k = 0; k < n; ++k) parts.push_back(byte_ids_[piece[k]]);
  while (parts.size() > 1) {
    int32_t best_rank = INT32_MAX, best_left = 0, best_right = 0, merged = 0;
    for (size_t k = 0; k + 1 < parts.size(); ++k) {
      auto it = merges_.find(pair_key(parts[k], parts[k + 1]));
      if (it != merges_.end() && it->second.rank < best_rank) {
        best_rank = it->second.rank;
        best_left = parts[k];
        best_right = parts[k + 1];
        merged = it->second.id;
      }
    }
    if (best_rank == INT32_MAX) break;
    size_t w = 0;
    for (size_t k = 0; k < parts.size(); ++k) {  // merge every occurrence, left to right
      if (k + 1 < parts.size() && parts[k] == best_left && parts[k + 1] == best_right) {
        parts[w++] = merged;
        ++k;
      } else {
        parts[w++] = parts[k];
      }
    }
    parts.resize(w);
  }
  out->insert(out->end(), parts.begin(), parts.end());
}

namespace {
// A fast hash of a short byte string (pieces average a few bytes): 8 bytes per multiply.
inline uint64_t hash_bytes(const unsigned char* s, size_t n) {
  uint64_t h = 0x243F6A8885A308D3ull ^ n;
  while (n >= 8) {
    uint64_t chunk;
    std::memcpy(&chunk, s, 8);
    h = (h ^ chunk) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 29;
    s += 8;
    n -= 8;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, s, n);
  h = (h ^ tail) * 0x9E3779B97F4A7C15ull;
  return h ^ (h >> 32);
}
}  // namespace

// The piece cache: open addressing over a power-of-two table; keys and ids live in two arenas.
// When half full it is emptied (cheaper than evicting, and the next pieces refill it).
const int32_t* ByteLevelBPE::cache_find(const unsigned char* piece, size_t n, uint64_t hash, uint32_t* count) const {
  for (size_t slot = hash & (slots_.size() - 1);; slot = (slot + 1) & (slots_.size() - 1)) {
    const CacheSlot& c = slots_[slot];
    if (c.key_length == 0) return nullptr;
    if (c.hash == hash && c.key_length == n && std::memcmp(cache_keys_.data() + c.key_start, piece, n) == 0) {
      *count = c.id_count;
      return cache_ids_.data() + c.id_start;
    }
  }
}

void ByteLevelBPE::cache_insert(const unsigned char* piece, size_t n, uint64_t hash, const int32_t* ids, size_t count) {
  if (2 * (cache_entries_ + 1) > slots_.size()) {
    std::fill(slots_.begin(), slots_.end(), CacheSlot{});
    cache_keys_.clear();
    cache_ids_.clear();
    cache_entries_ = 0;
  }
  size_t slot = hash & (slots_.size() - 1);
  while (slots_[slot].key_length != 0) slot = (slot + 1) & (slots_.size() - 1);
  slots_[slot] = CacheSlot{hash, static_cast<uint32_t>(cache_keys_.size()), static_cast<uint32_t>(n),
                           static_cast<uint32_t>(cache_ids_.size()), static_cast<uint32_t>(count)};
  cache_keys_.insert(cache_keys_.end(), piece, piece + n);
  cache_ids_.insert(cache_ids_.end(), ids, ids + count);
  ++cache_entries_;
}

void ByteLevelBPE::encode_into(const unsigned char* s, size_t n, std::vector<int32_t>* out) {
  size_t i = 0;
  while (i < n) {
    const size_t len = split_next(s, i, n);
    const uint64_t hash = hash_bytes(s + i, len);
    uint32_t count;
    if (const int32_t* ids = cache_find(s + i, len, hash, &count)) {
      out->insert(out->end(), ids, ids + count);
    } else {
      const size_t before = out->size();
      bpe(s + i, len, out);
      if (len <= kMaxCachedPiece) cache_insert(s + i, len, hash, out->data() + before, out->size() - before);
    }
    i += len;
  }
}

py::array_t<int32_t> ByteLevelBPE::encode(py::bytes utf8, int64_t append) {
  char* data;
  Py_ssize_t size;
  if (PyBytes_AsStringAndSize(utf8.ptr(), &data, &size) != 0) throw py::error_already_set();
  out_.clear();
  encode_into(reinterpret_cast<const unsigned char*>(data), static_cast<size_t>(size), &out_);
  if (append >= 0) out_.push_back(static_cast<int32_t>(append));
  py::array_t<int32_t> result(static_cast<py::ssize_t>(out_.size()));
  std::copy(out_.begin(), out_.end(), result.mutable_data());
  return result;
}

}  // namespace megalite_data
