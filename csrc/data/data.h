// megalite._data: the indexed-dataset builder and the sample / blending index helpers.
// pybind11 + numpy only (no torch headers), so this extension compiles in seconds.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace megalite_data {
namespace py = pybind11;

// Writes <prefix>.bin through a large in-memory buffer and keeps the index in growable native
// arrays; finalize() writes the MMIDIDX .idx (layout in megalite/data/indexed.py).
class IndexedDatasetBuilder {
 public:
  IndexedDatasetBuilder(const std::string& bin_path, int dtype_code, int itemsize);
  ~IndexedDatasetBuilder();
  // tokens: a C-contiguous array of any integer dtype; it is converted to the builder's dtype
  // while being copied into the write buffer (no temporary), and a value the dtype cannot hold
  // is refused.
  void add_item(py::array tokens);
  void end_document();
  void add_document(py::array tokens, py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths);
  void add_index(const std::string& bin_path, py::array_t<int32_t, py::array::c_style | py::array::forcecast> lengths,
                 py::array_t<int64_t, py::array::c_style | py::array::forcecast> document_indices);
  void finalize(const std::string& idx_path);

 private:
  size_t append_tokens(const py::array& tokens);   // returns the token count
  template <typename Src, typename Dst>
  void append_converted(const Src* src, size_t n);
  template <typename Src>
  void append_from(const Src* src, size_t n);
  void flush();

  std::string bin_path_;
  FILE* bin_ = nullptr;
  int dtype_code_;
  int itemsize_;
  std::vector<char> buffer_;
  size_t buffered_ = 0;
  std::vector<int32_t> sequence_lengths_;
  std::vector<int64_t> document_indices_{0};
};

// GPT-2 byte-level BPE (csrc/data/bpe.cpp).  classes: one byte per code point (1 letter,
// 2 number, 4 whitespace, 0 other); vocab: token bytes -> id; merges: pairs of token bytes in
// rank order.  Not thread-safe (it caches): one instance per process or thread.
class ByteLevelBPE {
 public:
  ByteLevelBPE(py::array_t<uint8_t, py::array::c_style | py::array::forcecast> classes,
               const std::vector<std::pair<py::bytes, int32_t>>& vocab,
               const std::vector<std::pair<py::bytes, py::bytes>>& merges, size_t cache_size);
  // The ids of UTF-8 text, plus `append` at the end when it is >= 0 (the EOD of a document).
  py::array_t<int32_t> encode(py::bytes utf8, int64_t append);

 private:
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }
  uint8_t char_class(uint32_t code_point) const;
  size_t split_next(const unsigned char* s, size_t i, size_t n) const;
  void bpe(const unsigned char* piece, size_t n, std::vector<int32_t>* out);
  void encode_into(const unsigned char* s, size_t n, std::vector<int32_t>* out);
  const int32_t* cache_find(const unsigned char* piece, size_t n, uint64_t hash, uint32_t* count) const;
  void cache_insert(const unsigned char* piece, size_t n, uint64_t hash, const int32_t* ids, size_t count);

  std::vector<uint8_t> classes_;
  std::unordered_map<std::string, int32_t> vocab_;
  int32_t byte_ids_[256];
  std::unordered_map<uint64_t, Merge> merges_;
  struct CacheSlot {
    uint64_t hash = 0;
    uint32_t key_start = 0, key_length = 0;  // key_length 0: an empty slot (pieces are never empty)
    uint32_t id_start = 0, id_count = 0;
  };
  std::vector<CacheSlot> slots_;  // piece -> ids: at most half full, then emptied
  size_t cache_entries_ = 0;
  std::vector<unsigned char> cache_keys_;
  std::vector<int32_t> cache_ids_;
  std::vector<int32_t> scratch_, out_;
};

py::array build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                           py::array_t<int32_t, py::array::c_style | py::array::forcecast> document_index,
                           int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                           bool drop_last_partial_sequence, int add_extra_token);

void build_blending_indices(py::array_t<int16_t> dataset_index, py::array_t<int64_t> dataset_sample_index,
                            py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                            int32_t num_datasets, int64_t size);

void build_exhaustive_blending_indices(py::array_t<int16_t> dataset_index,
                                       py::array_t<int64_t> dataset_sample_index,
                                       py::array_t<int64_t, py::array::c_style | py::array::forcecast> sizes,
                                       int32_t num_datasets);

}  // namespace megalite_data
