// CPU LayerNorm / RMSNorm forward and backward (the formulas: csrc/norm_math.h).
//
// OpenMP splits the rows; each row is read from memory once and its later passes hit the cache
// (a row of 4096 fp32 is 16 KiB).  Row statistics use the two-pass form (a shifted mean first, then
// the sum of squared deviations from it), as stable as Welford's update, and it vectorizes.  The
// weight/bias gradients are column sums over rows: each thread accumulates its rows into its own
// fp32 slice of the workspace, then the threads sum the slices column by column -- no atomics, and
// the same result for the same thread count.  Outputs too large for the cache are written with
// streaming stores (write_row).
//
// Internal linkage, included by the kernels_*.cpp tables (see adam_kernels.h).
#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/float_formats.h"
#include "cpu/kernels.h"
#include "cpu/row_sums.h"
#include "cpu/streaming_stores.h"
#include "norm_math.h"

namespace megalite::cpu {
namespace {

// [begin, end) of the rows thread `thread` of `count` owns: contiguous blocks, fixed by the count.
inline void row_block(int64_t rows, int64_t thread, int64_t count, int64_t& begin, int64_t& end) {
  const int64_t base = rows / count, extra = rows % count;
  begin = thread * base + (thread < extra ? thread : extra);
  end = begin + base + (thread < extra ? 1 : 0);
}

// Few rows: fewer threads (a parallel region for a handful of rows costs more than it saves).
inline int threads_for(const NormShape& shape) {
  const int64_t useful = shape.rows * shape.cols / 16384 + 1;
  return static_cast<int>(useful < shape.num_threads ? useful : shape.num_threads);
}

// Ask for the first 4 KiB of the next row while this one is worked on in the cache.  The forwards
// read a row from memory in their first pass only, so without this the memory idles through the
// cached passes until the next row's first miss; the hardware prefetcher does not cross into it
// early enough.  Measured on the CI VM: LayerNorm forward [8192, 1024] fp32 13% faster, the other
// shapes 0-5%.  Prefetching a whole 16 KiB row, or the backward's next x and dy rows, was slower
// in the same measurement, so the backward does without.
template <typename T>
inline void prefetch_row(const T* row, int64_t cols) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t n = cols * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < (n < 4096 ? n : 4096); b += 64) __builtin_prefetch(bytes + b);
}

// bf16/fp16 weights (and bias) widened to fp32 once per call, so the row loops load fp32 instead of
// converting the same [cols] values again for every row; fp32 ones are used in place.
template <typename W>
const float* widened(const W* values, int64_t cols, std::vector<float>& buffer) {
  if constexpr (std::is_same_v<W, float>) {
    return values;
  } else {
    if (values == nullptr) return nullptr;
    buffer.resize(cols);
    for (int64_t c = 0; c < cols; ++c) buffer[c] = load(values[c]);
    return buffer.data();
  }
}

template <class Rounding, typename T, typename W>
void layer_norm_forward_typed(const NormShape& shape, const T* x, const W* weight_in, const W* bias_in, T* y,
                              float* mean, float* rstd, float eps) {
  const int64_t rows = shape.rows, cols = shape.cols;
  std::vector<float> weight_buffer, bias_buffer;
  const float* weight = widened(weight_in, cols, weight_buffer);
  const float* bias = widened(bias_in, cols, bias_buffer);
  const float inv_cols = 1.f / static_cast<float>(cols);
#pragma omp parallel num_threads(threads_for(shape))
  {
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict xr = x + r * cols;
      // Sum x - x[0], not x: with a large common offset (mean 1e4, spread 1) the plain fp32 sum would
      // lose the spread's digits; the shifted terms are of the spread's size (Chan et al. 1983, Sec. 3).
      const float shift = cols > 0 ? load(xr[0]) : 0.f;   // an empty row has no x[0] (mean, rstd: NaN)
      const float mu = shift + row_sum(0, cols, [=](int64_t c) { return load(xr[c]) - shift; }) * inv_cols;
      if (r + 1 < rows) prefetch_row(xr + cols, cols);
      const float squares = row_sum(0, cols, [=](int64_t c) {
        const float d = load(xr[c]) - mu;
        return d * d;
      });
      const float rs = 1.f / std::sqrt(squares * inv_cols + eps);
      if (bias != nullptr) {
        write_row<Rounding>(y + r * cols, cols, shape.stream_output,
                  [=](int64_t c) { return (load(xr[c]) - mu) * rs * weight[c] + bias[c]; });
      } else {
        write_row<Rounding>(y + r * cols, cols, shape.stream_output,
                  [=](int64_t c) { return (load(xr[c]) - mu) * rs * weight[c]; });
      }
      mean[r] = mu;
      rstd[r] = rs;
    }
    end_streaming(shape.stream_output);
  }
}

