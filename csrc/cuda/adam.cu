// CUDA fused Adam by multi-tensor apply: the tensors of a parameter group are cut into chunks of
// kChunk elements, one thread block per chunk, and one launch carries the pointers of up to
// kMaxTensors tensors and kMaxBlocks chunks in its (by-value) argument -- so 148 tensors take a
// handful of launches instead of 148 (the design of apex's multi_tensor_apply; our code).
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>

#include "adam_math.h"
#include "cuda/float_formats.cuh"
#include "cuda/kernels.h"

namespace megalite::cuda {
namespace {

constexpr int kChunk = 65536;       // elements per block
constexpr int kThreads = 512;
constexpr int kMaxTensors = 24;     // keeps TensorListMeta<5> under the 4 KiB kernel-argument limit
constexpr int kMaxBlocks = 320;

template <int Depth>
struct TensorListMeta {
  void* addresses[Depth][kMaxTensors];
  int64_t numels[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta<5>) + 64 < 4096, "kernel arguments must fit in 4 KiB");

// Fills TensorListMeta<Depth> from lists[role][tensor] and calls launch(meta, num_blocks) whenever it
// is full (tensor slots or block slots), carrying a half-done tensor over into the next launch.
template <int Depth, typename Launch>
void multi_tensor_apply(void* const* const* lists, const int64_t* numels, int64_t num_tensors, const Launch& launch) {
  TensorListMeta<Depth> meta;
  int tensors = 0, blocks = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (numels[t] == 0) continue;
    for (int d = 0; d < Depth; ++d) meta.addresses[d][tensors] = lists[d][t];
    meta.numels[tensors] = numels[t];
    ++tensors;
    const int64_t chunks = (numels[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (tensors == kMaxTensors && last_chunk)) {
        launch(meta, blocks);
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {   // the current tensor continues in the next launch, in slot 0
          for (int d = 0; d < Depth; ++d) meta.addresses[d][0] = meta.addresses[d][tensors - 1];
          meta.numels[0] = meta.numels[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(meta, blocks);
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

__global__ void adam_fp32_kernel(TensorListMeta<4> meta, AdamHyper hyper) {
  const ChunkRange r = chunk_of_block(meta);
  float* p = static_cast<float*>(meta.addresses[0][r.tensor]);
  const float* g = static_cast<const float*>(meta.addresses[1][r.tensor]);
  float* m = static_cast<float*>(meta.addresses[2][r.tensor]);
  float* v = static_cast<float*>(meta.addresses[3][r.tensor]);
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    float pi = p[i], mi = m[i], vi = v[i];
    adam_update(pi, mi, vi, g[i], hyper);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

// Pass 1 of the master-weight step: raise *found_inf if any unscaled gradient is inf/nan (racing
// writes all store the same 1.0f).
template <typename TGrad>
__global__ void check_finite_kernel(TensorListMeta<1> meta, float inv_grad_scale, float* found_inf) {
  const ChunkRange r = chunk_of_block(meta);
  const TGrad* g = static_cast<const TGrad*>(meta.addresses[0][r.tensor]);
  bool finite = true;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) finite &= isfinite(load(g[i]) * inv_grad_scale);
  if (__syncthreads_or(!finite) && threadIdx.x == 0) *found_inf = 1.f;
}

// Pass 2: skipped as a whole when the flag is up (read on the device: no host synchronization).
template <typename TModel, typename TGrad>
__global__ void adam_master_kernel(TensorListMeta<5> meta, AdamHyper hyper, float inv_grad_scale,
                                   const float* found_inf) {
  if (*found_inf != 0.f) return;
  const ChunkRange r = chunk_of_block(meta);
  TModel* model = static_cast<TModel*>(meta.addresses[0][r.tensor]);
  const TGrad* g = static_cast<const TGrad*>(meta.addresses[1][r.tensor]);
  float* p = static_cast<float*>(meta.addresses[2][r.tensor]);
  float* m = static_cast<float*>(meta.addresses[3][r.tensor]);
  float* v = static_cast<float*>(meta.addresses[4][r.tensor]);
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    float pi = p[i], mi = m[i], vi = v[i];
    adam_update(pi, mi, vi, load(g[i]) * inv_grad_scale, hyper);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    model[i] = store<TModel>(pi);
  }
}

}  // namespace

void adam_fp32(float* const* params, const float* const* grads, float* const* exp_avgs, float* const* exp_avg_sqs,
               const int64_t* numels, int64_t num_tensors, const AdamHyper& hyper, cudaStream_t stream) {
  void* const* lists[4] = {reinterpret_cast<void* const*>(params), reinterpret_cast<void* const*>(const_cast<float* const*>(grads)),
                           reinterpret_cast<void* const*>(exp_avgs), reinterpret_cast<void* const*>(exp_avg_sqs)};
  multi_tensor_apply<4>(lists, numels, num_tensors, [&](const TensorListMeta<4>& meta, int blocks) {
    adam_fp32_kernel<<<blocks, kThreads, 0, stream>>>(meta, hyper);
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
      });
    }
    with_dtype(model_dtype, [&](auto model_tag) {
      using TModel = decltype(model_tag);
      if constexpr (!std::is_same_v<TModel, float>) {
        multi_tensor_apply<5>(lists, numels, num_tensors, [&](const TensorListMeta<5>& meta, int blocks) {
          adam_master_kernel<TModel, TGrad><<<blocks, kThreads, 0, stream>>>(meta, hyper, inv_grad_scale, found_inf);
        });
      }
    });
  });
}

}  // namespace megalite::cuda
