// CUDA LayerNorm / RMSNorm for rows that fit in registers (the formulas: csrc/norm_math.h).
//
// The fast path norms.cu takes when a row is whole 16-byte packs (cols a multiple of 16 / sizeof(T))
// of at most kMaxCachedCols elements and every pointer is pack-aligned:
// - forward: one thread block per row; each thread loads its packs of the row once into registers,
//   the block sums x (LayerNorm) and then (x - mean)^2 from the registers -- the two-pass variance,
//   exact up to fp32 round-off, without a second read of memory -- and writes y from the registers.
// - backward: a grid of resident blocks walks the rows (block b takes rows b, b + grid, ...); per
//   row a thread holds its packs of dy and xhat in registers, the block sums g = dy * w and g * xhat,
//   and dx is written from the registers.  The same thread owns the same columns in every row, so
//   it adds dy * xhat and dy into the block's shared-memory accumulators without atomics; at the end
//   each block writes its accumulators as one row of partial[grid][cols] (fp32), and a second small
//   kernel sums that buffer over the grid in 32-column tiles, 8 lanes of partial rows per tile -- x
//   and dy are read exactly once.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/block_sum.cuh"
#include "cuda/float_formats.cuh"
#include "cuda/kernels.h"
#include "cuda/launch_checks.h"
#include "cuda/launch_plan.h"
#include "cuda/norms_row_cached.h"
#include "norm_math.h"

namespace megalite::cuda {
namespace {

constexpr int kMaxThreads = kCachedMaxThreads;

template <typename T>
constexpr int kPackWidth = 16 / static_cast<int>(sizeof(T));   // 4 fp32, 8 bf16/fp16

// Pack k of this thread is pack threadIdx.x + k * blockDim.x of the row (coalesced per k).
template <typename T, typename W, bool kRms, int kPacks>
__global__ void __launch_bounds__(kMaxThreads)
    cached_forward_kernel(const T* x, const W* weight, const W* bias, T* y, float* mean, float* rstd, int cols,
                          float eps) {
  constexpr int V = kPackWidth<T>;
  const int packs = cols / V;
  const int64_t row_start = static_cast<int64_t>(blockIdx.x) * cols;
  float values[kPacks][V];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int pack = threadIdx.x + k * blockDim.x;
    if (pack < packs) {
      const Pack<T, V> loaded = load_pack<V>(x, row_start + static_cast<int64_t>(pack) * V);
#pragma unroll
      for (int e = 0; e < V; ++e) values[k][e] = load(loaded.v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) values[k][e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < V; ++e) sum += kRms ? values[k][e] * values[k][e] : values[k][e];
  }
  const float inv_cols = 1.f / static_cast<float>(cols);
  float mu = 0.f, variance;
  if (kRms) {
    variance = block_sum2(make_float2(sum, 0.f)).x * inv_cols;   // mean of squares
  } else {
    mu = block_sum2(make_float2(sum, 0.f)).x * inv_cols;
    float squares = 0.f;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      if (threadIdx.x + k * blockDim.x < packs) {
#pragma unroll
        for (int e = 0; e < V; ++e) squares += (values[k][e] - mu) * (values[k][e] - mu);
      }
    }
    variance = block_sum2(make_float2(squares, 0.f)).x * inv_cols;
  }
  const float rs = rsqrtf(variance + eps);
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int pack = threadIdx.x + k * blockDim.x;
    if (pack >= packs) continue;
    const Pack<W, V> w = load_pack<V>(weight, static_cast<int64_t>(pack) * V);
    Pack<W, V> b;
    const bool has_bias = !kRms && bias != nullptr;
    if (has_bias) b = load_pack<V>(bias, static_cast<int64_t>(pack) * V);
    Pack<T, V> out;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float scaled = (values[k][e] - mu) * rs * load(w.v[e]);
      out.v[e] = store<T>(has_bias ? scaled + load(b.v[e]) : scaled);
    }
    store_pack<V>(y, row_start + static_cast<int64_t>(pack) * V, out);
  }
  if (threadIdx.x == 0) {
    if (!kRms) mean[blockIdx.x] = mu;
    rstd[blockIdx.x] = rs;
  }
}

