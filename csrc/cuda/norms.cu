// CUDA LayerNorm / RMSNorm (the formulas: csrc/norm_math.h): the launchers, and the general kernels
// for rows the register-cached path (norms_row_cached.cu) does not take -- rows longer than
// kMaxCachedCols, not whole 16-byte packs, or tensors at unaligned offsets.
//
// General path: forward and the dx part of backward: one thread block per row; each thread walks the row with
// stride blockDim.x, the row statistics are combined across threads (Welford/Chan merges for the
// forward, plain sums for the backward) through warp shuffles and shared memory, then a second walk
// writes the output (the row is hot in L1/L2).  dweight/dbias: a separate column reduction -- a
// grid of (column tiles) x (row splits) blocks writes fp32 partial sums, and a last kernel sums the
// splits per column, so there are no atomics and the result does not depend on scheduling.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/block_sum.cuh"
#include "cuda/float_formats.cuh"
#include "cuda/kernels.h"
#include "cuda/launch_checks.h"
#include "cuda/launch_plan.h"
#include "cuda/norms_row_cached.h"
#include "norm_math.h"

namespace megalite::cuda {
namespace {

int row_threads(int64_t cols) {
  if (cols <= 256) return 64;
  if (cols <= 1024) return 128;
  if (cols <= 4096) return 256;
  return 512;
}

__device__ __forceinline__ Welford shuffle_down(const Welford& w, int offset) {
  Welford out;
  out.mean = __shfl_down_sync(0xffffffffu, w.mean, offset);
  out.m2 = __shfl_down_sync(0xffffffffu, w.m2, offset);
  out.count = __shfl_down_sync(0xffffffffu, w.count, offset);
  return out;
}

// Merge every thread's Welford state; the result is valid in all threads.
__device__ Welford block_welford(Welford w) {
  __shared__ Welford warp_results[kMaxWarps];
  __shared__ Welford total;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) w = welford_merge(w, shuffle_down(w, offset));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_results[warp] = w;
  __syncthreads();
  if (warp == 0) {
    w = lane < static_cast<int>(blockDim.x / kWarp) ? warp_results[lane] : Welford{};
    for (int offset = kWarp / 2; offset > 0; offset /= 2) w = welford_merge(w, shuffle_down(w, offset));
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

template <typename T, typename W, bool kRms>
__global__ void norm_forward_kernel(const T* x, const W* weight, const W* bias, T* y, float* mean, float* rstd,
                                    int64_t cols, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  Welford w;
  float squares = 0.f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = load(xr[c]);
    if (kRms) squares += v * v; else welford_add(w, v);
  }
  float mu = 0.f, rs;
  if (kRms) {
    rs = rsqrtf(block_sum2(make_float2(squares, 0.f)).x / static_cast<float>(cols) + eps);
  } else {
    const Welford total = block_welford(w);
    mu = total.mean;
    rs = rsqrtf(total.m2 / static_cast<float>(cols) + eps);
  }
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float out = (load(xr[c]) - mu) * rs * load(weight[c]);
    yr[c] = store<T>(bias != nullptr ? out + load(bias[c]) : out);
  }
  if (threadIdx.x == 0) {
    if (!kRms) mean[row] = mu;
    rstd[row] = rs;
  }
}

template <typename T, typename W, bool kRms>
__global__ void norm_backward_dx_kernel(const T* dy, const T* x, const float* mean, const float* rstd, const W* weight,
                                        T* dx, int64_t cols) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const T* dyr = dy + row * cols;
  T* dxr = dx + row * cols;
  const float mu = kRms ? 0.f : mean[row], rs = rstd[row];
  float2 sums = make_float2(0.f, 0.f);   // (sum g, sum g * xhat)
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float g = load(dyr[c]) * load(weight[c]);
    sums.x += g;
    sums.y += g * ((load(xr[c]) - mu) * rs);
  }
  sums = block_sum2(sums);
  const float inv_cols = 1.f / static_cast<float>(cols);
  const float mean_g = sums.x * inv_cols, mean_g_xhat = sums.y * inv_cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float g = load(dyr[c]) * load(weight[c]);
    const float xhat = (load(xr[c]) - mu) * rs;
    dxr[c] = store<T>(kRms ? rms_norm_dx(g, xhat, mean_g_xhat, rs) : layer_norm_dx(g, xhat, mean_g, mean_g_xhat, rs));
  }
}

