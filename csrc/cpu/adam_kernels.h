// CPU fused Adam: one OpenMP parallel region per call over all tensors of a parameter group.
//
// Included by kernels_generic.cpp, kernels_avx2.cpp and kernels_avx512.cpp; everything here has
// internal linkage (anonymous namespace) so each includer gets its own copy compiled for its
// instruction set.  A system header these kernel headers start to use must also be included above
// the target pragmas of kernels_avx2.cpp and kernels_avx512.cpp (why: there;
// tests/ops/test_kernel_build.py fails until it is).
#pragma once

#include <omp.h>

#include <cstdint>

#include "adam_math.h"
#include "cpu/float_formats.h"
#include "cpu/row_sums.h"
#include "cpu/streaming_stores.h"

namespace megalite::cpu {
namespace {

// Below this many elements one thread does the work: starting a parallel region costs more.
constexpr int64_t kMinElementsPerThread = 1 << 15;

// The multi-tensor split: view the tensors as one concatenated range of elements, cut it into one
// contiguous share per thread (a multiple of 64 elements, so vector loops stay aligned), and call
// body(tensor, begin, end) for each piece of a tensor inside this thread's share.  148 tensors of
// sizes 768 .. 38M balance as well as one big tensor would, with one fork/join per call.
template <typename Body>
void parallel_over_elements(const int64_t* numels, int64_t num_tensors, int num_threads, const Body& body) {
  int64_t total = 0;
  for (int64_t t = 0; t < num_tensors; ++t) total += numels[t];
  if (total == 0) return;
  const int64_t wanted = total / kMinElementsPerThread;
  const int threads = static_cast<int>(wanted < num_threads ? (wanted < 1 ? 1 : wanted) : num_threads);
#pragma omp parallel num_threads(threads)
  {
    const int64_t count = omp_get_num_threads();
    const int64_t share = ((total + count - 1) / count + 63) / 64 * 64;
    const int64_t begin = omp_get_thread_num() * share;
    const int64_t end = begin + share < total ? begin + share : total;
    int64_t offset = 0;
    for (int64_t t = 0; t < num_tensors && offset < end; offset += numels[t], ++t) {
      const int64_t lo = begin > offset ? begin : offset;
      const int64_t hi = end < offset + numels[t] ? end : offset + numels[t];
      if (lo < hi) body(t, lo - offset, hi - offset);
    }
  }
}

void adam_fp32(float* const* params, const float* const* grads, float* const* exp_avgs, float* const* exp_avg_sqs,
               const int64_t* numels, int64_t num_tensors, const AdamHyper& hyper, int num_threads) {
  parallel_over_elements(numels, num_tensors, num_threads, [&](int64_t t, int64_t begin, int64_t end) {
    const AdamHyper h = hyper;   // a local copy: provably not aliased by the stores below
    float* __restrict p = params[t];
    const float* __restrict g = grads[t];
    float* __restrict m = exp_avgs[t];
    float* __restrict v = exp_avg_sqs[t];
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) adam_update(p[i], m[i], v[i], g[i], h);
  });
}

// Pass 1 of the master-weight step: is any unscaled gradient inf/nan?  x * 0 is 0 for finite x and
// nan otherwise, and nan survives a sum, so this is one vectorized reduction per piece.
template <typename TGrad>
bool any_nonfinite(const void* const* grads, const int64_t* numels, int64_t num_tensors, float inv_grad_scale,
                   int num_threads) {
  int found = 0;
  parallel_over_elements(numels, num_tensors, num_threads, [&](int64_t t, int64_t begin, int64_t end) {
    const TGrad* __restrict g = static_cast<const TGrad*>(grads[t]);
    const float scale = inv_grad_scale;   // a local, not the captured reference: lets the loop vectorize
    const float probe = row_sum(begin, end, [=](int64_t i) { return load(g[i]) * scale * 0.f; });
    if (probe != probe) {
#pragma omp atomic write
      found = 1;
    }
  });
  return found != 0;
}

template <class Rounding, typename TModel, typename TGrad>
bool adam_master_typed(void* const* model_params, const void* const* grads, float* const* masters,
                       float* const* exp_avgs, float* const* exp_avg_sqs, const int64_t* numels, int64_t num_tensors,
                       const AdamHyper& hyper, float inv_grad_scale, bool check_finite, bool stream_model,
                       int num_threads) {
  // All or nothing: a step with an overflowed gradient must leave every tensor untouched, so the
  // check runs over all gradients before the first write (it reads only the gradients).
  if (check_finite && any_nonfinite<TGrad>(grads, numels, num_tensors, inv_grad_scale, num_threads)) return true;
  parallel_over_elements(numels, num_tensors, num_threads, [&](int64_t t, int64_t begin, int64_t end) {
    const AdamHyper h = hyper;
    const float scale = inv_grad_scale;
    TModel* __restrict model = static_cast<TModel*>(model_params[t]);
    const TGrad* __restrict g = static_cast<const TGrad*>(grads[t]);
    float* __restrict p = masters[t];
    float* __restrict m = exp_avgs[t];
    float* __restrict v = exp_avg_sqs[t];
    write_row<Rounding>(model + begin, end - begin, stream_model, [=](int64_t j) {
      const int64_t i = begin + j;
      adam_update(p[i], m[i], v[i], load(g[i]) * scale, h);
      return p[i];
    });
    end_streaming(stream_model);
  });
  return false;
}

// Rounding: how the rounded masters are written (PortableRounding, or the table's own; see write_row).
template <class Rounding>
bool adam_master(void* const* model_params, DType model_dtype, const void* const* grads, DType grad_dtype,
                 float* const* masters, float* const* exp_avgs, float* const* exp_avg_sqs, const int64_t* numels,
                 int64_t num_tensors, const AdamHyper& hyper, float inv_grad_scale, bool check_finite,
                 bool stream_model, int num_threads) {
  auto run = [&](auto model_tag, auto grad_tag) {
    return adam_master_typed<Rounding, decltype(model_tag), decltype(grad_tag)>(
        model_params, grads, masters, exp_avgs, exp_avg_sqs, numels, num_tensors, hyper, inv_grad_scale, check_finite,
        stream_model, num_threads);
  };
  auto with_grad = [&](auto model_tag) {
    switch (grad_dtype) {
      case DType::Float32: return run(model_tag, float{});
      case DType::BFloat16: return run(model_tag, bf16{});
      case DType::Float16: return run(model_tag, fp16{});
    }
    return false;
  };
  return model_dtype == DType::BFloat16 ? with_grad(bf16{}) : with_grad(fp16{});
}

}  // namespace
}  // namespace megalite::cpu
