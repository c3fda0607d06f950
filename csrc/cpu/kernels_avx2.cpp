// The same CPU kernels compiled for AVX2 + FMA (8 fp32 lanes instead of SSE2's 4); best_kernels()
// in kernels_generic.cpp uses this table only on CPUs that report both features.
//
// The rule: every header that is not one of the kernel headers -- every system and standard-library
// header they use, and our shared inline functions -- is included BEFORE the target pragma, so only
// the internal-linkage kernels below it get AVX2 code.  Two reasons:
//  * the linker keeps one copy of each inline function with external linkage; an AVX2 copy of one
//    could be handed to a baseline caller and crash it on a CPU without AVX2;
//  * libstdc++ 13+ marks allocator members always_inline: defined under the pragma they are AVX2
//    functions, and GCC 13/14 stop with "inlining failed in call to 'always_inline'
//    'std::allocator<float>::~allocator()': target specific option mismatch" at the baseline
//    callers in the same header.
// tests/ops/test_kernel_build.py fails when a system header is first entered below the pragma.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

#include "cpu/kernel_table.h"

namespace megalite::cpu {

const KernelTable& avx2_kernels() {
#if defined(MEGALITE_HAVE_AVX2_TABLE)
  static const KernelTable table = kernel_table<PortableRounding>("avx2");
  return table;
#else
  return generic_kernels();
#endif
}

}  // namespace megalite::cpu

#if defined(MEGALITE_HAVE_AVX2_TABLE) && defined(__clang__)
#pragma clang attribute pop
#endif
