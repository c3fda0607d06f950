// CUDA fused Adam by multi-tensor apply: the tensors of a parameter group are cut into chunks of
// kChunk elements, one thread block per chunk, and one launch carries the pointers of up to
// kMaxTensors tensors and kMaxBlocks chunks in its (by-value) argument -- so 148 tensors take a
// handful of launches instead of 148 (the design of apex's multi_tensor_apply; our code).  The host
// work per call is one walk over the tensors filling that argument; nothing is copied to the device.
//
// Inside a chunk each thread moves kVec consecutive elements per iteration with one vector load or
// store per array (16 bytes for fp32, 8 for bf16/fp16): four independent updates in flight per
// thread instead of one, and a quarter of the memory instructions.  A chunk starts at a multiple of
// kChunk elements, so it is vector-aligned exactly when its tensor's base pointers are; a chunk of a
// tensor that is not (a view at an odd offset) and the last numel % kVec elements take the scalar loop.
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <string>

#include "adam_math.h"
#include "cuda/chunk_plan.h"
#include "cuda/float_formats.cuh"
#include "cuda/kernels.h"
#include "cuda/launch_checks.h"

namespace megalite::cuda {
namespace {

constexpr int64_t kChunk = kAdamChunks.chunk;           // elements per block
constexpr int kThreads = 512;
constexpr int kMaxTensors = kAdamChunks.max_tensors;    // TensorListMeta<5> under the 4 KiB argument limit
constexpr int kMaxBlocks = kAdamChunks.max_blocks;
constexpr int kVec = 4;             // elements per thread per iteration (one 16-byte fp32 load)
static_assert(kChunk % kVec == 0, "chunks must start vector-aligned");

template <int Depth>
struct TensorListMeta {
  void* addresses[Depth][kMaxTensors];
  int64_t numels[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta<5>) + 64 < 4096, "kernel arguments must fit in 4 KiB");

// Fills TensorListMeta<Depth> from lists[role][tensor] as chunk_plan.h lays the launches out and calls
// launch(meta, num_blocks) whenever it is full (tensor slots or block slots), a half-done tensor
// carried over into slot 0 of the next launch.
template <int Depth, typename Launch>
void multi_tensor_apply(void* const* const* lists, const int64_t* numels, int64_t num_tensors, const Launch& launch) {
  TensorListMeta<Depth> meta;
  plan_chunks(
      numels, num_tensors, kAdamChunks,
      [&](int slot, int64_t t) {
        for (int d = 0; d < Depth; ++d) meta.addresses[d][slot] = lists[d][t];
        meta.numels[slot] = numels[t];
      },
      [&](int block, int slot, int64_t chunk) {
        meta.block_to_tensor[block] = static_cast<unsigned char>(slot);
        meta.block_to_chunk[block] = static_cast<int>(chunk);
      },
      [&](int blocks) { launch(meta, blocks); });
}

struct ChunkRange {
  int tensor;
  int64_t begin;
  int64_t end;
};

template <int Depth>
__device__ __forceinline__ ChunkRange chunk_of_block(const TensorListMeta<Depth>& meta) {
  const int tensor = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(begin + kChunk, meta.numels[tensor]);
  return {tensor, begin, end};
}

template <int N>
struct Width {
  static constexpr int value = N;
};

template <typename T>
__device__ __forceinline__ bool vector_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

// Calls body(Width<kVec>{}, i) for the vector part of [0, n) (when `vectorized`), then
// body(Width<1>{}, i) for the elements left; each thread of the block takes every blockDim.x-th step.
template <typename Body>
__device__ __forceinline__ void for_each_pack(int64_t n, bool vectorized, const Body& body) {
  int64_t scalar_start = 0;
  if (vectorized) {
    const int64_t packs = n / kVec;
    for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) body(Width<kVec>{}, k * kVec);
    scalar_start = packs * kVec;
  }
  for (int64_t i = scalar_start + threadIdx.x; i < n; i += blockDim.x) body(Width<1>{}, i);
}

__global__ void adam_fp32_kernel(TensorListMeta<4> meta, AdamHyper hyper) {
  const ChunkRange r = chunk_of_block(meta);
  float* p = static_cast<float*>(meta.addresses[0][r.tensor]) + r.begin;
  const float* g = static_cast<const float*>(meta.addresses[1][r.tensor]) + r.begin;
  float* m = static_cast<float*>(meta.addresses[2][r.tensor]) + r.begin;
  float* v = static_cast<float*>(meta.addresses[3][r.tensor]) + r.begin;
  const bool vectorized = vector_aligned<float>(p) && vector_aligned<float>(g) && vector_aligned<float>(m) &&
                          vector_aligned<float>(v);
  for_each_pack(r.end - r.begin, vectorized, [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    Pack<float, N> pp = load_pack<N>(p, i), mp = load_pack<N>(m, i), vp = load_pack<N>(v, i);
    const Pack<float, N> gp = load_pack<N>(g, i);
#pragma unroll
    for (int k = 0; k < N; ++k) adam_update(pp.v[k], mp.v[k], vp.v[k], gp.v[k], hyper);
    store_pack<N>(p, i, pp);
    store_pack<N>(m, i, mp);
    store_pack<N>(v, i, vp);
  });
}

// Pass 1 of the master-weight step: raise *found_inf if any unscaled gradient is inf/nan (racing
// writes all store the same 1.0f).
template <typename TGrad>
__global__ void check_finite_kernel(TensorListMeta<1> meta, float inv_grad_scale, float* found_inf) {
  const ChunkRange r = chunk_of_block(meta);
  const TGrad* g = static_cast<const TGrad*>(meta.addresses[0][r.tensor]) + r.begin;
  bool finite = true;
  for_each_pack(r.end - r.begin, vector_aligned<TGrad>(g), [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    const Pack<TGrad, N> gp = load_pack<N>(g, i);
#pragma unroll
    for (int k = 0; k < N; ++k) finite &= isfinite(load(gp.v[k]) * inv_grad_scale);
  });
  if (__syncthreads_or(!finite) && threadIdx.x == 0) *found_inf = 1.f;
}

// Pass 2: skipped as a whole when the flag is up (read on the device: no host synchronization).
template <typename TModel, typename TGrad>
__global__ void adam_master_kernel(TensorListMeta<5> meta, AdamHyper hyper, float inv_grad_scale,
                                   const float* found_inf) {
  if (*found_inf != 0.f) return;
  const ChunkRange r = chunk_of_block(meta);
  TModel* model = static_cast<TModel*>(meta.addresses[0][r.tensor]) + r.begin;
  const TGrad* g = static_cast<const TGrad*>(meta.addresses[1][r.tensor]) + r.begin;
  float* p = static_cast<float*>(meta.addresses[2][r.tensor]) + r.begin;
  float* m = static_cast<float*>(meta.addresses[3][r.tensor]) + r.begin;
  float* v = static_cast<float*>(meta.addresses[4][r.tensor]) + r.begin;
  const bool vectorized = vector_aligned<TModel>(model) && vector_aligned<TGrad>(g) && vector_aligned<float>(p) &&
                          vector_aligned<float>(m) && vector_aligned<float>(v);
  for_each_pack(r.end - r.begin, vectorized, [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    Pack<float, N> pp = load_pack<N>(p, i), mp = load_pack<N>(m, i), vp = load_pack<N>(v, i);
    const Pack<TGrad, N> gp = load_pack<N>(g, i);
    Pack<TModel, N> model_pack;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      adam_update(pp.v[k], mp.v[k], vp.v[k], load(gp.v[k]) * inv_grad_scale, hyper);
      model_pack.v[k] = store<TModel>(pp.v[k]);
    }
    store_pack<N>(p, i, pp);
    store_pack<N>(m, i, mp);
    store_pack<N>(v, i, vp);
    store_pack<N>(model, i, model_pack);
  });
}