// Block (32 columns x 8 threads down): the rows of split blockIdx.y, summed per column into
// partial[split][col] (dweight) and partial[splits + split][col] (dbias).
template <typename T, bool kRms>
__global__ void norm_weight_grad_partial_kernel(const T* dy, const T* x, const float* mean, const float* rstd,
                                                float* partial, int64_t rows, int64_t cols) {
  __shared__ float dw_tile[kTileRows][kTileCols + 1];
  __shared__ float db_tile[kTileRows][kTileCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  float dw = 0.f, db = 0.f;
  if (col < cols) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kTileRows + threadIdx.y; row < rows;
         row += static_cast<int64_t>(gridDim.y) * kTileRows) {
      const float d = load(dy[row * cols + col]);
      const float mu = kRms ? 0.f : mean[row];
      dw += d * ((load(x[row * cols + col]) - mu) * rstd[row]);
      db += d;
    }
  }
  dw_tile[threadIdx.y][threadIdx.x] = dw;
  db_tile[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int r = 1; r < kTileRows; ++r) {
      dw += dw_tile[r][threadIdx.x];
      db += db_tile[r][threadIdx.x];
    }
    partial[static_cast<int64_t>(blockIdx.y) * cols + col] = dw;
    if (!kRms) partial[static_cast<int64_t>(gridDim.y + blockIdx.y) * cols + col] = db;
  }
}

template <typename W, bool kRms>
__global__ void norm_weight_grad_final_kernel(const float* partial, int64_t splits, int64_t cols, W* dweight,
                                              W* dbias) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float dw = 0.f, db = 0.f;
  for (int64_t s = 0; s < splits; ++s) {
    dw += partial[s * cols + col];
    if (!kRms) db += partial[(splits + s) * cols + col];
  }
  dweight[col] = store<W>(dw);
  if (!kRms) dbias[col] = store<W>(db);
}

void check_rows_grid(const char* kernel, const NormShape& shape) {
  if (!rows_fit_grid(shape.rows, current_device_limits())) {
    throw LaunchError(std::string("megalite CUDA: ") + kernel + " (" + describe(shape) +
                      "): more rows than the grid has blocks; split the rows");
  }
}

template <typename Fn>
void with_norm_types(const NormShape& shape, const Fn& fn) {
  with_dtype(shape.x_dtype, [&](auto x_tag) {
    if (shape.weight_dtype == DType::Float32) {
      fn(x_tag, float{});
    } else {
      fn(x_tag, x_tag);
    }
  });
}

template <bool kRms>
void forward(const NormShape& shape, const void* x, const void* weight, const void* bias, void* y, float* mean,
             float* rstd, float eps, cudaStream_t stream) {
  if (shape.rows == 0) return;
  if (row_cached_fits(shape, {x, y}, {weight, bias})) {
    row_cached_forward<kRms>(shape, x, weight, bias, y, mean, rstd, eps, stream);
    return;
  }
  check_rows_grid("norm_forward_kernel", shape);
  with_norm_types(shape, [&](auto x_tag, auto w_tag) {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    norm_forward_kernel<T, W, kRms><<<static_cast<unsigned>(shape.rows), row_threads(shape.cols), 0, stream>>>(
        static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<const W*>(bias), static_cast<T*>(y),
        mean, rstd, shape.cols, eps);
    check_launch("norm_forward_kernel", describe(shape));
  });
}

