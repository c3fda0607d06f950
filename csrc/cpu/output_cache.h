// Where the CPU norms' large outputs (y, dx) come from: a cache of 2 MiB-aligned, huge-page-advised
// blocks that are kept when their tensor dies and handed out again for the next output of the same
// rounded size -- what CUDA's caching allocator does for every GPU tensor.
//
// Why: a fresh multi-MiB malloc is a new mmap, and the first write to each 4 KiB page faults.  On
// the 2-core CI VM, writing a fresh 32 MiB buffer takes 21 ms with 4 KiB pages, 3 ms with 2 MiB
// pages (when the kernel has them free; when it must compact memory first, 20 ms again), and 1.7 ms
// for a buffer written before -- the norm kernel itself reads and writes 32 MiB in about that time.
// A training step asks for the same activation shapes every iteration, so after the first one every
// output is a cache hit.
//
// Outputs under kMinCachedBytes come from PyTorch's allocator (malloc reuses those without faults).
// The cache keeps at most limit() bytes of blocks no tensor uses: MEGALITE_CPU_OUTPUT_CACHE_MB at
// first use, else min(1 GiB, physical memory / 16); a block freed while the cache is full goes back
// to the system.  Blocks in use are not counted: they are ordinary tensor memory.  The storage keeps
// this allocator, so resize_() and clones work as for any CPU tensor.
//
// Only bindings.cpp includes this (it needs the torch headers).
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>

namespace megalite::cpu {
namespace {

struct OutputCacheStats {
  int64_t cached_bytes, cached_blocks, limit_bytes, hits, misses;
};

#if defined(__linux__)

class OutputCache final : public c10::Allocator {
 public:
  static constexpr size_t kBlock = size_t{2} << 20;            // one huge page
  static constexpr size_t kMinCachedBytes = size_t{4} << 20;   // rounding up wastes < 1/3 of the block

  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();   // never destroyed: tensors may die after exit begins
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kBlock - 1) / kBlock * kBlock;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.find(bytes);
      if (it != free_.end()) {   // a hit: one lock, no system call
        void* block = it->second;
        free_.erase(it);
        cached_bytes_ -= bytes;
        ++hits_;
        return track_locked(block, bytes);
      }
      ++misses_;
    }
    void* block = map_block(bytes);   // outside the lock: mapping can take a while
    std::lock_guard<std::mutex> lock(mutex_);
    return track_locked(block, bytes);
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  // Keep at most `bytes` of unused blocks; 0 turns caching off (and unmaps every unused block).
  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked();
  }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(free_.size()), static_cast<int64_t>(limit_),
            hits_, misses_};
  }

  at::Tensor empty_like(const at::Tensor& like) {
    return at::detail::empty_generic(like.sizes(), this, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     like.scalar_type(), c10::nullopt);
  }

 private:
  OutputCache() : limit_(default_limit()) {}

  static size_t default_limit() {
    if (const char* mb = std::getenv("MEGALITE_CPU_OUTPUT_CACHE_MB")) {
      char* end = nullptr;
      const unsigned long long value = std::strtoull(mb, &end, 10);
      TORCH_CHECK(end != mb && *end == '\0' && mb[0] != '-', "MEGALITE_CPU_OUTPUT_CACHE_MB='", mb,
                  "' is not a whole number of MiB; set e.g. 1024, or 0 to turn the norm output cache off");
      return static_cast<size_t>(value) << 20;
    }
    const size_t physical = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t gib = size_t{1} << 30;
    return physical / 16 < gib ? physical / 16 : gib;
  }

  // `bytes` (a multiple of kBlock) at a kBlock-aligned address: map one block more, unmap the ends.
  static void* map_block(size_t bytes) {
    void* raw = mmap(nullptr, bytes + kBlock, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      // Out of address space or memory: the same error PyTorch's allocator would give.
      TORCH_CHECK_WITH(OutOfMemoryError, false, "megalite: cannot map ", bytes, " bytes for a norm output");
    }
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kBlock - 1) / kBlock * kBlock;
    if (aligned > start) munmap(raw, aligned - start);
    const size_t tail = start + bytes + kBlock - (aligned + bytes);
    if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
    void* block = reinterpret_cast<void*>(aligned);
#if defined(MADV_HUGEPAGE)
    madvise(block, bytes, MADV_HUGEPAGE);   // a hint: where the kernel refuses, 4 KiB pages it is
#endif
    return block;
  }

  static void release(void* block) {
    OutputCache& cache = instance();
    std::lock_guard<std::mutex> lock(cache.mutex_);
    const auto it = cache.live_.find(block);
    const size_t bytes = it->second;
    cache.live_.erase(it);
    cache.free_.emplace(bytes, block);
    cache.cached_bytes_ += bytes;
    cache.trim_locked();
  }

  c10::DataPtr track_locked(void* block, size_t bytes) {
    live_[block] = bytes;
    return {block, block, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  // Unmap the largest unused blocks until the cache is within its limit.
  void trim_locked() {
    while (cached_bytes_ > limit_) {
      const auto largest = std::prev(free_.end());
      munmap(largest->second, largest->first);
      cached_bytes_ -= largest->first;
      free_.erase(largest);
    }
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;         // unused blocks by size
  std::unordered_map<void*, size_t> live_;    // blocks some tensor uses, and their sizes
  size_t cached_bytes_ = 0, limit_;
  int64_t hits_ = 0, misses_ = 0;
};

at::Tensor empty_output(const at::Tensor& like) { return OutputCache::instance().empty_like(like); }
void set_output_cache_limit(size_t bytes) { OutputCache::instance().set_limit(bytes); }
OutputCacheStats output_cache_stats() { return OutputCache::instance().stats(); }

#else   // no mmap: PyTorch's allocator, and an always-empty cache

at::Tensor empty_output(const at::Tensor& like) { return at::empty_like(like); }
void set_output_cache_limit(size_t) {}
OutputCacheStats output_cache_stats() { return {0, 0, 0, 0, 0}; }

#endif

}  // namespace
}  // namespace megalite::cpu
