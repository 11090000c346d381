// Why this exists. A freshly allocated large tensor is mapped one page fault at a time, and the
// kernel zeroes every page before handing it over. For a kernel that streams at memory speed
// (depthwise conv, the conv/WaveNet outputs and gradients) that costs as much as the work
// itself: measured on a 2-vCPU Sapphire Rapids VM, writing a fresh 64 MB tensor ran at
// 2.6 GB/s against 15.7 GB/s into memory already mapped. glibc returns such blocks to the OS
// on free (they are above its mmap threshold), so every step of a training loop pays again.
//
// Two remedies, both what allocators such as jemalloc or PyTorch's CUDA caching allocator do:
// blocks of 8 MiB and more are backed by transparent huge pages (512x fewer faults), and freed
// blocks are kept in a bounded cache and handed out again for a request of about their size.
// SEQKERN_ALLOC_CACHE_MB sets the bound (default 1024; 0 disables the cache).
#include "cpu/large_alloc.h"

#include "cpu/vec_math.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <list>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

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

// Freed blocks by size, reused best-fit (the smallest block at least as large, if at most a
// quarter larger: a variable-length batch asks for a slightly different size each call) and
// evicted oldest first when a new block would pass the bound, so the cache follows the current
// workload instead of filling with one-off sizes and then refusing everything.
class BlockCache {
 public:
  // A cached block for `bytes` and its actual size, or {nullptr, 0}.
  std::pair<void*, size_t> take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = by_size_.lower_bound(bytes);
    if (it == by_size_.end() || it->first > bytes + bytes / 4) return {nullptr, 0};
    const auto entry = it->second;
    const std::pair<void*, size_t> got{entry->ptr, entry->bytes};
    by_size_.erase(it);
    age_.erase(entry);
    cached_ -= got.second;
    return got;
  }
  // Keeps the block, evicting the oldest ones as needed to stay under the bound.
  void give(void* p, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes > cache_limit()) {
        evicted.push_back(p);
      } else {
        while (cached_ + bytes > cache_limit()) {
          const auto oldest = age_.begin();
          auto range = by_size_.equal_range(oldest->bytes);
          for (auto it = range.first; it != range.second; ++it)
            if (it->second == oldest) {
              by_size_.erase(it);
              break;
            }
          cached_ -= oldest->bytes;
          evicted.push_back(oldest->ptr);
          age_.erase(oldest);
        }
        age_.push_back(Block{p, bytes});
        by_size_.emplace(bytes, std::prev(age_.end()));
        cached_ += bytes;
      }
    }
    for (void* q : evicted) std::free(q);
  }
  void release() {
    std::list<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(age_);
      by_size_.clear();
      cached_ = 0;
    }
    for (auto& b : blocks) std::free(b.ptr);
  }
  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }
  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

 private:
  std::mutex mu_;
  std::list<Block> age_;  // oldest first
  std::multimap<size_t, std::list<Block>::iterator> by_size_;
  size_t cached_ = 0;
};

// Leaked on purpose: tensors may be freed during interpreter shutdown, after static
// destructors would have run.
BlockCache* the_cache = nullptr;
BlockCache& cache() {
  static BlockCache* c = [] {
    the_cache = new BlockCache();
    // Only the forking thread lives on in a child: had another thread held the lock at the
    // fork, the child's first large allocation or free would wait for it forever (a
    // multiprocessing or DataLoader worker forked while seqkern ran in another thread). So
    // the fork waits for the lock, and both sides release it, as glibc's malloc does.
    pthread_atfork([] { the_cache->lock(); }, [] { the_cache->unlock(); },
                   [] { the_cache->unlock(); });
    return the_cache;
  }();
  return *c;
}

class LargeBlockAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &release, cpu};
    // (every block of 8 MiB or more is huge-page backed: what rounds up to 8 MiB counts as huge)
    const bool huge = n > kHugeBytes - kSmallGrain;
    const size_t grain = huge ? kPage : kSmallGrain;
    size_t bytes = (n + grain - 1) / grain * grain;
    auto [p, got] = cache().take(bytes);
    if (p) {
      bytes = got;
    } else {
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
  // Dense float32 ↔ bfloat16, the conversions around every bf16 kernel: one pass of whole
  // vectors, rounding with vcvtne2ps2bf16 where the CPU has it. torch's copy_ runs 8 values at
  // a time with a software rounding (a 13 MB float32 gate gradient took 1.2 ms to round inside
  // an LSTM backward, 0.35 on its own).
  const bool f2b = t.scalar_type() == at::kFloat && ct == at::kBFloat16;
  const bool b2f = t.scalar_type() == at::kBFloat16 && ct == at::kFloat;
  if ((f2b || b2f) && t.is_contiguous() && !t.is_neg() && !t.is_conj()) {
    const int64_t n = t.numel();
    constexpr int64_t kGrain = int64_t(1) << 15;  // values per task at least
    if (f2b) {
      const float* src = t.data_ptr<float>();
      c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { round_to_bf16(src + b, dst + b, e - b); });
    } else {
      const c10::BFloat16* src = t.data_ptr<c10::BFloat16>();
      float* dst = out.data_ptr<float>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { widen_row(src + b, dst + b, e - b); });
    }
    return out;
  }
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
void large_alloc_hold_lock(double seconds) {
  cache().lock();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  cache().unlock();
}

}  // namespace seqkern::cpu
