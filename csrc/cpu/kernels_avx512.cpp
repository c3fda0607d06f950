// The same CPU kernels compiled for AVX-512 (16 fp32 lanes; F, BW, DQ and VL, so that the 16-bit
// loads, stores and conversions of bf16/fp16 vectorize as well), with bf16 results rounded by the
// CPU's own instruction where it has AVX512_BF16.  best_kernels() in kernels_generic.cpp uses this
// table only on CPUs that report cpu_has_avx512().
//
// kernels_avx2.cpp's rule holds here, for the same reasons (there): every header that is not one of
// the kernel headers -- system, standard-library, our shared inline functions -- is included BEFORE
// the target pragma, so that only the internal-linkage kernels below it get AVX-512 code.
// tests/ops/test_kernel_build.py fails when a system header is first entered below the pragma.
//
// The pragma also enables AVX512_BF16, for the one intrinsic in Avx512Rounding, which runs only
// where cpu_has_avx512_bf16().  Enabling it costs nothing on an AVX-512 CPU without it: compilers
// emit its instructions only for its intrinsics and for conversions of the __bf16 type, and megalite's
// bf16 is a 16-bit enum (float_formats.h), never __bf16.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "adam_math.h"
#include "cpu/float_formats.h"
#include "cpu/kernels.h"
#include "norm_math.h"

#if defined(__x86_64__) || defined(__i386__)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma"))), \
                             apply_to = function)
#endif
#define MEGALITE_HAVE_AVX512_TABLE 1
#endif

#include "cpu/kernel_table.h"

namespace megalite::cpu {
namespace {

#if defined(MEGALITE_HAVE_AVX512_TABLE)
// How write_row rounds bf16 results here: a 64-byte line (32 values) at a time with vcvtne2ps2bf16,
// one instruction for what float_formats.h's store<bf16> does with integer operations per vector
// (the rounding bias, the shift, the nan blend) and a narrowing of 32-bit lanes to 16.
// The instruction rounds to nearest even exactly as store<bf16> (and torch) do -- normals, overflow
// to inf, inf, and nan quieted by setting the same mantissa bit -- except that it flushes fp32
// subnormal inputs to zero, where torch rounds them to bf16 subnormals (1e-40 stays 1e-40).  So a
// line holding a subnormal (vfpclassps finds them, one instruction per 16 values) takes store<bf16>,
// as does every line on a CPU without AVX512_BF16.  fp16 keeps the portable rounding: vcvtps2ph
// would round it alike, but the fp16 outputs are not the ones that limit a training step.
struct Avx512Rounding {
  template <typename T>
  static constexpr bool kRoundsLines = std::is_same_v<T, bf16>;

  static void round_line(const float* results, bf16* dst, bool streaming) {
    // Asked on the first call, not at load time: a namespace-scope initializer would run (compiled for
    // AVX-512) when the library loads, on every CPU.
    static const bool native_bf16 = cpu_has_avx512_bf16();
    constexpr int kSubnormal = 0x20;   // vfpclassps category "denormal"
    const __m512 low = _mm512_load_ps(results), high = _mm512_load_ps(results + 16);
    __m512i line;
    if (native_bf16 && (_mm512_fpclass_ps_mask(low, kSubnormal) | _mm512_fpclass_ps_mask(high, kSubnormal)) == 0) {
      line = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));   // low's 16 values first
    } else {
      alignas(64) bf16 rounded[32];
      for (int j = 0; j < 32; ++j) rounded[j] = store<bf16>(results[j]);
      line = _mm512_load_si512(rounded);
    }
    if (streaming) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), line);   // write_row aligned streamed lines
    } else {
      _mm512_storeu_si512(dst, line);
    }
  }
};
#endif

}  // namespace

const KernelTable& avx512_kernels() {
#if defined(MEGALITE_HAVE_AVX512_TABLE)
  static const KernelTable table = kernel_table<Avx512Rounding>("avx512");
  return table;
#else
  return generic_kernels();
#endif
}

}  // namespace megalite::cpu

#if defined(MEGALITE_HAVE_AVX512_TABLE) && defined(__clang__)
#pragma clang attribute pop
#endif
