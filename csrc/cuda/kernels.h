// The CUDA kernels' launchers, on raw device pointers and a stream (no torch headers):
// csrc/cuda/bindings.cpp calls them.  Sources: adam.cu (multi-tensor apply), norms.cu (which hands
// rows that fit to norms_row_cached.cu), swiglu.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "adam_math.h"
#include "dtypes.h"

namespace megalite::cuda {

// Lists of num_tensors device pointers per role; entry i of each has numels[i] elements.
void adam_fp32(float* const* params, const float* const* grads, float* const* exp_avgs, float* const* exp_avg_sqs,
               const int64_t* numels, int64_t num_tensors, const AdamHyper& hyper, cudaStream_t stream);

// found_inf: device pointer to one float.  If it is nonzero when the update kernels run (set before
// the call, or by this call's check of the unscaled gradients), nothing is written.  Without
// check_finite the gradients are not checked (the caller vouches that they are finite).
void adam_master(void* const* model_params, DType model_dtype, const void* const* grads, DType grad_dtype,
                 float* const* masters, float* const* exp_avgs, float* const* exp_avg_sqs, const int64_t* numels,
                 int64_t num_tensors, const AdamHyper& hyper, float inv_grad_scale, bool check_finite,
                 float* found_inf, cudaStream_t stream);

struct NormShape {
  int64_t rows;
  int64_t cols;
  DType x_dtype;
  DType weight_dtype;   // x_dtype or Float32
};

// The most rows of fp32 partial sums the backward writes for dweight (and as many for dbias): the
// workspace holds this many.
int64_t norm_weight_grad_splits(const NormShape& shape);

void layer_norm_forward(const NormShape& shape, const void* x, const void* weight, const void* bias, void* y,
                        float* mean, float* rstd, float eps, cudaStream_t stream);
// workspace: 2 * norm_weight_grad_splits(shape) * cols floats.
void layer_norm_backward(const NormShape& shape, const void* dy, const void* x, const float* mean, const float* rstd,
                         const void* weight, void* dx, void* dweight, void* dbias, float* workspace,
                         cudaStream_t stream);
void rms_norm_forward(const NormShape& shape, const void* x, const void* weight, void* y, float* rstd, float eps,
                      cudaStream_t stream);
// workspace: norm_weight_grad_splits(shape) * cols floats.
void rms_norm_backward(const NormShape& shape, const void* dy, const void* x, const float* rstd, const void* weight,
                       void* dx, void* dweight, float* workspace, cudaStream_t stream);

// SwiGLU over `pairs` interleaved (gate, up) pairs: h has 2 * pairs elements, y and dy `pairs`, dh
// 2 * pairs; all contiguous, all of `dtype`.
void swiglu_forward(int64_t pairs, DType dtype, const void* h, void* y, cudaStream_t stream);
void swiglu_backward(int64_t pairs, DType dtype, const void* dy, const void* h, void* dh, cudaStream_t stream);

}  // namespace megalite::cuda
