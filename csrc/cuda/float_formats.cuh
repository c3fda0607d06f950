// fp32 / bf16 / fp16 loads and stores on the device: widen exactly, round to nearest even; packs of
// consecutive elements moved by one vector instruction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "dtypes.h"

namespace megalite::cuda {

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float load(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T store(float x);
template <> __device__ __forceinline__ float store<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half store<__half>(float x) { return __float2half_rn(x); }

// N consecutive elements of one array, moved by one load/store instruction when N * sizeof(T) is 4,
// 8 or 16 bytes (two for 32 bytes; N == 1: a scalar tail).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Whether p may be read or written as packs of `bytes` (host side; null, an absent optional input,
// counts as aligned).
inline bool pack_aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* base, int64_t i) {
  return *reinterpret_cast<const Pack<T, N>*>(base + i);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* base, int64_t i, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(base + i) = pack;
}

// Calls fn(tag) with a value of the storage type named by dtype (host side dispatch).
template <typename Fn>
void with_dtype(DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::Float32: fn(float{}); break;
    case DType::BFloat16: fn(__nv_bfloat16{}); break;
    case DType::Float16: fn(__half{}); break;
  }
}

}  // namespace megalite::cuda
