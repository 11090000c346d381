// The math every CPU kernel shares: vectorised gate nonlinearities and the online-softmax
// update. One copy here, so a fix to (say) sigmoid's overflow behaviour reaches every family.
#pragma once
#include "isa.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>

// Forces inlining of the small vector functions the kernels' inner loops call: an out-of-line
// call passes each Vectorized (a 64-byte class) through memory, and the gate epilogues of the
// recurrent loops measured ~2x slower when GCC declined to inline them.
#define SEQKERN_INLINE inline __attribute__((always_inline))

namespace seqkern::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// x, made opaque to the compiler so that it stays in a register. GCC folds a vector loaded
// once and used by several FMAs into each FMA as a memory operand (a tile of MR rows then loads
// every weight vector MR times); on Zen 4, whose 512-bit loads issue at one per cycle, the
// recurrent loops' tiles became load-bound at about half the FMA rate.
template <typename T>
SEQKERN_INLINE Vec<T> in_register(Vec<T> x) {
  // ("v": any vector register the build may use)
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) { __m512 r = x; asm("" : "+v"(r)); return Vec<T>(r); }
  if constexpr (std::is_same_v<T, double>) { __m512d r = x; asm("" : "+v"(r)); return Vec<T>(r); }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) { __m256 r = x; asm("" : "+v"(r)); return Vec<T>(r); }
  if constexpr (std::is_same_v<T, double>) { __m256d r = x; asm("" : "+v"(r)); return Vec<T>(r); }
#endif
  return x;
}

// max(a, b) and min(a, b) in one instruction each, where at::vec::maximum/minimum spend four on
// NaN propagation. When either operand is NaN the result is b (the x86 rule), so a caller that
// must keep NaN puts the data second: a clamp, or a running maximum of scores.
SEQKERN_INLINE Vec<float> max_no_nan(const Vec<float>& a, const Vec<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec<float>(_mm512_max_ps(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec<float>(_mm256_max_ps(a, b));
#else
  return at::vec::maximum(a, b);
#endif
}

SEQKERN_INLINE Vec<float> min_no_nan(const Vec<float>& a, const Vec<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec<float>(_mm512_min_ps(a, b));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec<float>(_mm256_min_ps(a, b));
#else
  return at::vec::minimum(a, b);
#endif
}

// The sum and the largest (NaN propagating) of a vector's lanes.
template <typename T>
SEQKERN_INLINE T reduce_sum(const Vec<T>& x) {
  // (double: at::vec's generic reduction goes lane by lane through memory, and in the float64
  // cells' row products it took ~20 times their multiply-adds: 117 µs a step, 15 in float32)
  if constexpr (std::is_same_v<T, double>) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_reduce_add_pd(x);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256d v = x;
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
#endif
  }
  return at::vec::vec_reduce_all<T>([](Vec<T> a, Vec<T> b) { return a + b; }, x);
}
template <typename T>
SEQKERN_INLINE T reduce_max(const Vec<T>& x) {
  return at::vec::vec_reduce_all<T>([](Vec<T> a, Vec<T> b) { return at::vec::maximum(a, b); }, x);
}

// exp for float vectors to about 2 ulp, inlined. Sleef's expf (Vectorized::exp) is as accurate
// but is an out-of-line call that spills the caller's registers, and the gate epilogues of the
// recurrent kernels call it several times per tile; Vectorized::exp_u20 is inline but 20 ulp,
// which a recurrence amplifies step after step. Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2,
// then the degree-7 Taylor polynomial of e^r (truncation below 1e-8 relative) and a 2^n scale.
SEQKERN_INLINE Vec<float> exp_accurate(Vec<float> x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using V = Vec<float>;
  // Clamped so that 2^n stays a normal float; x second, so a NaN passes through.
  x = min_no_nan(V(88.3f), max_no_nan(V(-87.3f), x));
  const V n = (x * V(1.4426950408889634f)).round();
  V r = at::vec::fmadd(n, V(-0.693359375f), x);  // ln2 split so that n·hi is exact
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p(1.0f / 5040.0f);
  p = at::vec::fmadd(p, r, V(1.0f / 720.0f));
  p = at::vec::fmadd(p, r, V(1.0f / 120.0f));
  p = at::vec::fmadd(p, r, V(1.0f / 24.0f));
  p = at::vec::fmadd(p, r, V(1.0f / 6.0f));
  p = at::vec::fmadd(p, r, V(0.5f));
  p = at::vec::fmadd(p, r, V(1.0f));
  p = at::vec::fmadd(p, r, V(1.0f));
#if defined(CPU_CAPABILITY_AVX512)
  return V(_mm512_scalef_ps(p, n));
#else
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                          _mm256_set1_epi32(127)), 23);
  return p * V(_mm256_castsi256_ps(bits));
