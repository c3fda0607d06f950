// SwiGLU forward and backward in one pass each: h is megalite's fused fc1 output, pairs
// (gate_j, up_j) interleaved ([..., f, 2] flattened), y = silu(gate) * up ([..., f]).  Unfused,
// PyTorch runs silu and mul forward (reading the strided halves twice) and two muls, silu's
// backward and a stack of the two halves backward; here each element of h, dy, y and dh moves once.
//
//   s = sigmoid(g), silu = g s                y  = silu u
//   d silu / d g = s (1 + g (1 - s))          dg = dy u s (1 + g (1 - s)),  du = dy silu
//
// All math in fp32 (one rounding per output).  Each thread moves P pairs per step (16 bytes of h;
// 8 bytes of y and dy) with vector loads and stores when the pointers allow it, in a grid-stride
// loop; a scalar loop takes the tail and any misaligned input.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/float_formats.cuh"
#include "cuda/kernels.h"
#include "cuda/launch_checks.h"
#include "cuda/launch_plan.h"

namespace megalite::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

__device__ __forceinline__ float swiglu_value(float g, float u) { return g * sigmoid(g) * u; }

// (dL/dgate, dL/dup) of one pair.
__device__ __forceinline__ void swiglu_grads(float g, float u, float d, float& dg, float& du) {
  const float s = sigmoid(g);
  dg = d * u * s * (1.f + g * (1.f - s));
  du = d * g * s;
}

// Pairs per vector step: 16 bytes of h (two elements per pair).
template <typename T>
constexpr int pairs_per_step() { return 16 / (2 * static_cast<int>(sizeof(T))); }

// This thread's share of `pairs`, grid-stride: vector_step(step) for each whole pack of P pairs when
// `vector`, then scalar(p) for the pairs after the last pack (all of them without `vector`).
template <int P, class Vector, class Scalar>
__device__ __forceinline__ void for_pairs(int64_t pairs, bool vector, const Vector& vector_step,
                                          const Scalar& scalar) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vector) {
    const int64_t steps = pairs / P;
    for (int64_t step = first; step < steps; step += stride) vector_step(step);
    done = steps * P;
  }
  for (int64_t p = done + first; p < pairs; p += stride) scalar(p);
}

template <typename T, int P>
__global__ void swiglu_forward_kernel(int64_t pairs, const T* __restrict__ h, T* __restrict__ y, bool vector) {
  for_pairs<P>(
      pairs, vector,
      [&](int64_t step) {
        const Pack<T, 2 * P> in = load_pack<2 * P>(h, 2 * P * step);
        Pack<T, P> out;
#pragma unroll
        for (int j = 0; j < P; ++j) out.v[j] = store<T>(swiglu_value(load(in.v[2 * j]), load(in.v[2 * j + 1])));
        store_pack<P>(y, P * step, out);
      },
      [&](int64_t p) { y[p] = store<T>(swiglu_value(load(h[2 * p]), load(h[2 * p + 1]))); });
}

template <typename T, int P>
__global__ void swiglu_backward_kernel(int64_t pairs, const T* __restrict__ dy, const T* __restrict__ h,
                                       T* __restrict__ dh, bool vector) {
  for_pairs<P>(
      pairs, vector,
      [&](int64_t step) {
        const Pack<T, 2 * P> in = load_pack<2 * P>(h, 2 * P * step);
        const Pack<T, P> grad = load_pack<P>(dy, P * step);
        Pack<T, 2 * P> out;
#pragma unroll
        for (int j = 0; j < P; ++j) {
          float dg, du;
          swiglu_grads(load(in.v[2 * j]), load(in.v[2 * j + 1]), load(grad.v[j]), dg, du);
          out.v[2 * j] = store<T>(dg);
          out.v[2 * j + 1] = store<T>(du);
        }
        store_pack<2 * P>(dh, 2 * P * step, out);
      },
      [&](int64_t p) {
        float dg, du;
        swiglu_grads(load(h[2 * p]), load(h[2 * p + 1]), load(dy[p]), dg, du);
        dh[2 * p] = store<T>(dg);
        dh[2 * p + 1] = store<T>(du);
      });
}

// The grid-stride loops take any size; the grid stops at kMaxBlocks.
constexpr int64_t kMaxBlocks = 65535 * 8;

unsigned blocks_for(int64_t work) { return static_cast<unsigned>(grid_stride_blocks(work, kThreads, kMaxBlocks)); }

std::string describe(int64_t pairs, DType dtype, bool vector) {
  return "pairs " + std::to_string(pairs) + ", " + dtype_name(dtype) + (vector ? ", vector" : ", scalar");
}

}  // namespace

void swiglu_forward(int64_t pairs, DType dtype, const void* h, void* y, cudaStream_t stream) {
  if (pairs == 0) return;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = pairs_per_step<T>();
    const bool vector = pack_aligned(h, 2 * P * sizeof(T)) && pack_aligned(y, P * sizeof(T));
    swiglu_forward_kernel<T, P><<<blocks_for(vector ? pairs / P + 1 : pairs), kThreads, 0, stream>>>(
        pairs, static_cast<const T*>(h), static_cast<T*>(y), vector);
    check_launch("swiglu_forward_kernel", describe(pairs, dtype, vector));
  });
}

void swiglu_backward(int64_t pairs, DType dtype, const void* dy, const void* h, void* dh, cudaStream_t stream) {
  if (pairs == 0) return;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = pairs_per_step<T>();
    const bool vector =
        pack_aligned(h, 2 * P * sizeof(T)) && pack_aligned(dh, 2 * P * sizeof(T)) && pack_aligned(dy, P * sizeof(T));
    swiglu_backward_kernel<T, P><<<blocks_for(vector ? pairs / P + 1 : pairs), kThreads, 0, stream>>>(
        pairs, static_cast<const T*>(dy), static_cast<const T*>(h), static_cast<T*>(dh), vector);
    check_launch("swiglu_backward_kernel", describe(pairs, dtype, vector));
  });
}

}  // namespace megalite::cuda