// Dynamic shared memory: the block's dweight accumulators, then (LayerNorm) dbias, each [V][packs]
// (element e of pack p at e * packs + p: consecutive threads touch consecutive words, no bank
// conflicts), written out in column order (column p V + e) at the end.
template <typename T, typename W, bool kRms, int kPacks>
__global__ void __launch_bounds__(kMaxThreads)
    cached_backward_kernel(const T* dy, const T* x, const float* mean, const float* rstd, const W* weight, T* dx,
                           float* partial, int64_t rows, int cols) {
  constexpr int V = kPackWidth<T>;
  extern __shared__ float accumulators[];
  float* dweight_sum = accumulators;
  float* dbias_sum = accumulators + cols;
  const int packs = cols / V;
  for (int c = threadIdx.x; c < (kRms ? 1 : 2) * cols; c += blockDim.x) accumulators[c] = 0.f;
  __syncthreads();   // the zeroing loop maps columns to threads otherwise than the packs do
  const float inv_cols = 1.f / static_cast<float>(cols);
  // This thread's columns are the same in every row: their weights are read once, into registers.
  float w[kPacks][V];
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int pack = threadIdx.x + k * blockDim.x;
    if (pack >= packs) continue;
    const Pack<W, V> w_pack = load_pack<V>(weight, static_cast<int64_t>(pack) * V);
#pragma unroll
    for (int e = 0; e < V; ++e) w[k][e] = load(w_pack.v[e]);
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t row_start = row * cols;
    const float mu = kRms ? 0.f : mean[row], rs = rstd[row];
    float grad_out[kPacks][V], xhat[kPacks][V];
    float2 sums = make_float2(0.f, 0.f);   // (sum g, sum g * xhat), g = dy * w
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int pack = threadIdx.x + k * blockDim.x;
      if (pack >= packs) continue;
      const int64_t offset = row_start + static_cast<int64_t>(pack) * V;
      const Pack<T, V> dy_pack = load_pack<V>(dy, offset), x_pack = load_pack<V>(x, offset);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        grad_out[k][e] = load(dy_pack.v[e]);
        xhat[k][e] = (load(x_pack.v[e]) - mu) * rs;
        const float g = grad_out[k][e] * w[k][e];
        sums.x += g;
        sums.y += g * xhat[k][e];
      }
    }
    sums = block_sum2(sums);
    const float mean_g = sums.x * inv_cols, mean_g_xhat = sums.y * inv_cols;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int pack = threadIdx.x + k * blockDim.x;
      if (pack >= packs) continue;
      Pack<T, V> out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float g = grad_out[k][e] * w[k][e];
        out.v[e] = store<T>(kRms ? rms_norm_dx(g, xhat[k][e], mean_g_xhat, rs)
                                 : layer_norm_dx(g, xhat[k][e], mean_g, mean_g_xhat, rs));
        const int slot = e * packs + pack;
        dweight_sum[slot] += grad_out[k][e] * xhat[k][e];
        if (!kRms) dbias_sum[slot] += grad_out[k][e];
      }
      store_pack<V>(dx, row_start + static_cast<int64_t>(pack) * V, out);
    }
  }
  __syncthreads();
  float* partial_row = partial + static_cast<int64_t>(blockIdx.x) * (kRms ? 1 : 2) * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const int slot = (c % V) * packs + c / V;
    partial_row[c] = dweight_sum[slot];
    if (!kRms) partial_row[cols + c] = dbias_sum[slot];
  }
}

// partial: [blocks][(dweight | dbias)][cols] -> dweight, dbias, as a tiled two-level reduction: a block
// of kFinalColumns x kFinalLanes threads owns kFinalColumns adjacent columns (each warp reads one
// contiguous row segment: coalesced); lane y sums partial rows y, y + kFinalLanes, ... in order, and
// the lanes' sums are added in a fixed tree in shared memory.  The summation order per column is
// fixed, so the result is deterministic, and the parallelism is cols x kFinalLanes threads instead of
// one thread per column walking every partial row.
constexpr int kFinalColumns = 32;
constexpr int kFinalLanes = 8;

