// The multi-tensor apply's bookkeeping (csrc/cuda/adam.cu) as plain host C++: which tensor each
// launch slot holds and which chunk each block of a launch takes.  No CUDA headers, so that
// tests/ops/test_chunk_plan.py compiles it with the host compiler and checks, on the CPU, the launches
// that the block limit and the tensor limit cut (a tensor carried over into the next launch, a tensor
// ending exactly at a limit, both limits at once) for thousands of size lists.
#pragma once

#include <cstdint>

namespace megalite::cuda {

struct ChunkLimits {
  int64_t chunk;     // elements per block
  int max_tensors;   // tensor slots in one launch's argument
  int max_blocks;    // chunks (blocks) in one launch
};

// Adam's: 24 tensor slots keep the five-list argument under the 4 KiB kernel-argument limit.
constexpr ChunkLimits kAdamChunks{65536, 24, 320};

// Walks numels[0..count) (empty tensors skipped) and calls
//   slot(s, t)       tensor t now occupies slot s of the launch being filled,
//   block(b, s, c)   block b of that launch takes chunk c of the tensor in slot s,
//   launch(blocks)   the launch is full (or the walk ended) with `blocks` blocks.
// After a launch the slots start again from 0; a tensor whose chunks did not all fit is carried over
// into slot 0 of the next launch (slot(0, t) is called again) and continues at its next chunk.
template <typename Slot, typename Block, typename Launch>
void plan_chunks(const int64_t* numels, int64_t count, const ChunkLimits& limits, const Slot& slot,
                 const Block& block, const Launch& launch) {
  int tensors = 0, blocks = 0;
  for (int64_t t = 0; t < count; ++t) {
    if (numels[t] <= 0) continue;
    slot(tensors, t);
    ++tensors;
    const int64_t chunks = (numels[t] + limits.chunk - 1) / limits.chunk;
    for (int64_t c = 0; c < chunks; ++c) {
      block(blocks, tensors - 1, c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == limits.max_blocks || (tensors == limits.max_tensors && last_chunk)) {
        launch(blocks);
        blocks = 0;
        tensors = 0;
        if (!last_chunk) {   // the current tensor continues in the next launch, in slot 0
          slot(0, t);
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(blocks);
}

}  // namespace megalite::cuda