// dx, one block per row; then dweight/dbias by the column reduction into the workspace.
template <typename T, bool kRms>
void dx_and_partials(const NormShape& shape, int64_t splits, const void* dy, const void* x, const float* mean,
                     const float* rstd, const void* weight, void* dx, float* workspace, cudaStream_t stream) {
  check_rows_grid("norm_backward_dx_kernel", shape);
  with_norm_types(shape, [&](auto, auto w_tag) {
    using W = decltype(w_tag);
    norm_backward_dx_kernel<T, W, kRms><<<static_cast<unsigned>(shape.rows), row_threads(shape.cols), 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, static_cast<const W*>(weight),
        static_cast<T*>(dx), shape.cols);
    check_launch("norm_backward_dx_kernel", describe(shape));
  });
  const dim3 grid(static_cast<unsigned>((shape.cols + kTileCols - 1) / kTileCols), static_cast<unsigned>(splits));
  norm_weight_grad_partial_kernel<T, kRms><<<grid, dim3(kTileCols, kTileRows), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, workspace, shape.rows, shape.cols);
  check_launch("norm_weight_grad_partial_kernel", describe(shape));
}

template <bool kRms>
void backward(const NormShape& shape, const void* dy, const void* x, const float* mean, const float* rstd,
              const void* weight, void* dx, void* dweight, void* dbias, float* workspace, cudaStream_t stream) {
  if (shape.cols == 0) return;   // dx, dweight and dbias are empty
  if (row_cached_fits(shape, {dy, x, dx}, {weight, dweight, dbias}) && row_cached_backward_fits<kRms>(shape)) {
    row_cached_backward<kRms>(shape, dy, x, mean, rstd, weight, dx, dweight, dbias, workspace, stream);
    return;
  }
  const int64_t splits = column_reduction_splits(shape.rows, shape.cols);
  with_norm_types(shape, [&](auto x_tag, auto w_tag) {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    if (shape.rows > 0) dx_and_partials<T, kRms>(shape, splits, dy, x, mean, rstd, weight, dx, workspace, stream);
    const int threads = 256;
    norm_weight_grad_final_kernel<W, kRms><<<static_cast<unsigned>((shape.cols + threads - 1) / threads), threads, 0,
                                             stream>>>(workspace, shape.rows > 0 ? splits : 0, shape.cols,
                                                       static_cast<W*>(dweight), static_cast<W*>(dbias));
    check_launch("norm_weight_grad_final_kernel", describe(shape));
  });
}

}  // namespace

int64_t norm_weight_grad_splits(const NormShape& shape) {
  const int64_t general = column_reduction_splits(shape.rows, shape.cols);
  if (!row_cached_fits(shape, {}, {})) return general;
  const int64_t cached = row_cached_max_blocks(shape);
  return cached > general ? cached : general;
}

void layer_norm_forward(const NormShape& shape, const void* x, const void* weight, const void* bias, void* y,
                        float* mean, float* rstd, float eps, cudaStream_t stream) {
  forward<false>(shape, x, weight, bias, y, mean, rstd, eps, stream);
}

void layer_norm_backward(const NormShape& shape, const void* dy, const void* x, const float* mean, const float* rstd,
                         const void* weight, void* dx, void* dweight, void* dbias, float* workspace,
                         cudaStream_t stream) {
  backward<false>(shape, dy, x, mean, rstd, weight, dx, dweight, dbias, workspace, stream);
}

void rms_norm_forward(const NormShape& shape, const void* x, const void* weight, void* y, float* rstd, float eps,
                      cudaStream_t stream) {
  forward<true>(shape, x, weight, nullptr, y, nullptr, rstd, eps, stream);
}

void rms_norm_backward(const NormShape& shape, const void* dy, const void* x, const float* rstd, const void* weight,
                       void* dx, void* dweight, float* workspace, cudaStream_t stream) {
  backward<true>(shape, dy, x, nullptr, rstd, weight, dx, dweight, nullptr, workspace, stream);
}

}  // namespace megalite::cuda
