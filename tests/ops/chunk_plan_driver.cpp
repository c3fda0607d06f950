// Prints csrc/cuda/chunk_plan.h's launches for tests/ops/test_chunk_plan.py.  Input on stdin, one size
// list per line: "<chunk> <max tensors> <max blocks> <numel> <numel> ...".  Output per list:
//   list <index>
//   slot <s> <tensor>          (tensor t enters slot s of the launch being filled)
//   block <b> <s> <chunk>      (block b of that launch takes chunk c of slot s's tensor)
//   launch <blocks>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/chunk_plan.h"

using megalite::cuda::ChunkLimits;
using megalite::cuda::kAdamChunks;
using megalite::cuda::plan_chunks;

int main() {
  std::printf("adam %lld %d %d\n", static_cast<long long>(kAdamChunks.chunk), kAdamChunks.max_tensors,
              kAdamChunks.max_blocks);
  std::string line;
  for (int index = 0; std::getline(std::cin, line); ++index) {
    std::istringstream fields(line);
    ChunkLimits limits{};
    fields >> limits.chunk >> limits.max_tensors >> limits.max_blocks;
    std::vector<int64_t> numels;
    for (long long n; fields >> n;) numels.push_back(n);
    std::printf("list %d\n", index);
    plan_chunks(
        numels.data(), static_cast<int64_t>(numels.size()), limits,
        [](int slot, int64_t t) { std::printf("slot %d %lld\n", slot, static_cast<long long>(t)); },
        [](int block, int slot, int64_t chunk) {
          std::printf("block %d %d %lld\n", block, slot, static_cast<long long>(chunk));
        },
        [](int blocks) { std::printf("launch %d\n", blocks); });
  }
  return 0;
}