// Sum the per-thread column partials (count slices of `stride` floats, starting at `first`) into out.
template <typename W>
inline void reduce_columns(const float* first, int64_t stride, int64_t count, int64_t cols, W* out) {
#pragma omp for schedule(static)
  for (int64_t c = 0; c < cols; ++c) {
    float total = 0.f;
    for (int64_t t = 0; t < count; ++t) total += first[t * stride + c];
    out[c] = store<W>(total);
  }
}

template <class Rounding, typename T, typename W>
void layer_norm_backward_typed(const NormShape& shape, const T* dy, const T* x, const float* mean, const float* rstd,
                               const W* weight_in, T* dx, W* dweight, W* dbias, float* workspace) {
  const int64_t rows = shape.rows, cols = shape.cols;
  std::vector<float> weight_buffer;
  const float* weight = widened(weight_in, cols, weight_buffer);
  const float inv_cols = 1.f / static_cast<float>(cols);
#pragma omp parallel num_threads(threads_for(shape))
  {
    const int64_t count = omp_get_num_threads(), thread = omp_get_thread_num();
    float* __restrict dw_sum = workspace + thread * 2 * cols;   // this thread's slice: [dw | db]
    float* __restrict db_sum = dw_sum + cols;
    for (int64_t c = 0; c < 2 * cols; ++c) dw_sum[c] = 0.f;
    int64_t begin, end;
    row_block(rows, thread, count, begin, end);
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict xr = x + r * cols;
      const T* __restrict dyr = dy + r * cols;
      const float mu = mean[r], rs = rstd[r];
      float sum_g, sum_g_xhat;
      row_sum2(0, cols, [=](int64_t c, float& g_part, float& g_xhat_part) {
        const float g = load(dyr[c]) * weight[c];
        g_part += g;
        g_xhat_part += g * ((load(xr[c]) - mu) * rs);
      }, sum_g, sum_g_xhat);
      const float mean_g = sum_g * inv_cols, mean_g_xhat = sum_g_xhat * inv_cols;
      write_row<Rounding>(dx + r * cols, cols, shape.stream_output, [=](int64_t c) {
        const float d = load(dyr[c]);
        const float xhat = (load(xr[c]) - mu) * rs;
        dw_sum[c] += d * xhat;
        db_sum[c] += d;
        return layer_norm_dx(d * weight[c], xhat, mean_g, mean_g_xhat, rs);
      });
    }
    end_streaming(shape.stream_output);
#pragma omp barrier
    reduce_columns(workspace, 2 * cols, count, cols, dweight);
    reduce_columns(workspace + cols, 2 * cols, count, cols, dbias);
  }
}

template <class Rounding, typename T, typename W>
void rms_norm_forward_typed(const NormShape& shape, const T* x, const W* weight_in, T* y, float* rstd, float eps) {
  const int64_t rows = shape.rows, cols = shape.cols;
  std::vector<float> weight_buffer;
  const float* weight = widened(weight_in, cols, weight_buffer);
  const float inv_cols = 1.f / static_cast<float>(cols);
#pragma omp parallel num_threads(threads_for(shape))
  {
#pragma omp for schedule(static) nowait
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict xr = x + r * cols;
      const float squares = row_sum(0, cols, [=](int64_t c) {
        const float v = load(xr[c]);
        return v * v;
      });
      const float rs = 1.f / std::sqrt(squares * inv_cols + eps);
      if (r + 1 < rows) prefetch_row(xr + cols, cols);
      write_row<Rounding>(y + r * cols, cols, shape.stream_output,
                [=](int64_t c) { return load(xr[c]) * rs * weight[c]; });
      rstd[r] = rs;
    }
    end_streaming(shape.stream_output);
  }
}

