// Why this exists. A freshly allocated large tensor is mapped one page fault at a time, and the
// kernel zeroes every page before handing it over. For a kernel that streams at memory speed
// (depthwise conv, the conv/WaveNet outputs and gradients) that costs as much as the work
// itself: measured on a 2-vCPU Sapphire Rapids VM, writing a fresh 64 MB tensor ran at
// 2.6 GB/s against 15.7 GB/s into memory already mapped. glibc returns such blocks to the OS
// on free (they are above its mmap threshold), so every step of a training loop pays again.
//
// Two remedies, both what allocators such as jemalloc or PyTorch's CUDA caching allocator do:
// blocks are backed by transparent huge pages (512x fewer faults), and freed blocks are kept
// in a bounded cache and handed out again for a request of the same rounded size.
// SEQKERN_ALLOC_CACHE_MB sets the bound (default 1024; 0 disables the cache).
#include "cpu/large_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <string>

namespace seqkern::cpu {
namespace {

constexpr size_t kPage = size_t(2) << 20;
// Below this at::empty serves. Measured on a Xeon with AMX (2 threads, min of medians over
// alternated processes, cache on → off): T = 100, I = H = 256 LSTM B = 8 2.84 → 2.96 ms,
// B = 32 9.96 → 10.66, GRU 2.18 → 2.27, 7.40 → 8.11; T = 500 B = 16 I = 64 H = 128 LSTM
// 6.15 → 6.65, GRU 4.70 → 5.39: their 1-8 MB buffers (input projections, outputs) were mapped
// afresh on some calls (glibc's mmap threshold moves with what was freed before), and a bf16
// LSTM at B = 8 on the fp32 loop took 4.3-5.3 ms in some processes against 2.5. (Those with
// 2 MiB blocks throughout; with the 64 KB grain below, a later run: LSTM 3.13 → 3.30,
// 11.10 → 12.79, 6.72 → 8.33; GRU 2.34 → 2.51, 8.04 → 8.24, 5.20 → 5.27.)
constexpr int64_t kMinBytes = int64_t(1) << 20;
// From here blocks are whole 2 MiB pages; below, 64 KB multiples of plain pages, so that a
// 1.1 MB tensor holds 1.125 MB, not 2.
constexpr size_t kHugeBytes = size_t(8) << 20, kSmallGrain = size_t(64) << 10;

size_t cache_limit() {
  static const size_t limit = [] {
    const char* s = std::getenv("SEQKERN_ALLOC_CACHE_MB");
    long mb = 1024;
    if (s && *s) {
      char* end = nullptr;
      const long v = std::strtol(s, &end, 10);
      if (end && *end == '\0' && v >= 0) mb = v;
    }
    return size_t(mb) << 20;
  }();
  return limit;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class BlockCache {
 public:
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    cached_ -= bytes;
    return p;
  }
  // Keeps the block if it fits under the bound, else frees it.
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= cache_limit()) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }
  void release() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& [bytes, p] : blocks) std::free(p);
  }
  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

// Leaked on purpose: tensors may be freed during interpreter shutdown, after static
// destructors would have run.
BlockCache& cache() {
  static BlockCache* c = new BlockCache();
  return *c;
}

class LargeBlockAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &release, cpu};
    const bool huge = n >= kHugeBytes;
    const size_t grain = huge ? kPage : kSmallGrain;
    const size_t bytes = (n + grain - 1) / grain * grain;
    void* p = cache().take(bytes);
    if (!p) {
      if (posix_memalign(&p, huge ? kPage : 4096, bytes) != 0) throw std::bad_alloc();
      if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advisory: without THP it is plain memory
    }
    return {p, new Block{p, bytes}, &release, cpu};
  }
  static void release(void* ctx) {
    if (!ctx) return;
    auto* b = static_cast<Block*>(ctx);
    cache().give(b->ptr, b->bytes);
    delete b;
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // ctx != data
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (bytes < kMinBytes) return at::empty(sizes, options);
  static LargeBlockAllocator alloc;
  return at::detail::empty_generic(sizes, &alloc, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), c10::nullopt);
}

at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType ct) {
  // (a negative-bit view holds -x in memory: copied, which materialises it, even when dense)
  if (!t.defined() || (t.scalar_type() == ct && t.is_contiguous() && !t.is_neg())) return t;
  at::Tensor out = empty_large(t.sizes(), t.options().dtype(ct));
  const auto strides = t.strides();
  if (t.numel() > 0 && std::all_of(strides.begin(), strides.end(), [](int64_t v) { return v == 0; })) {
    out.fill_(t.reshape(-1)[0].item());  // a broadcast scalar: copy_ would crawl through it
  } else {
    // (resolved first: torch 2.13's copy_ from a float16 negative-bit tensor into float32
    // drops the bit)
    out.copy_(t.is_neg() ? t.resolve_neg() : t);
  }
  return out;
}

int64_t large_alloc_cached_bytes() { return int64_t(cache().cached()); }
void large_alloc_release_cache() { cache().release(); }

}  // namespace seqkern::cpu
