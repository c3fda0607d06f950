// Sums over a thread block: warp shuffles, then one warp over the per-warp results.
#pragma once

namespace megalite::cuda {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;

// Sum two floats over the block; the result is valid in all threads.  Safe to call twice in a row:
// the second call's first barrier orders its shared writes after every read of the first's total.
__device__ __forceinline__ float2 block_sum2(float2 v) {
  __shared__ float2 warp_results[kMaxWarps];
  __shared__ float2 total;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v.x += __shfl_down_sync(0xffffffffu, v.x, offset);
    v.y += __shfl_down_sync(0xffffffffu, v.y, offset);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? warp_results[lane] : make_float2(0.f, 0.f);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      v.x += __shfl_down_sync(0xffffffffu, v.x, offset);
      v.y += __shfl_down_sync(0xffffffffu, v.y, offset);
    }
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

}  // namespace megalite::cuda
