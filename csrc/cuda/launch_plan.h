// The CUDA launchers' capacity and grid decisions as plain arithmetic on a device's limits and the
// shape.  No CUDA headers: the launchers (norms.cu, norms_row_cached.cu, swiglu.cu) fill
// DeviceLimits from the runtime and call these, and tests/ops/test_launch_plan.py compiles this
// header with the host compiler to check every hidden size against each architecture's limits.
#pragma once

#include <cstdint>

namespace megalite::cuda {

struct DeviceLimits {
  int64_t shared_per_block;         // shared memory a block may use without opting in (48 KiB)
  int64_t shared_per_block_optin;   // with the opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin); no
                                    // smaller than shared_per_block, equal where there is none
  int64_t max_grid_x;               // cudaDevAttrMaxGridDimX (2^31 - 1)
  int64_t max_grid_y;               // cudaDevAttrMaxGridDimY (65535)
};

constexpr int64_t kMaxCachedCols = 8192;
constexpr int kCachedMaxThreads = 512;
constexpr int kGridWarp = 32;

// The register-cached kernels' block shape for a row of `cols` elements in packs of `pack_width`:
// each thread holds 1, 2 or 4 packs, and the block is whole warps.
struct CachedLayout {
  int packs_per_thread;
  int threads;
};

inline CachedLayout cached_layout(int64_t cols, int pack_width) {
  const int packs = static_cast<int>(cols / pack_width);
  int per_thread = 1;
  while (per_thread < 4 && packs > per_thread * kCachedMaxThreads) per_thread *= 2;
  const int threads = (packs + per_thread - 1) / per_thread;
  return {per_thread, (threads + kGridWarp - 1) / kGridWarp * kGridWarp};
}

// Whether a row's shape suits the register-cached kernels at all (pointer alignment aside).
inline bool cached_shape(int64_t cols, int pack_width) {
  return cols > 0 && cols <= kMaxCachedCols && cols % pack_width == 0;
}

// The cached backward's shared memory per block: its static arrays (block_sum2's, as
// cudaFuncGetAttributes reports them) plus the dynamic fp32 accumulators, one row of cols for
// dweight and (LayerNorm) one for dbias.  A launch whose total passes the default limit needs
// cudaFuncAttributeMaxDynamicSharedMemorySize set to the dynamic part first, and the total must stay
// within the opt-in limit; where it does not fit, the general kernels run instead.
struct SharedPlan {
  bool fits;
  bool needs_optin;
  int64_t dynamic_bytes;
};

inline SharedPlan cached_backward_shared(int64_t cols, bool rms, int64_t static_bytes, const DeviceLimits& limits) {
  const int64_t dynamic = (rms ? 1 : 2) * cols * static_cast<int64_t>(sizeof(float));
  const int64_t total = static_bytes + dynamic;
  return {total <= limits.shared_per_block_optin, total > limits.shared_per_block, dynamic};
}

// Blocks of the cached backward: what the occupancy calculator says is resident (at least one per
// SM), at most one per row, and at most cached_max_blocks (the workspace's rows).
inline int64_t cached_max_blocks(int64_t rows, int64_t sm_count, int threads) {
  const int64_t resident = sm_count * (2048 / threads);
  return rows < resident ? rows : resident;
}

inline int64_t cached_backward_blocks(int64_t rows, int64_t sm_count, int blocks_per_sm, int threads) {
  const int64_t occupied = sm_count * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  const int64_t bound = cached_max_blocks(rows, sm_count, threads);
  return occupied < bound ? occupied : bound;
}

// The general column reduction: 32-column tiles by row splits of 8 rows at a time.  Enough splits
// to fill the GPU (~1024 blocks with the column tiles), few enough that the final sum over splits
// stays short; 1 for an empty shape (nothing to split, and no division by zero columns).
constexpr int kTileCols = 32;
constexpr int kTileRows = 8;
constexpr int64_t kMaxSplits = 256;

inline int64_t column_reduction_splits(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return 1;
  const int64_t col_tiles = (cols + kTileCols - 1) / kTileCols;
  const int64_t wanted = (1024 + col_tiles - 1) / col_tiles;
  const int64_t max_by_rows = (rows + kTileRows - 1) / kTileRows;
  const int64_t splits = wanted < max_by_rows ? wanted : max_by_rows;
  return splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
}

// One block per row (the norms' forward and dx kernels) needs rows within the grid's x limit.
inline bool rows_fit_grid(int64_t rows, const DeviceLimits& limits) { return rows <= limits.max_grid_x; }

// A grid-stride loop's blocks over `work` items of `threads` each: at least one, at most `cap`.
inline int64_t grid_stride_blocks(int64_t work, int threads, int64_t cap) {
  const int64_t blocks = (work + threads - 1) / threads;
  return blocks < 1 ? 1 : (blocks > cap ? cap : blocks);
}

}  // namespace megalite::cuda
