// The dtype rule every CPU kernel follows, and seqkern.registry.compute_dtype mirrors for the
// fakes and the other backends: float64 computes in float64; float32, bfloat16 and float16
// compute (and keep what they save for the backward) in float32, the reduced types being
// storage only.
#pragma once

#include <ATen/ATen.h>

namespace seqkern::cpu {

// `who` names the op family in the error for any other dtype.
inline at::ScalarType compute_type(at::ScalarType st, const char* who) {
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
              who, " supports float32, float64, bfloat16 and float16, got ", st);
  return at::isReducedFloatingType(st) ? at::kFloat : st;
}

}  // namespace seqkern::cpu
