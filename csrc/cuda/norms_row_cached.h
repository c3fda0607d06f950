// The register-cached LayerNorm / RMSNorm path (norms_row_cached.cu); norms.cu decides when it applies.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>

#include "cuda/kernels.h"
#include "cuda/launch_plan.h"

namespace megalite::cuda {

// True when a row is whole 16-byte packs of at most kMaxCachedCols elements and every pointer is
// pack-aligned: row tensors (x, y, dy, dx) to 16 bytes, weight/bias to one pack of their dtype.
// nullptr entries (an absent bias) pass.
bool row_cached_fits(const NormShape& shape, std::initializer_list<const void*> rows_pointers,
                     std::initializer_list<const void*> weight_pointers);

// True when the backward kernel for this shape fits the current device's shared memory per block:
// its static arrays plus the dynamic accumulators, within the opt-in limit (launch_plan.h).  Where
// it does not (LayerNorm from 6,112 columns on sm_6x and from 8,160 on sm_75, with block_sum2's
// 272 static bytes), the general kernels run.
template <bool kRms>
bool row_cached_backward_fits(const NormShape& shape);

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