#endif
#else
  return x.exp();
#endif
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^y for softmax weights (y ≤ 0 but for a few units of slack; -inf and y < -125 give 0, NaN
// stays NaN). Taking the exponent in base 2 lets the caller fold log2(e) into the factor it
// already multiplies the scores by, and needs no Cody–Waite reduction: f = y − round(y) is
// exact, so the error is the degree-6 Taylor polynomial's of 2^f, |f| ≤ 1/2 (1.2e-7 relative),
// and the rounding of y itself, |y|·2⁻²⁴ (at most 3e-8 of the largest weight, absolute). About
// 10 instructions against exp_u20's 17: the softmax of the attention kernels is bound by them.
// Weights below 2^-125 are zeroed rather than scaled: a result that underflows to a subnormal
// (or to 0 from -inf, every masked score) takes a microcode assist of ~100 cycles on Intel
// cores (measured: causal fp32 attention at L = 256 ran 1.6× slower with vscalefps underflowing).
// kForBf16: weights that go on in bf16 (8 significant bits) take a degree-4 minimax polynomial
// instead (2.6e-6 relative, three orders under bf16's rounding), two FMAs fewer on the ports the
// bf16 softmax is bound by.
template <bool kForBf16 = false>
SEQKERN_INLINE Vec<float> exp2_weights(Vec<float> y) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using V = Vec<float>;
  constexpr float c1 = kLn2, c2 = c1 * kLn2 / 2, c3 = c2 * kLn2 / 3, c4 = c3 * kLn2 / 4,
                  c5 = c4 * kLn2 / 5, c6 = c5 * kLn2 / 6;
  constexpr float lowest = -125.0f;
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 keep = _mm512_cmp_ps_mask(y, V(lowest), _CMP_NLT_UQ);  // NaN kept
  y = max_no_nan(V(lowest), y);  // y second, so NaN passes
#else
  const V zero_below = y < V(lowest);
  y = min_no_nan(V(127.0f), max_no_nan(V(lowest), y));
#endif
  const V n = y.round();
  const V f = y - n;
  V p;
  if constexpr (kForBf16) {
    p = V(0.009570069f);
    p = at::vec::fmadd(p, f, V(0.055917807f));
    p = at::vec::fmadd(p, f, V(0.24024744f));
    p = at::vec::fmadd(p, f, V(0.69312185f));
    p = at::vec::fmadd(p, f, V(0.99999928f));
  } else {
    p = V(c6);
    p = at::vec::fmadd(p, f, V(c5));
    p = at::vec::fmadd(p, f, V(c4));
    p = at::vec::fmadd(p, f, V(c3));
    p = at::vec::fmadd(p, f, V(c2));
    p = at::vec::fmadd(p, f, V(c1));
    p = at::vec::fmadd(p, f, V(1.0f));
  }
#if defined(CPU_CAPABILITY_AVX512)
  return V(_mm512_maskz_scalef_ps(keep, p, n));
#else
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                          _mm256_set1_epi32(127)), 23);
  return V::blendv(p * V(_mm256_castsi256_ps(bits)), V(0.0f), zero_below);
#endif
#else
  return (y * Vec<float>(kLn2)).exp();
#endif
}

// Two float vectors rounded to bf16 (nearest even) and stored as 2·W consecutive values, the
// first c of them. With AVX512_BF16 one instruction converts both.
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// The c ≤ 32 values of lo, hi rounded by vcvtne2ps2bf16, which reads subnormal inputs as zero.
SEQKERN_INLINE void store_bf16_pair_hw(const Vec<float>& lo, const Vec<float>& hi,
                                       c10::BFloat16* p, int64_t c) {
  const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  if (c == 32) _mm512_storeu_si512(p, v);
  else _mm512_mask_storeu_epi16(p, (__mmask32)((uint64_t(1) << c) - 1), v);
}
#endif
SEQKERN_INLINE void store_bf16_pair(const Vec<float>& lo, const Vec<float>& hi, c10::BFloat16* p,
                                    int64_t c) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  // torch's .to() (and c10's rounding) keep subnormals as bf16 subnormals, which the hardware
  // conversion flushes: vectors holding one take the software rounding (a review showed a bf16
  // RNN's bias gradient, ~1e-38, wrong where torch's was right).
  if (_kor_mask16(_mm512_fpclass_ps_mask(lo, 0x20), _mm512_fpclass_ps_mask(hi, 0x20)) == 0)
    return store_bf16_pair_hw(lo, hi, p, c);
