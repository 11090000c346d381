// Output buffers for the memory-bound kernels: 2 MiB-page backed, with a bounded cache of
// freed blocks so that a training loop does not pay the kernel's page zeroing on every step.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace seqkern::cpu {

// An uninitialised tensor; small sizes come from at::empty, large ones from the block cache.
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes currently held by the cache (freed blocks kept for reuse), and a way to give them back.
int64_t large_alloc_cached_bytes();
void large_alloc_release_cache();

}  // namespace seqkern::cpu
