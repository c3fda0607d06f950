// The register-cached LayerNorm / RMSNorm path (norms_row_cached.cu); norms.cu decides when it applies.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>

#include "cuda/kernels.h"

namespace megalite::cuda {

constexpr int64_t kMaxCachedCols = 8192;

// True when a row is whole 16-byte packs of at most kMaxCachedCols elements and every pointer is
// pack-aligned: row tensors (x, y, dy, dx) to 16 bytes, weight/bias to one pack of their dtype.
// nullptr entries (an absent bias) pass.
bool row_cached_fits(const NormShape& shape, std::initializer_list<const void*> rows_pointers,
                     std::initializer_list<const void*> weight_pointers);

// The most rows of partial sums the backward writes ((dweight | dbias) x cols floats each).
int64_t row_cached_max_blocks(const NormShape& shape);

template <bool kRms>
void row_cached_forward(const NormShape& shape, const void* x, const void* weight, const void* bias, void* y,
                        float* mean, float* rstd, float eps, cudaStream_t stream);

// workspace: row_cached_max_blocks(shape) * (kRms ? 1 : 2) * cols floats.
template <bool kRms>
void row_cached_backward(const NormShape& shape, const void* dy, const void* x, const float* mean, const float* rstd,
                         const void* weight, void* dx, void* dweight, void* dbias, float* workspace,
                         cudaStream_t stream);

}  // namespace megalite::cuda