std::string describe_launch(int64_t num_tensors, int blocks) {
  return std::to_string(num_tensors) + " tensors, a launch of " + std::to_string(blocks) + " chunks";
}

}  // namespace

void adam_fp32(float* const* params, const float* const* grads, float* const* exp_avgs, float* const* exp_avg_sqs,
               const int64_t* numels, int64_t num_tensors, const AdamHyper& hyper, cudaStream_t stream) {
  void* const* lists[4] = {reinterpret_cast<void* const*>(params), reinterpret_cast<void* const*>(const_cast<float* const*>(grads)),
                           reinterpret_cast<void* const*>(exp_avgs), reinterpret_cast<void* const*>(exp_avg_sqs)};
  multi_tensor_apply<4>(lists, numels, num_tensors, [&](const TensorListMeta<4>& meta, int blocks) {
    adam_fp32_kernel<<<blocks, kThreads, 0, stream>>>(meta, hyper);
    check_launch("adam_fp32_kernel", describe_launch(num_tensors, blocks));
  });
}

void adam_master(void* const* model_params, DType model_dtype, const void* const* grads, DType grad_dtype,
                 float* const* masters, float* const* exp_avgs, float* const* exp_avg_sqs, const int64_t* numels,
                 int64_t num_tensors, const AdamHyper& hyper, float inv_grad_scale, bool check_finite,
                 float* found_inf, cudaStream_t stream) {
  void* const* grad_list[1] = {const_cast<void* const*>(grads)};
  void* const* lists[5] = {model_params, const_cast<void* const*>(grads), reinterpret_cast<void* const*>(masters),
                           reinterpret_cast<void* const*>(exp_avgs), reinterpret_cast<void* const*>(exp_avg_sqs)};
  with_dtype(grad_dtype, [&](auto grad_tag) {
    using TGrad = decltype(grad_tag);
    // Every check launch precedes every update launch on the stream: the step is all or nothing.
    if (check_finite) {
      multi_tensor_apply<1>(grad_list, numels, num_tensors, [&](const TensorListMeta<1>& meta, int blocks) {
        check_finite_kernel<TGrad><<<blocks, kThreads, 0, stream>>>(meta, inv_grad_scale, found_inf);
        check_launch("check_finite_kernel", describe_launch(num_tensors, blocks));
      });
    }
    with_dtype(model_dtype, [&](auto model_tag) {
      using TModel = decltype(model_tag);
      if constexpr (!std::is_same_v<TModel, float>) {
        multi_tensor_apply<5>(lists, numels, num_tensors, [&](const TensorListMeta<5>& meta, int blocks) {
          adam_master_kernel<TModel, TGrad><<<blocks, kThreads, 0, stream>>>(meta, hyper, inv_grad_scale, found_inf);
          check_launch("adam_master_kernel", describe_launch(num_tensors, blocks));
        });
      }
    });
  });
}

}  // namespace megalite::cuda
