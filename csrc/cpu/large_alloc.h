// Output buffers for the memory-bound kernels (from 1 MB; 2 MiB-page backed from 8 MB), with a
// bounded cache of freed blocks so that a training loop does not pay the kernel's page zeroing
// on every step.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

namespace seqkern::cpu {

// An uninitialised tensor; small sizes come from at::empty, large ones from the block cache.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// t in dtype ct and contiguous: t itself when it already is, else a copy into empty_large
// memory. torch's .to()/.contiguous() map their result one page fault at a time: converting a
// (2, 16, 4104, 64) bf16 tensor to float32 took 9.5 ms that way, 1.1 ms into mapped memory.
// Incoming gradients are often expanded (the gradient of y.sum()): a broadcast scalar is
// filled, not copied element by element. A negative-bit view (z.conj().imag: memory holding
// -t) is always copied, which materialises it: the kernels read raw memory.
at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType ct);

// Allocator for per-thread scratch that kernels read and write in whole vectors: on 64-byte
// boundaries, where std::vector's buffers start 16 bytes into a line (malloc's alignment), so
// every 512-bit load and store of them spans two cache lines.
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = (std::max<size_t>(n, 1) * sizeof(T) + 63) / 64 * 64;
    if (void* p = std::aligned_alloc(64, bytes)) return static_cast<T*>(p);
    throw std::bad_alloc();
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const LineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAllocator<U>&) const { return false; }
};
template <typename T>
using LineVector = std::vector<T, LineAllocator<T>>;

// Bytes currently held by the cache (freed blocks kept for reuse), and a way to give them back.
int64_t large_alloc_cached_bytes();
void large_alloc_release_cache();
// Holds the cache's lock for `seconds` (tests: a fork while another thread holds it).
void large_alloc_hold_lock(double seconds);

}  // namespace seqkern::cpu
