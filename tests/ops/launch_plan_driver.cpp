// Prints csrc/cuda/launch_plan.h's decisions for tests/ops/test_launch_plan.py, one per line:
//   shared <arch> <rms> <pack width> <cols> <cached shape> <fits> <needs opt-in> <dynamic bytes> <threads> <packs/thread>
//   splits <rows> <cols> <splits>
//   grid <arch> <rows> <fits>
//   blocks <rows> <sm count> <blocks per sm> <threads> <blocks> <max blocks>
//   stride <work> <threads> <cap> <blocks>
// argv[1]: the cached backward kernel's static shared bytes.  The limits per architecture are
// argv[2...] as name:default:optin:grid_x:grid_y.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

#include "cuda/launch_plan.h"

using namespace megalite::cuda;

namespace {

void print_shared(const char* arch, const DeviceLimits& limits, int64_t static_bytes) {
  for (int rms = 0; rms < 2; ++rms) {
    for (int width : {4, 8}) {
      for (int64_t cols = 1; cols <= 16384; ++cols) {
        const SharedPlan plan = cached_backward_shared(cols, rms != 0, static_bytes, limits);
        const CachedLayout layout = cached_layout(cols, width);
        std::printf("shared %s %d %d %lld %d %d %d %lld %d %d\n", arch, rms, width, static_cast<long long>(cols),
                    cached_shape(cols, width) ? 1 : 0, plan.fits ? 1 : 0, plan.needs_optin ? 1 : 0,
                    static_cast<long long>(plan.dynamic_bytes), layout.threads, layout.packs_per_thread);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t static_bytes = std::atoll(argv[1]);
  for (int a = 2; a < argc; ++a) {
    char name[64];
    long long shared = 0, optin = 0, grid_x = 0, grid_y = 0;
    if (std::sscanf(argv[a], "%63[^:]:%lld:%lld:%lld:%lld", name, &shared, &optin, &grid_x, &grid_y) != 5) return 2;
    const DeviceLimits limits{shared, optin, grid_x, grid_y};
    print_shared(name, limits, static_bytes);
    for (int64_t rows : {int64_t{1}, int64_t{grid_x}, int64_t{grid_x} + 1}) {
      std::printf("grid %s %lld %d\n", name, static_cast<long long>(rows), rows_fit_grid(rows, limits) ? 1 : 0);
    }
  }
  for (int64_t rows : {0, 1, 7, 8, 9, 100, 4096, 1000000}) {
    for (int64_t cols : {0, 1, 31, 32, 33, 1024, 6144, 16384, 1000000}) {
      std::printf("splits %lld %lld %lld\n", static_cast<long long>(rows), static_cast<long long>(cols),
                  static_cast<long long>(column_reduction_splits(rows, cols)));
    }
  }
  for (int64_t rows : {1, 100, 528, 100000}) {
    for (int per_sm : {0, 1, 3, 16}) {
      for (int threads : {32, 128, 512}) {
        std::printf("blocks %lld 132 %d %d %lld %lld\n", static_cast<long long>(rows), per_sm, threads,
                    static_cast<long long>(cached_backward_blocks(rows, 132, per_sm, threads)),
                    static_cast<long long>(cached_max_blocks(rows, 132, threads)));
      }
    }
  }
  for (int64_t work : {int64_t{0}, int64_t{1}, int64_t{256}, int64_t{257}, int64_t{1} << 40}) {
    std::printf("stride %lld 256 524280 %lld\n", static_cast<long long>(work),
                static_cast<long long>(grid_stride_blocks(work, 256, 524280)));
  }
  return 0;
}
