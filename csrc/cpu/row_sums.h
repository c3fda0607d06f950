// Vectorized sums over a row with several independent accumulators, for the CPU kernels.
//
// Why not `#pragma omp simd reduction(+ : s)`: GCC gives that loop ONE vector accumulator, so every
// vector add waits for the previous one (3-4 cycles of latency per 8 floats): measured 0.17 ns per
// element per reduction on the 2-core CI machine, 3-4x the cost of the loads.  kSumLanes = 32
// partial sums are four AVX2 (eight SSE2) registers that add independently.  The summation order
// differs from a left-to-right sum (so results differ by fp32 round-off, and are closer to exact).
//
// Internal linkage, included by the kernel headers (see adam_kernels.h).
#pragma once

#include <cstdint>

namespace megalite::cpu {
namespace {

constexpr int64_t kSumLanes = 32;

// partial[0] + ... + partial[kSumLanes - 1] as a tree: log2(32) = 5 dependent (vector) adds instead
// of a chain of 31 scalar ones, which would cost ~25% of a 1024-wide row's sum.
inline float combine_lanes(float* partial) {
  for (int64_t width = kSumLanes / 2; width > 0; width /= 2) {
    for (int64_t j = 0; j < width; ++j) partial[j] += partial[j + width];
  }
  return partial[0];
}

// sum over c in [begin, end) of term(c).
template <typename Term>
inline float row_sum(int64_t begin, int64_t end, const Term& term) {
  float partial[kSumLanes] = {};
  int64_t c = begin;
  for (; c + kSumLanes <= end; c += kSumLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kSumLanes; ++j) partial[j] += term(c + j);
  }
  for (int64_t j = 0; c + j < end; ++j) partial[j] += term(c + j);
  return combine_lanes(partial);
}

// Two sums in one sweep: term(c, a, b) adds its two terms to a and b.
template <typename Term>
inline void row_sum2(int64_t begin, int64_t end, const Term& term, float& sum_a, float& sum_b) {
  float partial_a[kSumLanes] = {}, partial_b[kSumLanes] = {};
  int64_t c = begin;
  for (; c + kSumLanes <= end; c += kSumLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kSumLanes; ++j) term(c + j, partial_a[j], partial_b[j]);
  }
  for (int64_t j = 0; c + j < end; ++j) term(c + j, partial_a[j], partial_b[j]);
  sum_a = combine_lanes(partial_a);
  sum_b = combine_lanes(partial_b);
}

}  // namespace
}  // namespace megalite::cpu
