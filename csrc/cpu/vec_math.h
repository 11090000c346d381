// The math every CPU kernel shares: vectorised gate nonlinearities and the online-softmax
// update. One copy here, so a fix to (say) sigmoid's overflow behaviour reaches every family.
#pragma once
#include "isa.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace seqkern::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// σ(x) = 1 / (1 + e^{-x}); e^{-x} overflows to +inf for x < -88 (float), giving exactly 0.
template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}

// tanh through one expm1: tanh|x| = (1 − e)/(1 + e), e = exp(−2|x|), sign restored after.
// Sleef's tanhf (what Vectorized<float>::tanh calls) costs several times an expm1f and
// dominated the LSTM step. double keeps Sleef's tanh.
template <typename T>
inline Vec<T> tanh(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    // expm1 rather than exp keeps 1 − e free of cancellation for small |x|.
    auto em = (x.abs() * Vec<T>(-2.0f)).expm1();  // e − 1, in (−1, 0]
    auto t = em.neg() / (em + Vec<T>(2.0f));
    return Vec<T>::blendv(t, t.neg(), x < Vec<T>(0.0f));
  } else {
    return x.tanh();
  }
}

template <typename T>
inline Vec<T> relu(const Vec<T>& x) {
  return at::vec::maximum(x, Vec<T>(T(0)));
}

// x·σ(x)
template <typename T>
inline Vec<T> silu(const Vec<T>& x) {
  return x * sigmoid(x);
}

// Applies `f(offset, count)` over [0, n) in vector-width chunks; the last chunk is partial, so
// kernels load/store with Vec::loadu(p, count) / store(p, count) and need no scalar tail.
template <typename T, typename F>
inline void for_each_vec(int64_t n, F&& f) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) f(j, W);
  if (j < n) f(j, n - j);
}

template <typename T>
inline Vec<T> load(const T* p, int64_t count) {
  return count == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, count);
}

template <typename T>
inline void store(const Vec<T>& v, T* p, int64_t count) {
  if (count == Vec<T>::size()) v.store(p);
  else v.store(p, count);
}

// Running state of a softmax computed one block of scores at a time (flash attention): after
// all blocks, softmax(s)·V = acc / sum, and log-sum-exp = max + log(sum).
template <typename T>
struct OnlineSoftmax {
  T max = -std::numeric_limits<T>::infinity();
  T sum = T(0);

  // Folds in a block whose largest score is `block_max`; returns the factor by which the
  // previous accumulator must be rescaled (0 when everything so far was masked).
  T update_max(T block_max) {
    if (block_max <= max) return T(1);
    T scale = max == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(max - block_max);
    sum *= scale;
    max = block_max;
    return scale;
  }

  // log-sum-exp of everything seen; -inf for a row that saw no allowed key.
  T logsumexp() const {
    return sum > T(0) ? max + std::log(sum) : -std::numeric_limits<T>::infinity();
  }
};

// OnlineSoftmax for Vec<T>::size() independent rows at once (one per lane), for kernels that
// hold scores transposed (keys × queries) and so reduce down columns without horizontal ops.
template <typename T>
struct OnlineSoftmaxLanes {
  Vec<T> max{-std::numeric_limits<T>::infinity()};
  Vec<T> sum{T(0)};

  // Folds in a block whose per-lane largest score is `block_max`. Returns the factor for the
  // previous accumulators (0 where nothing was seen yet) and sets `shift` to the value to
  // subtract before exp: the new max, or 0 in lanes still all -inf, so exp(-inf - shift) = 0
  // instead of NaN.
  Vec<T> update_max(const Vec<T>& block_max, Vec<T>& shift) {
    const Vec<T> ninf(-std::numeric_limits<T>::infinity());
    const Vec<T> new_max = at::vec::maximum(max, block_max);
    shift = Vec<T>::blendv(new_max, Vec<T>(T(0)), new_max == ninf);
    const Vec<T> scale = (max - shift).exp();
    max = new_max;
    sum = sum * scale;
    return scale;
  }
};

}  // namespace seqkern::cpu
