// Sample and blending index builders (the Python references live in megalite/data/helpers.py).
#include <algorithm>
#include <limits>
#include <set>
#include <stdexcept>

#include "data.h"

namespace megalite_data {

namespace {

// Walks the documents in `document_index` order, cutting the token stream into samples of
// seq_length + add_extra_token tokens where consecutive samples share add_extra_token tokens
// (the last input token of one sample is the first of the next: labels are inputs shifted by one).
// Row i of the result is (position in document_index, token offset in that document) of the
// first token of sample i; row num_samples marks where the last sample ends.
template <typename T>
py::array_t<T> sample_idx_impl(const int32_t* sizes, const int32_t* document_index, int64_t num_documents,
                               int32_t seq_length, int64_t num_samples, int add_extra_token) {
  py::array_t<T> result({num_samples + 1, int64_t(2)});
  T* out = result.mutable_data();
  py::gil_scoped_release release;  // other Python threads (data loading) may run meanwhile
  int64_t doc_pos = 0;     // position in document_index
  int64_t doc_offset = 0;  // token offset inside that document
  out[0] = 0;
  out[1] = 0;
  for (int64_t sample = 1; sample <= num_samples; ++sample) {
    int64_t remaining = seq_length + add_extra_token;
    while (remaining != 0) {
      const int64_t left_in_doc = sizes[document_index[doc_pos]] - doc_offset;
      remaining -= left_in_doc;
      if (remaining <= 0) {
        // The sample ends inside this document; the next one starts add_extra_token earlier.
        doc_offset += remaining + left_in_doc - add_extra_token;
        remaining = 0;
      } else if (doc_pos == num_documents - 1) {
        // Out of documents: only the last, partial sample can get here.
        doc_offset = sizes[document_index[doc_pos]] - add_extra_token;
        break;
      } else {
        ++doc_pos;
        doc_offset = 0;
      }
    }
    out[2 * sample] = static_cast<T>(doc_pos);
    out[2 * sample + 1] = static_cast<T>(doc_offset);
  }
  return result;
}

}  // namespace

// The candidate dataset furthest below its share after sample i (weight x samples so far minus the
// samples it has given); the first one wins a tie, as in Megatron-LM's helper.
template <typename Candidates>
int32_t most_behind(const double* w, const std::vector<int64_t>& taken, int64_t i,
                    const Candidates& candidates) {
  const double position = std::max(static_cast<double>(i), 1.0);
  int32_t best = -1;
  double best_error = std::numeric_limits<double>::lowest();
  for (int32_t d : candidates) {
    const double error = w[d] * position - static_cast<double>(taken[d]);
    if (error > best_error) {
      best_error = error;
      best = d;
    }
  }
  return best;
}

py::array build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                           py::array_t<int32_t, py::array::c_style | py::array::forcecast> document_index,
                           int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                           bool drop_last_partial_sequence, int add_extra_token) {
  if (seq_length < 1) throw std::invalid_argument("seq_length must be >= 1, got " + std::to_string(seq_length));
  if (document_index.size() == 0) throw std::invalid_argument("document_index is empty");
  const int64_t total = int64_t(num_epochs) * tokens_per_epoch - add_extra_token;
  const int64_t num_samples = drop_last_partial_sequence ? total / seq_length : (total + seq_length - 1) / seq_length;
  if (num_samples < 0) throw std::invalid_argument("fewer tokens than one extra token: no samples");
  const int32_t* size_ptr = sizes.data();
  const int32_t* doc_ptr = document_index.data();
  const int64_t n_docs = document_index.size();
  int64_t max_value = n_docs;
  for (py::ssize_t i = 0; i < sizes.size(); ++i) max_value = std::max<int64_t>(max_value, size_ptr[i]);
  for (int64_t i = 0; i < n_docs; ++i) {
    if (doc_ptr[i] < 0 || doc_ptr[i] >= sizes.size())
      throw std::out_of_range("document_index[" + std::to_string(i) + "] = " + std::to_string(doc_ptr[i]) +
                              " is outside the " + std::to_string(sizes.size()) + " sequences");
  }
  // Megatron's choice of index dtype: int32 while every stored value fits.
  if (max_value <= std::numeric_limits<int32_t>::max())
    return sample_idx_impl<int32_t>(size_ptr, doc_ptr, n_docs, seq_length, num_samples, add_extra_token);
  return sample_idx_impl<int64_t>(size_ptr, doc_ptr, n_docs, seq_length, num_samples, add_extra_token);
}

// Greedy blending: sample i goes to the dataset furthest below its target share
// (weight * max(i, 1) - samples taken so far); ties go to the lowest dataset id.
void build_blending_indices(py::array_t<int16_t> dataset_index, py::array_t<int64_t> dataset_sample_index,
                            py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                            int32_t num_datasets, int64_t size) {
  if (dataset_index.size() < size || dataset_sample_index.size() < size)
    throw std::invalid_argument("output arrays are shorter than size " + std::to_string(size));
  if (weights.size() < num_datasets) throw std::invalid_argument("fewer weights than datasets");
  auto out_dataset = dataset_index.mutable_unchecked<1>();
  auto out_sample = dataset_sample_index.mutable_unchecked<1>();
  const double* w = weights.data();
  std::vector<int64_t> taken(num_datasets, 0);
  std::vector<int32_t> all(num_datasets);
  for (int32_t d = 0; d < num_datasets; ++d) all[d] = d;
  for (int64_t i = 0; i < size; ++i) {
    const int32_t best = most_behind(w, taken, i, all);
    out_dataset(i) = static_cast<int16_t>(best);
    out_sample(i) = taken[best]++;
  }
}

// As above with weights sizes / sum(sizes), but dataset d is dropped once it has given exactly
// sizes[d] samples, so every sample of every dataset is used once.
void build_exhaustive_blending_indices(py::array_t<int16_t> dataset_index,
                                       py::array_t<int64_t> dataset_sample_index,
                                       py::array_t<int64_t, py::array::c_style | py::array::forcecast> sizes,
                                       int32_t num_datasets) {
  const int64_t* size_ptr = sizes.data();
  int64_t total = 0;
  for (int32_t d = 0; d < num_datasets; ++d) {
    if (size_ptr[d] <= 0) throw std::invalid_argument("dataset " + std::to_string(d) + " has size " +
                                                      std::to_string(size_ptr[d]) + "; sizes must be positive");
    total += size_ptr[d];
  }
  if (dataset_index.size() < total || dataset_sample_index.size() < total)
    throw std::invalid_argument("output arrays are shorter than the total size " + std::to_string(total));
  auto out_dataset = dataset_index.mutable_unchecked<1>();
  auto out_sample = dataset_sample_index.mutable_unchecked<1>();
  std::vector<double> w(num_datasets);
  for (int32_t d = 0; d < num_datasets; ++d) w[d] = size_ptr[d] / static_cast<double>(total);
  std::vector<int64_t> taken(num_datasets, 0);
  std::set<int32_t> open;
  for (int32_t d = 0; d < num_datasets; ++d) open.insert(d);
  for (int64_t i = 0; !open.empty(); ++i) {
    const int32_t best = most_behind(w.data(), taken, i, open);
    out_dataset(i) = static_cast<int16_t>(best);
    out_sample(i) = taken[best]++;
    if (taken[best] == size_ptr[best]) open.erase(best);
  }
}

}  // namespace megalite_data
