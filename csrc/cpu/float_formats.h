// bf16 and fp16 storage on the CPU, without torch headers: each is a 16-bit pattern; load() widens
// to fp32 exactly, store() rounds fp32 to nearest even (as torch's .to()/copy_ do).  Written as
// branch-free bit arithmetic so the compiler vectorizes the loops that use them.
#pragma once

#include <cstdint>
#include <cstring>

#include "dtypes.h"

namespace megalite::cpu {

// Scoped enums, not structs: distinct types for overloading that stay scalars, which the
// vectorizer can load and store (it gives up on aggregate copies).
enum class bf16 : uint16_t {};
enum class fp16 : uint16_t {};

using megalite::DType;

inline float bits_to_float(uint32_t bits) { float f; std::memcpy(&f, &bits, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t bits; std::memcpy(&bits, &f, 4); return bits; }

// c ? a : b as bit masks: GCC if-converts a lone ?: but not nested ones, and any branch left in a
// loop body stops the vectorizer.
inline uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

inline float load(float x) { return x; }
inline float load(bf16 x) { return bits_to_float(static_cast<uint32_t>(x) << 16); }

// fp16 -> fp32 by rescaling the exponent: shift the 15 magnitude bits into fp32 position and
// multiply by 2^112 (the bias difference 127 - 15); subnormals come out right by the same multiply,
// and inf/nan (exponent 31) are patched to fp32's all-ones exponent.
inline float load(fp16 value) {
  const uint16_t bits = static_cast<uint16_t>(value);
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t magnitude = static_cast<uint32_t>(bits & 0x7fffu) << 13;
  const float scaled = bits_to_float(magnitude) * 0x1p112f;
  const uint32_t finite = float_to_bits(scaled);
  const uint32_t special = magnitude | 0x7f800000u;   // keeps the nan payload
  const uint32_t out = select_bits((bits & 0x7c00u) == 0x7c00u, special, finite);
  return bits_to_float(out | sign);
}

template <typename T> inline T store(float f);
template <> inline float store<float>(float f) { return f; }

template <> inline bf16 store<bf16>(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;   // round to nearest, ties to even
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  // A lone ?: on a float compare becomes one blend; select_bits' mask arithmetic cost ~30% of a
  // bf16 LayerNorm forward (perf, AVX2).
  return static_cast<bf16>(f != f ? quiet_nan : rounded);
}

// fp32 -> fp16, round to nearest even, by the classic float-arithmetic trick: for normal results,
// adding a "magic" power of two aligned with fp16's last mantissa bit makes the FPU do the rounding;
// subnormal results are rounded by adding 0.5 (2^-1 aligns the subnormal grid to the integer bits).
inline fp16 store_fp16(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs_bits = bits & 0x7fffffffu;
  const float abs_f = bits_to_float(abs_bits);
  // overflow (|f| >= 65520 rounds to inf) and nan
  const uint32_t inf_or_nan = select_bits(abs_bits > 0x7f800000u, 0x7e00u, 0x7c00u);
  // subnormal fp16 results: |f| < 2^-14
  const uint32_t subnormal = float_to_bits(abs_f + 0.5f) - float_to_bits(0.5f);
  // normal: re-bias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even
  const uint32_t mantissa_odd = (abs_bits >> 13) & 1u;
  const uint32_t normal = (abs_bits + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd) >> 13;
  const uint32_t finite = select_bits(abs_bits < 0x38800000u, subnormal, normal);
  const uint32_t out = select_bits(abs_bits >= 0x47800000u, inf_or_nan, finite);
  return static_cast<fp16>(out | sign);
}
template <> inline fp16 store<fp16>(float f) { return store_fp16(f); }

// True when the 16/32-bit pattern is inf or nan (exponent all ones).
inline bool is_finite(float f) { return (float_to_bits(f) & 0x7f800000u) != 0x7f800000u; }

}  // namespace megalite::cpu