#endif
  const auto pb = at::vec::convert_from_float<c10::BFloat16>(lo, hi);
  if (c == 2 * Vec<float>::size()) pb.store(p);
  else pb.store(p, c);
}

// a / b for the gate functions, where b ≥ 1. A 512-bit division issues once per ~10 cycles and
// sits on the dependency chain of every gate, so with AVX-512 it is the 14-bit reciprocal
// estimate refined by one Newton step (relative error ~2⁻²⁸ before rounding, ≤ 1 ulp more
// than a true division).
template <typename T>
SEQKERN_INLINE Vec<T> gate_div(const Vec<T>& a, const Vec<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const Vec<float> r0(_mm512_rcp14_ps(b));
    const Vec<float> r = at::vec::fmadd(at::vec::fnmadd(b, r0, Vec<float>(1.0f)), r0, r0);
    return a * r;
  }
#endif
  return a / b;
}

// σ(x) = 1 / (1 + e^{-x}). Below x = -88.3, where exp_accurate clamps (e^{-x} would overflow),
// σ is 0: the clamped quotient, ~4.5e-39, times a huge x made silu(-3e38) = -1.35 (torch: -0).
template <typename T>
SEQKERN_INLINE Vec<T> sigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  if constexpr (std::is_same_v<T, float>) {
    const Vec<float> q = gate_div(one, one + exp_accurate(x.neg()));
#if defined(CPU_CAPABILITY_AVX512)
    // (mask registers: at::vec's compare and blendv go through a vector mask, three
    // instructions for one, in the gate epilogues of every recurrent step)
    return Vec<float>(_mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(x, Vec<float>(-88.3f), _CMP_LT_OQ), q));
#else
    return Vec<float>::blendv(q, Vec<float>(0.0f), x < Vec<float>(-88.3f));
#endif
  } else {
    return one / (one + x.neg().exp());
  }
}

// tanh|x| = (1 − e)/(1 + e), e = exp(−2|x|), which has no cancellation for |x| ≥ 1/4 (e ≤ 0.61);
// below that the odd Taylor series to x⁹ (truncation ~2e-9 relative). double uses Sleef.
template <typename T>
SEQKERN_INLINE Vec<T> tanh(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    using V = Vec<float>;
    const V one(1.0f);
    const V ax = x.abs();
    const V e = exp_accurate(ax * V(-2.0f));
    const V big = gate_div(one - e, one + e);
    const V x2 = x * x;
    V q(62.0f / 2835.0f);
    q = at::vec::fmadd(q, x2, V(-17.0f / 315.0f));
    q = at::vec::fmadd(q, x2, V(2.0f / 15.0f));
    q = at::vec::fmadd(q, x2, V(-1.0f / 3.0f));
    const V small = at::vec::fmadd(q * x2, ax, ax);
#if defined(CPU_CAPABILITY_AVX512)
    // tanh|x| ≥ 0 takes x's sign bit (tanh(−0) = −0, as torch's)
    const V t(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(ax, V(0.25f), _CMP_LT_OQ), big, small));
    return V(_mm512_or_ps(t, _mm512_and_ps(x, V(-0.0f))));
#else
    const V t = V::blendv(big, small, ax < V(0.25f));
    return V::blendv(t, t.neg(), x < V(0.0f));
#endif
  } else {
    return x.tanh();
  }
}

template <typename T>
SEQKERN_INLINE Vec<T> relu(const Vec<T>& x) {
  return at::vec::maximum(x, Vec<T>(T(0)));
}

// x·σ(x)
template <typename T>
SEQKERN_INLINE Vec<T> silu(const Vec<T>& x) {
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
SEQKERN_INLINE Vec<T> load(const T* p, int64_t count) {
  return count == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, count);
}

// count bfloat16 or float16 values widened to a float vector (lanes past count are zero), so
// kernels can read 16-bit storage directly and compute in fp32.
template <typename R>
SEQKERN_INLINE Vec<float> load_widened(const R* p, int64_t count) {
  if (count == Vec<float>::size()) {
    Vec<float> out;
    at::vec::load_to_float(p, out);
    return out;
  }
  return std::get<0>(at::vec::convert_to_float<R>(at::vec::Vectorized<R>::loadu(p, count)));
}
inline Vec<float> load(const c10::BFloat16* p, int64_t count) { return load_widened(p, count); }
inline Vec<float> load(const c10::Half* p, int64_t count) { return load_widened(p, count); }

