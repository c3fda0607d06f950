// The indexed-dataset builder: the same bytes as megalite/data/indexed.py's Python builder.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>

#include "data.h"

namespace megalite_data {

namespace {
// Whether integer value v is representable in Dst (signed/unsigned aware).
template <typename Dst, typename Src>
bool in_range(Src v) {
  if constexpr (std::is_floating_point_v<Dst>) {
    return true;
  } else if constexpr (std::is_signed_v<Src>) {
    return v >= 0 ? static_cast<uint64_t>(v) <= static_cast<uint64_t>(std::numeric_limits<Dst>::max())
                  : std::is_signed_v<Dst> && static_cast<int64_t>(v) >= static_cast<int64_t>(std::numeric_limits<Dst>::min());
  } else {
    return static_cast<uint64_t>(v) <= static_cast<uint64_t>(std::numeric_limits<Dst>::max());
  }
}

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

template <typename Src, typename Dst>
void IndexedDatasetBuilder::append_converted(const Src* src, size_t n) {
  if constexpr (!std::is_same_v<Src, Dst>) {
    // One pass for the range (vectorizes), then one converting copy in buffer-sized pieces.
    if (n) {
      Src lo = src[0], hi = src[0];
      for (size_t i = 1; i < n; ++i) {
        lo = src[i] < lo ? src[i] : lo;
        hi = src[i] > hi ? src[i] : hi;
      }
      if (!in_range<Dst>(lo) || !in_range<Dst>(hi)) {   // always in range for a float dataset
        throw std::invalid_argument("token id " + std::to_string(in_range<Dst>(lo) ? hi : lo) +
                                    " does not fit the dataset's dtype (code " + std::to_string(dtype_code_) +
                                    "); use a wider --dtype / a vocabulary that fits");
      }
    }
  }
  if (!bin_) throw std::runtime_error("builder for " + bin_path_ + " is already finalized");
  while (n) {
    if (buffered_ + sizeof(Dst) > buffer_.size()) flush();
    const size_t take = std::min(n, (buffer_.size() - buffered_) / sizeof(Dst));
    Dst* out = reinterpret_cast<Dst*>(buffer_.data() + buffered_);
    for (size_t i = 0; i < take; ++i) out[i] = static_cast<Dst>(src[i]);
    buffered_ += take * sizeof(Dst);
    src += take;
    n -= take;
  }
}

template <typename Src>
void IndexedDatasetBuilder::append_from(const Src* src, size_t n) {
  switch (dtype_code_) {  // Megatron's dtype codes (megalite/data/indexed.py DTYPE_CODES)
    case 1: return append_converted<Src, uint8_t>(src, n);
    case 2: return append_converted<Src, int8_t>(src, n);
    case 3: return append_converted<Src, int16_t>(src, n);
    case 4: return append_converted<Src, int32_t>(src, n);
    case 5: return append_converted<Src, int64_t>(src, n);
    case 6: return append_converted<Src, double>(src, n);
    case 7: return append_converted<Src, float>(src, n);
    case 8: return append_converted<Src, uint16_t>(src, n);
    default: throw std::invalid_argument("unknown dtype code " + std::to_string(dtype_code_));
  }
}

size_t IndexedDatasetBuilder::append_tokens(const py::array& tokens) {
  if (!(tokens.flags() & py::array::c_style)) throw std::invalid_argument("tokens must be C-contiguous");
  const size_t n = static_cast<size_t>(tokens.size());
  const py::dtype dt = tokens.dtype();
  const char kind = dt.kind();
  const void* ptr = tokens.data();
  if (kind != 'i' && kind != 'u') {
    throw std::invalid_argument(std::string("token ids must be integers, got dtype kind '") + kind + "'");
  }
  const bool is_signed = kind == 'i';
  switch (dt.itemsize()) {
    case 1: is_signed ? append_from(static_cast<const int8_t*>(ptr), n) : append_from(static_cast<const uint8_t*>(ptr), n); break;
    case 2: is_signed ? append_from(static_cast<const int16_t*>(ptr), n) : append_from(static_cast<const uint16_t*>(ptr), n); break;
    case 4: is_signed ? append_from(static_cast<const int32_t*>(ptr), n) : append_from(static_cast<const uint32_t*>(ptr), n); break;
    case 8: is_signed ? append_from(static_cast<const int64_t*>(ptr), n) : append_from(static_cast<const uint64_t*>(ptr), n); break;
    default: throw std::invalid_argument("unsupported token itemsize " + std::to_string(dt.itemsize()));
  }
  return n;
}

void IndexedDatasetBuilder::add_item(py::array tokens) {
  sequence_lengths_.push_back(static_cast<int32_t>(append_tokens(tokens)));
}

void IndexedDatasetBuilder::end_document() {
  document_indices_.push_back(static_cast<int64_t>(sequence_lengths_.size()));
}

void IndexedDatasetBuilder::add_document(py::array tokens,
                                         py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths) {
  auto len = lengths.unchecked<1>();
  int64_t total = 0;
  for (py::ssize_t i = 0; i < len.shape(0); ++i) total += len(i);
  if (total != static_cast<int64_t>(tokens.size())) {
    throw std::invalid_argument("add_document: the lengths sum to " + std::to_string(total) +
                                " but the document has " + std::to_string(tokens.size()) + " tokens");
  }
  append_tokens(tokens);
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