template <class Rounding, typename T, typename W>
void rms_norm_backward_typed(const NormShape& shape, const T* dy, const T* x, const float* rstd, const W* weight_in,
                             T* dx, W* dweight, float* workspace) {
  const int64_t rows = shape.rows, cols = shape.cols;
  std::vector<float> weight_buffer;
  const float* weight = widened(weight_in, cols, weight_buffer);
  const float inv_cols = 1.f / static_cast<float>(cols);
#pragma omp parallel num_threads(threads_for(shape))
  {
    const int64_t count = omp_get_num_threads(), thread = omp_get_thread_num();
    float* __restrict dw_sum = workspace + thread * cols;
    for (int64_t c = 0; c < cols; ++c) dw_sum[c] = 0.f;
    int64_t begin, end;
    row_block(rows, thread, count, begin, end);
    for (int64_t r = begin; r < end; ++r) {
      const T* __restrict xr = x + r * cols;
      const T* __restrict dyr = dy + r * cols;
      const float rs = rstd[r];
      const float sum_g_xhat =
          row_sum(0, cols, [=](int64_t c) { return load(dyr[c]) * weight[c] * (load(xr[c]) * rs); });
      const float mean_g_xhat = sum_g_xhat * inv_cols;
      write_row<Rounding>(dx + r * cols, cols, shape.stream_output, [=](int64_t c) {
        const float d = load(dyr[c]);
        const float xhat = load(xr[c]) * rs;
        dw_sum[c] += d * xhat;
        return rms_norm_dx(d * weight[c], xhat, mean_g_xhat, rs);
      });
    }
    end_streaming(shape.stream_output);
#pragma omp barrier
    reduce_columns(workspace, cols, count, cols, dweight);
  }
}

// Calls fn(x_tag, weight_tag) with default-constructed values of the storage types.
template <typename Fn>
void with_norm_types(const NormShape& shape, const Fn& fn) {
  const bool fp32_weight = shape.weight_dtype == DType::Float32;
  switch (shape.x_dtype) {
    case DType::Float32: fn(float{}, float{}); break;
    case DType::BFloat16: fp32_weight ? fn(bf16{}, float{}) : fn(bf16{}, bf16{}); break;
    case DType::Float16: fp32_weight ? fn(fp16{}, float{}) : fn(fp16{}, fp16{}); break;
  }
}

template <class Rounding>
void layer_norm_forward(const NormShape& shape, const void* x, const void* weight, const void* bias, void* y,
                        float* mean, float* rstd, float eps) {
  with_norm_types(shape, [&](auto x_tag, auto w_tag) {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    layer_norm_forward_typed<Rounding>(shape, static_cast<const T*>(x), static_cast<const W*>(weight),
                             static_cast<const W*>(bias), static_cast<T*>(y), mean, rstd, eps);
  });
}

template <class Rounding>
void layer_norm_backward(const NormShape& shape, const void* dy, const void* x, const float* mean, const float* rstd,
                         const void* weight, void* dx, void* dweight, void* dbias, float* workspace) {
  with_norm_types(shape, [&](auto x_tag, auto w_tag) {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    layer_norm_backward_typed<Rounding>(shape, static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd,
                              static_cast<const W*>(weight), static_cast<T*>(dx), static_cast<W*>(dweight),
                              static_cast<W*>(dbias), workspace);
  });
}

template <class Rounding>
void rms_norm_forward(const NormShape& shape, const void* x, const void* weight, void* y, float* rstd, float eps) {
  with_norm_types(shape, [&](auto x_tag, auto w_tag) {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    rms_norm_forward_typed<Rounding>(shape, static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<T*>(y), rstd,
                           eps);
  });
}

template <class Rounding>
void rms_norm_backward(const NormShape& shape, const void* dy, const void* x, const float* rstd, const void* weight,
                       void* dx, void* dweight, float* workspace) {
  with_norm_types(shape, [&](auto x_tag, auto w_tag) {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    rms_norm_backward_typed<Rounding>(shape, static_cast<const T*>(dy), static_cast<const T*>(x), rstd,
                            static_cast<const W*>(weight), static_cast<T*>(dx), static_cast<W*>(dweight), workspace);
  });
}

}  // namespace
}  // namespace megalite::cpu