template <typename T>
SEQKERN_INLINE void store(const Vec<T>& v, T* p, int64_t count) {
  if (count == Vec<T>::size()) v.store(p);
  else v.store(p, count);
}

// count floats rounded to bf16 or fp16 (nearest even) and stored: kernels that compute in fp32
// write 16-bit storage directly.
SEQKERN_INLINE void store(const Vec<float>& v, c10::BFloat16* p, int64_t count) {
  store_bf16_pair(v, Vec<float>(0.0f), p, count);
}
// store_bf16_pair for operands of bf16 tile products (AMX, vdpbf16ps), which read subnormal
// bf16 inputs as zero: rounding a subnormal exactly would change nothing, so the hardware
// conversion (which flushes them) serves without the per-vector subnormal test, which sat on
// the softmax's critical path.
SEQKERN_INLINE void store_bf16_operand_pair(const Vec<float>& lo, const Vec<float>& hi,
                                            c10::BFloat16* p, int64_t c) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  store_bf16_pair_hw(lo, hi, p, c);
#else
  store_bf16_pair(lo, hi, p, c);
#endif
}
// n floats rounded to bf16 (nearest even) into dst, 2·W at a time. at::vec::convert rounds 32
// at a time in software and the rest one by one through c10::convert, and the recurrent loops
// convert a vector of units (n ≤ 16) per call: all of it went the scalar way. kOperand: for
// operands of bf16 tile products only (see store_bf16_operand_pair).
template <bool kOperand = false>
SEQKERN_INLINE void round_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  constexpr int64_t W = Vec<float>::size();
  for (int64_t j = 0; j < n; j += 2 * W) {
    const int64_t c = std::min<int64_t>(2 * W, n - j);
    const Vec<float> lo = load(src + j, std::min<int64_t>(W, c));
    const Vec<float> hi = c <= W ? Vec<float>(0.0f) : load(src + j + W, c - W);
    if constexpr (kOperand) store_bf16_operand_pair(lo, hi, dst + j, c);
    else store_bf16_pair(lo, hi, dst + j, c);
  }
}
// n values of S as T (bf16/fp16 widened to float, or copied), a vector at a time.
template <typename T, typename S>
SEQKERN_INLINE void widen_row(const S* src, T* dst, int64_t n) {
  for_each_vec<T>(n, [&](int64_t j, int64_t c) { store(load(src + j, c), dst + j, c); });
}
SEQKERN_INLINE void store(const Vec<float>& v, c10::Half* p, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (count == 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  else _mm256_mask_storeu_epi16(p, (__mmask16)((1u << count) - 1), h);
#else
  const auto h = at::vec::convert_from_float<c10::Half>(v, Vec<float>(0.0f));
  h.store(p, count);
#endif
}

// Whether p[0:n) are all finite (x − x is 0 for a finite x, NaN for ±inf and NaN).
template <typename T>
inline bool all_finite(const T* p, int64_t n) {
  Vec<T> acc(T(0));
  int64_t i = 0;
  for (; i + Vec<T>::size() <= n; i += Vec<T>::size()) {
    const Vec<T> x = Vec<T>::loadu(p + i);
    acc = acc + (x - x);
  }
  T s = reduce_sum(acc);
  for (; i < n; ++i) s += p[i] - p[i];
  return s == T(0);
}
// (bf16: no exponent of all ones)
inline bool all_finite(const c10::BFloat16* p, int64_t n) {
  const auto* u = reinterpret_cast<const uint16_t*>(p);
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i e = _mm512_set1_epi16(0x7F80);
  for (; i + 32 <= n; i += 32) {
    const __m512i x = _mm512_and_si512(_mm512_loadu_si512(u + i), e);
    if (_mm512_cmpeq_epi16_mask(x, e)) return false;
  }
#endif
  for (; i < n; ++i)
    if ((u[i] & 0x7F80) == 0x7F80) return false;
  return true;
}

// out[0:n] += w · src[0:n]
template <typename T>
inline void axpy(T* out, const T* src, int64_t n, T w) {
  const Vec<T> vw(w);
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    store(at::vec::fmadd(vw, load(src + j, c), load(out + j, c)), out + j, c);
  });
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