template <typename W, bool kRms>
__global__ void __launch_bounds__(kFinalColumns * kFinalLanes)
cached_weight_grad_final_kernel(const float* partial, int64_t blocks, int cols, W* dweight, W* dbias) {
  __shared__ float dw_lanes[kFinalLanes][kFinalColumns];
  __shared__ float db_lanes[kFinalLanes][kFinalColumns];
  const int col = blockIdx.x * kFinalColumns + threadIdx.x;
  const int64_t stride = (kRms ? 1 : 2) * static_cast<int64_t>(cols);
  float dw = 0.f, db = 0.f;
  if (col < cols) {
    for (int64_t b = threadIdx.y; b < blocks; b += kFinalLanes) {
      dw += partial[b * stride + col];
      if (!kRms) db += partial[b * stride + cols + col];
    }
  }
  dw_lanes[threadIdx.y][threadIdx.x] = dw;
  db_lanes[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  for (int half = kFinalLanes / 2; half > 0; half /= 2) {
    if (threadIdx.y < half) {
      dw_lanes[threadIdx.y][threadIdx.x] += dw_lanes[threadIdx.y + half][threadIdx.x];
      db_lanes[threadIdx.y][threadIdx.x] += db_lanes[threadIdx.y + half][threadIdx.x];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && col < cols) {
    dweight[col] = store<W>(dw_lanes[0][threadIdx.x]);
    if (!kRms) dbias[col] = store<W>(db_lanes[0][threadIdx.x]);
  }
}

int pack_width_of(DType dtype) { return dtype == DType::Float32 ? 4 : 8; }

CachedLayout layout_of(const NormShape& shape) { return cached_layout(shape.cols, pack_width_of(shape.x_dtype)); }

// Calls fn(x_tag, weight_tag, integral_constant<packs per thread>) for the shape's types and layout.
template <typename Fn>
void with_cached_types(const NormShape& shape, const CachedLayout& layout, const Fn& fn) {
  with_dtype(shape.x_dtype, [&](auto x_tag) {
    auto with_weight = [&](auto w_tag) {
      switch (layout.packs_per_thread) {
        case 1: fn(x_tag, w_tag, std::integral_constant<int, 1>{}); break;
        case 2: fn(x_tag, w_tag, std::integral_constant<int, 2>{}); break;
        default: fn(x_tag, w_tag, std::integral_constant<int, 4>{}); break;
      }
    };
    if (shape.weight_dtype == DType::Float32) with_weight(float{}); else with_weight(x_tag);
  });
}

// The backward kernel's shared memory on this device: its static part from cudaFuncGetAttributes,
// its dynamic part from the shape (launch_plan.h decides).
template <typename Kernel>
SharedPlan backward_shared_plan(Kernel kernel, const NormShape& shape, bool rms) {
  cudaFuncAttributes attributes{};
  check_cuda(cudaFuncGetAttributes(&attributes, kernel), "cudaFuncGetAttributes(cached_backward_kernel)",
             describe(shape));
  return cached_backward_shared(shape.cols, rms, static_cast<int64_t>(attributes.sharedSizeBytes),
                                current_device_limits());
}

// Calls fn(kernel, T, W) with the cached backward kernel that the shape's types and layout select.
template <bool kRms, typename Fn>
void with_backward_kernel(const NormShape& shape, const Fn& fn) {
  with_cached_types(shape, layout_of(shape), [&](auto x_tag, auto w_tag, auto packs) {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    fn(cached_backward_kernel<T, W, kRms, decltype(packs)::value>, x_tag, w_tag);
  });
}

}  // namespace

bool row_cached_fits(const NormShape& shape, std::initializer_list<const void*> rows_pointers,
                     std::initializer_list<const void*> weight_pointers) {
  const int width = pack_width_of(shape.x_dtype);
  if (!cached_shape(shape.cols, width)) return false;
  for (const void* p : rows_pointers) if (!pack_aligned(p, 16)) return false;
  const int weight_bytes = width * (shape.weight_dtype == DType::Float32 ? 4 : 2);
  for (const void* p : weight_pointers) if (!pack_aligned(p, weight_bytes)) return false;
  return true;
}

template <bool kRms>
bool row_cached_backward_fits(const NormShape& shape) {
  bool fits = false;
  with_backward_kernel<kRms>(shape, [&](auto kernel, auto, auto) {
    fits = backward_shared_plan(kernel, shape, kRms).fits;
  });
  return fits;
}

int64_t row_cached_max_blocks(const NormShape& shape) {
  return cached_max_blocks(shape.rows, current_sm_count(), layout_of(shape).threads);
}

template <bool kRms>
void row_cached_forward(const NormShape& shape, const void* x, const void* weight, const void* bias, void* y,
                        float* mean, float* rstd, float eps, cudaStream_t stream) {
  const CachedLayout layout = layout_of(shape);
  if (!rows_fit_grid(shape.rows, current_device_limits())) {
    throw LaunchError("megalite CUDA: cached_forward_kernel (" + describe(shape) + "): more rows than grid blocks");
  }
  with_cached_types(shape, layout, [&](auto x_tag, auto w_tag, auto packs) {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    cached_forward_kernel<T, W, kRms, decltype(packs)::value>
        <<<static_cast<unsigned>(shape.rows), layout.threads, 0, stream>>>(
            static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<const W*>(bias), static_cast<T*>(y),
            mean, rstd, static_cast<int>(shape.cols), eps);
    check_launch("cached_forward_kernel", describe(shape));
  });
}

// The grid walks the rows with as many blocks as are resident (the occupancy calculator's count,
// with the shared memory opted in first where the launch needs more than the default).
template <bool kRms, typename Kernel>
int64_t backward_blocks(Kernel kernel, const NormShape& shape, int threads) {
  const SharedPlan plan = backward_shared_plan(kernel, shape, kRms);
  if (!plan.fits) {
    throw LaunchError("megalite CUDA: cached_backward_kernel (" + describe(shape) +
                      "): shared memory over the device's limit; the general kernels take this shape");
  }
  if (plan.needs_optin) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(plan.dynamic_bytes)),
               "cudaFuncSetAttribute(cached_backward_kernel, MaxDynamicSharedMemorySize)", describe(shape));
  }
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads,
                                                           static_cast<size_t>(plan.dynamic_bytes)),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor(cached_backward_kernel)", describe(shape));
  return cached_backward_blocks(shape.rows, current_sm_count(), per_sm, threads);
}

