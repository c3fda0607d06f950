// The same CPU kernels compiled for AVX2 + FMA (8 fp32 lanes instead of SSE2's 4); best_kernels()
// in kernels_generic.cpp uses this table only on CPUs that report both features.
//
// Every header with external-linkage code is included BEFORE the target pragma, so only the
// internal-linkage kernels below it get AVX2 code: the linker can never hand a baseline caller an
// AVX2 copy of a shared inline function.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "adam_math.h"
#include "cpu/float_formats.h"
#include "cpu/kernels.h"
#include "norm_math.h"

#if defined(__x86_64__) || defined(__i386__)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif
#define MEGALITE_HAVE_AVX2_TABLE 1
#endif

#include "cpu/adam_kernels.h"
#include "cpu/norm_kernels.h"

namespace megalite::cpu {

const KernelTable& avx2_kernels() {
#if defined(MEGALITE_HAVE_AVX2_TABLE)
  static const KernelTable table{"avx2", adam_fp32, adam_master, layer_norm_forward, layer_norm_backward,
                                 rms_norm_forward, rms_norm_backward};
  return table;
#else
  return generic_kernels();
#endif
}

}  // namespace megalite::cpu

#if defined(MEGALITE_HAVE_AVX2_TABLE) && defined(__clang__)
#pragma clang attribute pop
#endif
