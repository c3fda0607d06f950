// The CPU kernels' entry points, on raw pointers (no torch headers): bindings.cpp calls them.
//
// Each kernel is compiled three times, for baseline x86-64 (kernels_generic.cpp), for AVX2+FMA
// (kernels_avx2.cpp) and for AVX-512 (kernels_avx512.cpp), and best_kernels() picks the table for
// the CPU it runs on, so one build runs on any x86-64 yet uses the wide vectors where they exist.
#pragma once

#include <cstdint>

#include "adam_math.h"
#include "cpu/float_formats.h"

namespace megalite::cpu {

// A batch of rows for the norms: x is [rows, cols] row-major; weight and bias are [cols].
struct NormShape {
  int64_t rows;
  int64_t cols;
  DType x_dtype;        // also the dtype of y, dy and dx
  DType weight_dtype;   // x_dtype or Float32 (also of bias, dweight, dbias)
  int num_threads;
  bool stream_output;   // write y/dx with non-temporal stores (bindings.cpp: outputs too big for the cache)
};

struct KernelTable {
  const char* isa;

  // fp32 Adam/AdamW over num_tensors tensors; entry i of each array has numels[i] elements.
  void (*adam)(float* const* params, const float* const* grads, float* const* exp_avgs, float* const* exp_avg_sqs,
               const int64_t* numels, int64_t num_tensors, const AdamHyper& hyper, int num_threads);

  // Master-weight Adam: grads (grad_dtype) * inv_grad_scale update fp32 masters and moments, and the
  // rounded master is written into model_params (model_dtype).  With check_finite, checks every
  // unscaled gradient first and returns true (writing nothing) if one is inf/nan; without, the
  // caller vouches that they are finite (it saves that extra read of the gradients).  With
  // stream_model, model_params are written with streaming stores (cpu/streaming_stores.h).
  bool (*adam_master)(void* const* model_params, DType model_dtype, const void* const* grads, DType grad_dtype,
                      float* const* masters, float* const* exp_avgs, float* const* exp_avg_sqs,
                      const int64_t* numels, int64_t num_tensors, const AdamHyper& hyper, float inv_grad_scale,
                      bool check_finite, bool stream_model, int num_threads);

  // bias may be null.  mean, rstd: [rows] fp32 outputs.
  void (*layer_norm_forward)(const NormShape& shape, const void* x, const void* weight, const void* bias, void* y,
                             float* mean, float* rstd, float eps);
  // workspace: 2 * num_threads * cols floats (per-thread partial sums of dweight and dbias).
  void (*layer_norm_backward)(const NormShape& shape, const void* dy, const void* x, const float* mean,
                              const float* rstd, const void* weight, void* dx, void* dweight, void* dbias,
                              float* workspace);
  void (*rms_norm_forward)(const NormShape& shape, const void* x, const void* weight, void* y, float* rstd, float eps);
  // workspace: num_threads * cols floats.
  void (*rms_norm_backward)(const NormShape& shape, const void* dy, const void* x, const float* rstd,
                            const void* weight, void* dx, void* dweight, float* workspace);
};

const KernelTable& generic_kernels();
const KernelTable& avx2_kernels();     // use only where cpu_has_avx2()
const KernelTable& avx512_kernels();   // use only where cpu_has_avx512()
const KernelTable& best_kernels();     // the widest table this CPU can run

// What the CPU (and the OS, which must save the wider registers) supports, asked at run time.
bool cpu_has_avx2();          // AVX2 and FMA
bool cpu_has_avx512();        // AVX-512 F, BW, DQ and VL (Skylake-SP and later, Zen 4 and later)
bool cpu_has_avx512_bf16();   // AVX512_BF16: fp32 -> bf16 conversion in one instruction

}  // namespace megalite::cpu