template <bool kRms>
void row_cached_backward(const NormShape& shape, const void* dy, const void* x, const float* mean, const float* rstd,
                         const void* weight, void* dx, void* dweight, void* dbias, float* workspace,
                         cudaStream_t stream) {
  const int threads = layout_of(shape).threads;
  const int cols = static_cast<int>(shape.cols);
  const size_t shared_bytes = (kRms ? 1 : 2) * static_cast<size_t>(cols) * sizeof(float);
  with_backward_kernel<kRms>(shape, [&](auto kernel, auto x_tag, auto w_tag) {
    using T = decltype(x_tag);
    using W = decltype(w_tag);
    int64_t blocks = 0;
    if (shape.rows > 0) {
      blocks = backward_blocks<kRms>(kernel, shape, threads);
      kernel<<<static_cast<unsigned>(blocks), threads, shared_bytes, stream>>>(
          static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, static_cast<const W*>(weight),
          static_cast<T*>(dx), workspace, shape.rows, cols);
      check_launch("cached_backward_kernel", describe(shape));
    }
    const dim3 final_threads(kFinalColumns, kFinalLanes);
    cached_weight_grad_final_kernel<W, kRms><<<(cols + kFinalColumns - 1) / kFinalColumns, final_threads, 0, stream>>>(
        workspace, blocks, cols, static_cast<W*>(dweight), static_cast<W*>(dbias));
    check_launch("cached_weight_grad_final_kernel", describe(shape));
  });
}

template void row_cached_forward<false>(const NormShape&, const void*, const void*, const void*, void*, float*, float*,
                                        float, cudaStream_t);
template void row_cached_forward<true>(const NormShape&, const void*, const void*, const void*, void*, float*, float*,
                                       float, cudaStream_t);
template void row_cached_backward<false>(const NormShape&, const void*, const void*, const float*, const float*,
                                         const void*, void*, void*, void*, float*, cudaStream_t);
template void row_cached_backward<true>(const NormShape&, const void*, const void*, const float*, const float*,
                                        const void*, void*, void*, void*, float*, cudaStream_t);
template bool row_cached_backward_fits<false>(const NormShape&);
template bool row_cached_backward_fits<true>(const NormShape&);

}  // namespace megalite::cuda
