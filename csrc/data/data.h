// megalite._data: the indexed-dataset builder and the sample / blending index helpers.
// pybind11 + numpy only (no torch headers), so this extension compiles in seconds.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
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
