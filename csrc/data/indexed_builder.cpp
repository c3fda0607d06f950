// The indexed-dataset builder: the same bytes as megalite/data/indexed.py's Python builder.
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "data.h"

namespace megalite_data {

namespace {
constexpr size_t kBufferBytes = size_t(16) << 20;  // one fwrite per 16 MiB of tokens
const char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};

std::string io_error(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

void write_all(FILE* f, const void* data, size_t nbytes, const std::string& path) {
  if (nbytes && std::fwrite(data, 1, nbytes, f) != nbytes) throw std::runtime_error(io_error("cannot write", path));
}
}  // namespace

IndexedDatasetBuilder::IndexedDatasetBuilder(const std::string& bin_path, int dtype_code, int itemsize)
    : bin_path_(bin_path), dtype_code_(dtype_code), itemsize_(itemsize), buffer_(kBufferBytes) {
  bin_ = std::fopen(bin_path.c_str(), "wb");
  if (!bin_) throw std::runtime_error(io_error("cannot open", bin_path));
}

IndexedDatasetBuilder::~IndexedDatasetBuilder() {
  if (bin_) std::fclose(bin_);
}

void IndexedDatasetBuilder::flush() {
  write_all(bin_, buffer_.data(), buffered_, bin_path_);
  buffered_ = 0;
}

void IndexedDatasetBuilder::append_bytes(const void* data, size_t nbytes) {
  if (!bin_) throw std::runtime_error("builder for " + bin_path_ + " is already finalized");
  if (buffered_ + nbytes > buffer_.size()) {
    flush();
    if (nbytes > buffer_.size()) {  // a huge document goes straight to the file
      write_all(bin_, data, nbytes, bin_path_);
      return;
    }
  }
  std::memcpy(buffer_.data() + buffered_, data, nbytes);
  buffered_ += nbytes;
}

size_t IndexedDatasetBuilder::token_count(const py::buffer_info& info) const {
  if (info.itemsize != itemsize_) {
    throw std::invalid_argument("tokens have itemsize " + std::to_string(info.itemsize) +
                                ", the builder's dtype has " + std::to_string(itemsize_));
  }
  return static_cast<size_t>(info.size);
}

void IndexedDatasetBuilder::add_item(py::buffer tokens) {
  py::buffer_info info = tokens.request();
  size_t n = token_count(info);
  append_bytes(info.ptr, n * itemsize_);
  sequence_lengths_.push_back(static_cast<int32_t>(n));
}

void IndexedDatasetBuilder::end_document() {
  document_indices_.push_back(static_cast<int64_t>(sequence_lengths_.size()));
}

void IndexedDatasetBuilder::add_document(py::buffer tokens,
                                         py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths) {
  py::buffer_info info = tokens.request();
  size_t n = token_count(info);
  append_bytes(info.ptr, n * itemsize_);
  auto len = lengths.unchecked<1>();
  for (py::ssize_t i = 0; i < len.shape(0); ++i) sequence_lengths_.push_back(static_cast<int32_t>(len(i)));
  end_document();
}

void IndexedDatasetBuilder::add_index(const std::string& bin_path,
                                      py::array_t<int32_t, py::array::c_style | py::array::forcecast> lengths,
                                      py::array_t<int64_t, py::array::c_style | py::array::forcecast> document_indices) {
  // Offset the other index by the sequences already here; its leading 0 is our last boundary.
  const int64_t offset = static_cast<int64_t>(sequence_lengths_.size());
  const int32_t* len = lengths.data();
  sequence_lengths_.insert(sequence_lengths_.end(), len, len + lengths.size());
  const int64_t* doc = document_indices.data();
  for (py::ssize_t i = 1; i < document_indices.size(); ++i) document_indices_.push_back(doc[i] + offset);

  flush();
  FILE* src = std::fopen(bin_path.c_str(), "rb");
  if (!src) throw std::runtime_error(io_error("cannot open", bin_path));
  size_t got;
  while ((got = std::fread(buffer_.data(), 1, buffer_.size(), src)) > 0) write_all(bin_, buffer_.data(), got, bin_path_);
  bool failed = std::ferror(src);
  std::fclose(src);
  if (failed) throw std::runtime_error(io_error("cannot read", bin_path));
}

void IndexedDatasetBuilder::finalize(const std::string& idx_path) {
  flush();
  if (std::fclose(bin_) != 0) {
    bin_ = nullptr;
    throw std::runtime_error(io_error("cannot close", bin_path_));
  }
  bin_ = nullptr;

  std::vector<int64_t> pointers(sequence_lengths_.size());
  int64_t byte_offset = 0;
  for (size_t i = 0; i < sequence_lengths_.size(); ++i) {
    pointers[i] = byte_offset;
    byte_offset += static_cast<int64_t>(sequence_lengths_[i]) * itemsize_;
  }

  FILE* idx = std::fopen(idx_path.c_str(), "wb");
  if (!idx) throw std::runtime_error(io_error("cannot open", idx_path));
  const uint64_t version = 1, sequence_count = sequence_lengths_.size(), document_count = document_indices_.size();
  const uint8_t code = static_cast<uint8_t>(dtype_code_);
  // The format is little-endian; so are the machines we build for (x86-64, aarch64).
  write_all(idx, kMagic, sizeof(kMagic), idx_path);
  write_all(idx, &version, 8, idx_path);
  write_all(idx, &code, 1, idx_path);
  write_all(idx, &sequence_count, 8, idx_path);
  write_all(idx, &document_count, 8, idx_path);
  write_all(idx, sequence_lengths_.data(), 4 * sequence_lengths_.size(), idx_path);
  write_all(idx, pointers.data(), 8 * pointers.size(), idx_path);
  write_all(idx, document_indices_.data(), 8 * document_indices_.size(), idx_path);
  if (std::fclose(idx) != 0) throw std::runtime_error(io_error("cannot close", idx_path));
}

}  // namespace megalite_data
