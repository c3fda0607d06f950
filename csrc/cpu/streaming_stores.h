// Streaming (non-temporal) stores for outputs too large to stay in the cache: write_row().
//
// Internal linkage, included by the kernel headers (see adam_kernels.h).
#pragma once

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <cstdint>

#include "cpu/float_formats.h"

namespace megalite::cpu {
namespace {

// How write_row rounds its fp32 results to the output type T.  PortableRounding rounds element by
// element with float_formats.h's store<T>, which the vectorizer fuses into the loop computing them.
// A kernel table may pass its own policy with kRoundsLines<T> true for the types it rounds a whole
// 64-byte line at a time, and a round_line(const float* results, T* dst, bool streaming) that
// writes that line (kernels_avx512.cpp: 32 bf16 in one AVX512_BF16 instruction).
struct PortableRounding {
  template <typename T>
  static constexpr bool kRoundsLines = false;
};

// dst[c] = store<T>(value(c)) for c in [0, cols), value(c) an fp32 result: how the kernels write
// their large outputs (the norms' rows of y and dx, master-mode Adam's model params).
//
// With `streaming`, every whole 64-byte line is computed into a line-sized buffer and sent to
// memory with non-temporal stores.  A store that misses the cache otherwise reads the line it is
// about to overwrite (write-allocate), so an output that goes to memory anyway costs two transfers
// per line instead of one.  Measured on the CI VM (AMD EPYC, 2 threads, same process): LayerNorm
// [8192, 1024] fp32 forward 3.2 -> 2.0 ms, backward 4.5 -> 4.2 ms; the master-weight Adam step on
// GPT-2 small's 124M bf16 params 6-11% faster.  The price: the output is not left in the cache, so
// bindings.cpp streams only outputs too large to stay there for their consumer.  Elements before
// the first aligned line and after the last are stored normally.  A thread ends its writes with
// end_streaming(), which orders the streamed stores before the parallel region's join.
template <class Rounding, typename T, typename Value>
inline void write_row(T* __restrict dst, int64_t cols, bool streaming, const Value& value) {
  constexpr int64_t kLine = 64, kPerLine = kLine / static_cast<int64_t>(sizeof(T));
  int64_t start = 0;
#if defined(__SSE2__)
  if (streaming) {   // the elements before the first whole line, so that the streamed lines are aligned
    const int64_t past_line = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % kLine);
    const int64_t head = past_line == 0 ? 0 : (kLine - past_line) / static_cast<int64_t>(sizeof(T));
    for (; start < head && start < cols; ++start) dst[start] = store<T>(value(start));
  }
  if constexpr (Rounding::template kRoundsLines<T>) {
    for (; start + kPerLine <= cols; start += kPerLine) {
      alignas(kLine) float results[kPerLine];
#pragma omp simd
      for (int64_t j = 0; j < kPerLine; ++j) results[j] = value(start + j);
      Rounding::round_line(results, dst + start, streaming);
    }
  } else if (streaming) {
    for (; start + kPerLine <= cols; start += kPerLine) {
      alignas(kLine) T line[kPerLine];
#pragma omp simd
      for (int64_t j = 0; j < kPerLine; ++j) line[j] = store<T>(value(start + j));
      auto* out = reinterpret_cast<__m128i*>(dst + start);
      const auto* in = reinterpret_cast<const __m128i*>(line);
      for (int j = 0; j < 4; ++j) _mm_stream_si128(out + j, _mm_load_si128(in + j));
    }
  }
#endif
#pragma omp simd
  for (int64_t c = start; c < cols; ++c) dst[c] = store<T>(value(c));
}

inline void end_streaming(bool streaming) {
#if defined(__SSE2__)
  if (streaming) _mm_sfence();
#else
  (void)streaming;
#endif
}

}  // namespace
}  // namespace megalite::cpu
