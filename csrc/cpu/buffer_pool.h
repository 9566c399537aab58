// A caching pool for the CPU backend's large output buffers, handed to torch as DLPack tensors.
//
// Why: torch's CPU allocator returns large blocks to the operating system when they are freed,
// so every training step's activations (gates, states, gx, dgx: 64 MB each for an LSTM layer
// with H=512, B=32, T=256) are fresh pages again, and the kernels' first writes fault them in
// one 4 KB page at a time. On a 2-core AVX-512 x86-64 with 2 threads, that layer's forward with
// saved activations took 93 ms on fresh buffers and 58 ms on reused ones (the product alone,
// 53 ms). Asking for transparent huge pages instead was no cure: 91 ms at 1 thread but 163 ms at
// 2 threads (the second thread waits at the per-step barrier while the first zeroes 2 MB).
// As CUDA's caching allocator does, freed blocks are kept (up to a byte limit) and handed out
// again for a request of the same size or up to half as large.
//
// Blocks are whole multiples of 64 KB, 4 KB-aligned. The pool is thread-safe (torch may free a
// tensor on any thread) and never destroyed, so tensors that outlive the module at interpreter
// exit still find it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>

namespace rnnkern_cpu {

class BufferPool {
 public:
  static constexpr size_t kGranule = size_t(1) << 16;

  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed (see above)
    return *pool;
  }

  static size_t size_class(size_t bytes) { return (bytes + kGranule - 1) / kGranule * kGranule; }

  // A block of at least `bytes` bytes and its capacity (nullptr if out of memory). Best fit
  // among cached blocks of up to twice the size, so that batches of varying sequence length
  // (a different size every step) still reuse the pages of earlier, longer ones.
  void* acquire(size_t bytes, size_t* capacity) {
    const size_t size = size_class(bytes ? bytes : 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= 2 * size) {
        void* p = it->second;
        *capacity = it->first;
        cached_ -= it->first;
        free_.erase(it);
        ++hits_;
        return p;
      }
      ++misses_;
    }
    *capacity = size;
    return std::aligned_alloc(4096, size);
  }

  // Return a block of `capacity` bytes (as acquire reported it). Past the limit the largest
  // cached blocks are freed first, which keeps the pool's many small blocks.
  void release(void* p, size_t capacity) {
    std::multimap<size_t, void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (capacity > limit_) {
        evicted.emplace(capacity, p);
      } else {
        free_.emplace(capacity, p);
        cached_ += capacity;
        while (cached_ > limit_) {
          auto last = std::prev(free_.end());
          cached_ -= last->first;
          evicted.insert(*last);
          free_.erase(last);
        }
      }
    }
    for (auto& kv : evicted) std::free(kv.second);
  }

  // Free every cached block.
  void trim() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& kv : blocks) std::free(kv.second);
  }

  void set_limit(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes;
      if (cached_ <= limit_) return;
    }
    trim();
  }

  struct Info {
    size_t cached, limit;
    uint64_t hits, misses;
  };
  Info info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, limit_, hits_, misses_};
  }

 private:
  BufferPool() = default;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size class -> block
  size_t cached_ = 0;
  size_t limit_ = size_t(1) << 30;  // bytes of freed blocks kept; set by rnnkern/backends/cpu.py
  uint64_t hits_ = 0, misses_ = 0;
};

}  // namespace rnnkern_cpu
