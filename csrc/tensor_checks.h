// Tensor checks shared by the two binding units (csrc/cpu/bindings.cpp, csrc/cuda/bindings.cpp):
// dtype mapping, device/contiguity checks and the gathering of parallel tensor lists into raw
// pointers.  Needs the torch headers; include it only from those two files.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "dtypes.h"

namespace megalite {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK(false, name, " has dtype ", t.scalar_type(), "; megalite kernels take float32, bfloat16, float16");
  }
  return DType::Float32;
}

inline void check_on(const at::Tensor& t, const at::Device& device, const std::string& name) {
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the other inputs are on ", device);
  TORCH_CHECK(t.is_contiguous(), name, " is not contiguous; pass ", name, ".contiguous()");
}

// Raw pointers and sizes of parallel tensor lists, checked: equal lengths and numels, one device,
// contiguous, and the given dtype (Undefined: any).  The messages are built only on failure
// (TORCH_CHECK evaluates them lazily): this runs on every optimizer step over every tensor.
struct TensorLists {
  std::vector<std::vector<void*>> pointers;   // [list][tensor]
  std::vector<int64_t> numels;
};

inline TensorLists gather_lists(const std::vector<std::pair<at::TensorList, at::ScalarType>>& lists,
                                const std::vector<const char*>& names, const at::Device& device) {
  TensorLists out;
  const size_t count = lists[0].first.size();
  for (size_t l = 0; l < lists.size(); ++l) {
    TORCH_CHECK(lists[l].first.size() == count, names[l], " has ", lists[l].first.size(), " tensors, ", names[0],
                " has ", count);
  }
  out.pointers.resize(lists.size());
  for (size_t i = 0; i < count; ++i) {
    const int64_t numel = lists[0].first[i].numel();
    for (size_t l = 0; l < lists.size(); ++l) {
      const at::Tensor& t = lists[l].first[i];
      TORCH_CHECK(t.device() == device, names[l], "[", i, "] is on ", t.device(), " but the other inputs are on ",
                  device);
      TORCH_CHECK(t.is_contiguous(), names[l], "[", i, "] is not contiguous; pass ", names[l], "[", i,
                  "].contiguous()");
      TORCH_CHECK(lists[l].second == at::ScalarType::Undefined || t.scalar_type() == lists[l].second, names[l], "[",
                  i, "] has dtype ", t.scalar_type(), ", expected ", lists[l].second);
      TORCH_CHECK(t.numel() == numel, names[l], "[", i, "] has ", t.numel(), " elements, ", names[0], "[", i,
                  "] has ", numel);
      out.pointers[l].push_back(t.data_ptr());
    }
    out.numels.push_back(numel);
  }
  return out;
}

// The Adam ops' scalars, checked in C++ as well as in megalite/optim/adam.py so that a direct
// torch.ops.megalite call fails the same way: step < 1 makes the bias correction 1 - beta1^step
// zero or negative (an infinite or reversed step), and a loss scale that is not a positive finite
// number turns every gradient into inf, nan or its negation.
inline void check_adam_scalars(int64_t step, double grad_scale) {
  TORCH_CHECK(step >= 1, "step ", step, " must be a positive integer (the 1-based count of updates)");
  TORCH_CHECK(grad_scale > 0 && std::isfinite(grad_scale), "grad_scale ", grad_scale,
              " must be a positive finite number (the loss scale)");
}

template <typename T>
std::vector<T*> typed(const std::vector<void*>& pointers) {
  std::vector<T*> out(pointers.size());
  for (size_t i = 0; i < pointers.size(); ++i) out[i] = static_cast<T*>(pointers[i]);
  return out;
}

}  // namespace megalite
