// Attention for at most kDecodeRowsMax queries (a generated token, a speculative verify step,
// a small prefill chunk) against a long cache: each query's scores are dot products along D,
// row by row, and the cache is streamed once.
#include "cpu/attention_common.h"

namespace seqkern::cpu::attn {

// ---- decoding: one query row against a long cache, memory bound ----------------------------
//
// A score per key is a dot product along D: one horizontal sum per key, whose shuffles and
// latency cost more than streaming the key (measured: the per-key loop read a 4096-token fp32
// cache at 12 GB/s, a bf16 one at 9, against 16-18 for a plain sum over the same bytes). So the
// scores of 16 keys are accumulated as 16 vectors and summed across lanes together, in a tree
// of 15 adds, and P·V keeps its accumulators in registers.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kBlockedDecode = true;
constexpr int64_t kDecodeKeys = 16;

// Lane j of the result: the sum of the lanes of a[j].
SEQKERN_INLINE __m512 sum_lanes_16(const __m512 (&a)[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: key 2i in quarters 0-1, key 2i+1 in 2-3
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // quarter r: 4 partial sums of key 4i + r
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // quarter r: pairs of keys 8i + r and 8i + 4 + r
    d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]),
                         _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
  const __m512 e = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]))));
  // lane 4r + t now holds key r + 4t
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

// q·k_j for the 16 keys k_j = k + j·ldk.
template <typename S>
SEQKERN_INLINE Vec<float> dot_16_keys(const float* q, const S* k, int64_t ldk, int64_t D) {
  __m512 a[16];
  for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
  for_each_vec<float>(D, [&](int64_t c, int64_t n) {
    const Vec<float> qv = load(q + c, n);
    for (int j = 0; j < 16; ++j) a[j] = at::vec::fmadd(qv, load(k + j * ldk + c, n), Vec<float>(a[j]));
  });
  return Vec<float>(sum_lanes_16(a));
}

// q0·k_j (lanes 0–7) and q1·k_j (lanes 8–15) for the 8 keys k_j = k + j·ldk: each key is loaded
// (and, from bf16, widened) once for two query rows. Every score gets the FMA sequence and
// the lane-sum tree dot_16_keys gives it, so the two agree to the bit.
template <typename S>
SEQKERN_INLINE __m512 dot_8_keys_2_rows(const float* q0, const float* q1, const S* k, int64_t ldk,
                                        int64_t D) {
  __m512 a[16];
  for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
  for_each_vec<float>(D, [&](int64_t c, int64_t n) {
    const Vec<float> x0 = load(q0 + c, n), x1 = load(q1 + c, n);
    for (int j = 0; j < 8; ++j) {
      const Vec<float> kj = load(k + j * ldk + c, n);
      a[j] = at::vec::fmadd(x0, kj, Vec<float>(a[j]));
      a[8 + j] = at::vec::fmadd(x1, kj, Vec<float>(a[8 + j]));
    }
  });
  return sum_lanes_16(a);
}

// The 16-key blocks of two rows at once: row 0's scores of the block, and row 1's in *second.
template <typename S>
SEQKERN_INLINE Vec<float> dot_16_keys_2_rows(const float* q0, const float* q1, const S* k,
                                             int64_t ldk, int64_t D, Vec<float>* second) {
  const __m512 h0 = dot_8_keys_2_rows(q0, q1, k, ldk, D);
  const __m512 h1 = dot_8_keys_2_rows(q0, q1, k + 8 * ldk, ldk, D);
  *second = Vec<float>(_mm512_shuffle_f32x4(h0, h1, 0xEE));
  return Vec<float>(_mm512_shuffle_f32x4(h0, h1, 0x44));
}

#if defined(__AVX512BF16__)
// A query row as bf16 pairs for vdpbf16ps, when it holds bf16 numbers (a bf16 query, or the
// gradient of a bf16 output, widened to fp32 for the kernels): q·k over a bf16 cache then takes
// one instruction per 32 values, two exact products per lane, and no widening of k (which cost
// a shuffle and a shift per 16 values: the bf16 decode read its cache at 44 GB/s against 54 for
// a plain sum). Not for other rows (a value would be rounded).
constexpr bool kBf16Dot = true;
constexpr int64_t kBf16DotMaxD = 256;
struct Bf16Query {
  __m512i v[kBf16DotMaxD / 32];
  __mmask32 tail;  // the valid lanes of the last vector
  int nv = 0;      // 0: not usable
};
inline Bf16Query bf16_query(const float* q, int64_t D) {
  Bf16Query out;
  if (D > kBf16DotMaxD || D == 0) return out;
  const int nv = static_cast<int>((D + 31) / 32);
  __mmask16 inexact = 0;
  for (int c = 0; c < nv; ++c) {
    const int64_t lo_n = std::clamp<int64_t>(D - c * 32, 0, 16), hi_n = std::clamp<int64_t>(D - c * 32 - 16, 0, 16);
    const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lo_n) - 1), q + c * 32);
    const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << hi_n) - 1), q + c * 32 + 16);
    const __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    // exact iff widening back gives the same floats
    const __m512 lo_back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(pairs)), 16));
    const __m512 hi_back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(pairs, 1)), 16));
    inexact |= _mm512_cmp_ps_mask(lo, lo_back, _CMP_NEQ_UQ) | _mm512_cmp_ps_mask(hi, hi_back, _CMP_NEQ_UQ);
    out.v[c] = pairs;
  }
  if (inexact) return out;
  const int64_t last = D - (nv - 1) * 32;
  out.tail = last == 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << last) - 1);
  out.nv = nv;
  return out;
}

// q·k_j for the 16 keys k_j = k + j·ldk, as dot_16_keys with the products on vdpbf16ps.
SEQKERN_INLINE Vec<float> dot_16_keys_bf16(const Bf16Query& q, const at::BFloat16* k, int64_t ldk) {
  __m512 a[16];
  for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
  for (int c = 0; c < q.nv; ++c) {
    const __mmask32 m = c + 1 == q.nv ? q.tail : ~__mmask32(0);
    const __m512bh qv = (__m512bh)q.v[c];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j)
      a[j] = _mm512_dpbf16_ps(a[j], qv, (__m512bh)_mm512_maskz_loadu_epi16(m, k + j * ldk + c * 32));
  }
  return Vec<float>(sum_lanes_16(a));
}

// The pair form of dot_16_keys_bf16, as dot_16_keys_2_rows is of dot_16_keys: each score gets
// the one-row form's instructions and lane-sum tree, so the two agree to the bit.
SEQKERN_INLINE Vec<float> dot_16_keys_2_rows_bf16(const Bf16Query& q0, const Bf16Query& q1,
                                                  const at::BFloat16* k, int64_t ldk, Vec<float>* second) {
  __m512 h[2];
  for (int half = 0; half < 2; ++half) {
    __m512 a[16];
    for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
    const at::BFloat16* kh = k + half * 8 * ldk;
    for (int c = 0; c < q0.nv; ++c) {
      const __mmask32 m = c + 1 == q0.nv ? q0.tail : ~__mmask32(0);
      const __m512bh x0 = (__m512bh)q0.v[c], x1 = (__m512bh)q1.v[c];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512bh kj = (__m512bh)_mm512_maskz_loadu_epi16(m, kh + j * ldk + c * 32);
        a[j] = _mm512_dpbf16_ps(a[j], x0, kj);
        a[8 + j] = _mm512_dpbf16_ps(a[8 + j], x1, kj);
      }
    }
    h[half] = sum_lanes_16(a);
  }
  *second = Vec<float>(_mm512_shuffle_f32x4(h[0], h[1], 0xEE));
  return Vec<float>(_mm512_shuffle_f32x4(h[0], h[1], 0x44));
}
#endif  // __AVX512BF16__
#else
constexpr bool kBlockedDecode = false;
constexpr int64_t kDecodeKeys = 1;
template <typename S>
Vec<float> dot_16_keys(const float*, const S*, int64_t, int64_t) { return Vec<float>(0.0f); }
template <typename S>
Vec<float> dot_16_keys_2_rows(const float*, const float*, const S*, int64_t, int64_t, Vec<float>*) {
  return Vec<float>(0.0f);
}
#endif
#if !(defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__))
constexpr bool kBf16Dot = false;
struct Bf16Query {
  int nv = 0;
};
inline Bf16Query bf16_query(const float*, int64_t) { return {}; }
inline Vec<float> dot_16_keys_bf16(const Bf16Query&, const at::BFloat16*, int64_t) { return Vec<float>(0.0f); }
inline Vec<float> dot_16_keys_2_rows_bf16(const Bf16Query&, const Bf16Query&, const at::BFloat16*, int64_t,
                                          Vec<float>*) {
  return Vec<float>(0.0f);
}
#endif

// acc[0 .. Dv) = Σ_j p[j] · v_j for the nk rows v_j = v + j·ldv, the accumulators of each block
// of NV vectors in registers, in two sets (even and odd keys) so that the FMA latency is hidden
// at small Dv. With skip_zero, rows of weight 0 (masked out or dropped) are not read: a
// preallocated cache may hold anything, NaN included, where the mask rules it out. Without a
// mask every row in the span is read, so a weight that underflows to 0 meets its V row as in a
// matrix product (torch's too): 0·inf gives NaN.
template <int NV, bool FULL, bool SKIP_ZERO, typename T, typename S>
void weighted_rows_sum_block(const T* p, int64_t nk, const S* v, int64_t ldv, int64_t c0,
                             int64_t Dv, T* acc) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  // FULL: all NV vectors lie inside Dv. Partial loads (a run-time count), the accumulators
  // passed by reference to a helper, or a branch around each key's FMAs (skipping zero
  // weights) made GCC keep them on the stack, a load and a store around every FMA: an 8-query
  // fp32 forward against 1024 cached keys took 54 µs that way, 37 without (torch: 34).
  auto row = [&](int64_t j, int u) __attribute__((always_inline)) {
    return block_vector<FULL, T>(v + j * ldv, c0, u, Dv);
  };
  auto live = [&](int u) { return FULL || c0 + u * W < Dv; };
  V a0[NV], a1[NV];
#pragma GCC unroll 8
  for (int u = 0; u < NV; ++u) a0[u] = a1[u] = V(T(0));
  // keys j[t] (t < n) with weights p[j[t]], even t into a0 and odd into a1
  auto sum_keys = [&](auto key, int64_t n) __attribute__((always_inline)) {
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) {
      const int64_t j0 = key(t), j1 = key(t + 1);
      const V p0(p[j0]), p1(p[j1]);
#pragma GCC unroll 8
      for (int u = 0; u < NV; ++u)
        if (live(u)) {
          a0[u] = at::vec::fmadd(p0, row(j0, u), a0[u]);
          a1[u] = at::vec::fmadd(p1, row(j1, u), a1[u]);
        }
    }
    if (t < n) {
      const int64_t j0 = key(t);
      const V p0(p[j0]);
#pragma GCC unroll 8
      for (int u = 0; u < NV; ++u)
        if (live(u)) a0[u] = at::vec::fmadd(p0, row(j0, u), a0[u]);
    }
  };
  if constexpr (!SKIP_ZERO) {
    sum_keys([](int64_t t) { return t; }, nk);
  } else {
    // the keys of non-zero weight, a block at a time, then summed without branches
    constexpr int64_t kBlock = 64;
    int32_t keys[kBlock + 16];
    for (int64_t j0 = 0; j0 < nk; j0 += kBlock) {
      const int64_t n = std::min(kBlock, nk - j0);
      int64_t m = 0, t = 0;
#if defined(CPU_CAPABILITY_AVX512)
      // 16 weights per compare, their keys compressed into place: key by key this listing was
      // a quarter of an 8-query fp32 forward under a bool mask
      if constexpr (std::is_same_v<T, float>) {
        __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j0)),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        for (; t + 16 <= n; t += 16) {
          const __mmask16 nz = _mm512_cmp_ps_mask(_mm512_loadu_ps(p + j0 + t), _mm512_setzero_ps(), _CMP_NEQ_UQ);
          _mm512_storeu_si512(keys + m, _mm512_maskz_compress_epi32(nz, idx));
          m += __builtin_popcount(nz);
          idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
        }
      }
#endif
      for (; t < n; ++t) {
        keys[m] = static_cast<int32_t>(j0 + t);
        m += p[j0 + t] != T(0);
      }
      sum_keys([&](int64_t t) -> int64_t { return keys[t]; }, m);
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < NV; ++u) {
    const int64_t c = c0 + u * W;
    if (c < Dv) store(a0[u] + a1[u], acc + c, std::min<int64_t>(W, Dv - c));
  }
}

// The same for two rows of weights over keys starting at the same one: row r has n[r] keys,
// the first min(n) shared. Each shared V row is loaded (and widened from bf16) once for both,
// and each row's sum is added in exactly the one-row order (its own even and odd chains, by
// key offset), so the result does not depend on which rows a thread was given. Every weight
// is applied, zero or not: callers with masked weights use the one-row form, which skips them.
template <int NV, bool FULL, typename T, typename S>
void weighted_rows_sum_2_block(const T* const* p, const int64_t* n, const S* v, int64_t ldv,
                               int64_t c0, int64_t Dv, T* const* acc) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  auto row = [&](int64_t j, int u) __attribute__((always_inline)) {
    return block_vector<FULL, T>(v + j * ldv, c0, u, Dv);
  };
  auto live = [&](int u) { return FULL || c0 + u * W < Dv; };
  V a[2][2][NV];  // [row][even, odd key][vector]
#pragma GCC unroll 8
  for (int u = 0; u < NV; ++u) a[0][0][u] = a[0][1][u] = a[1][0][u] = a[1][1][u] = V(T(0));
  // (the parity is a compile-time index everywhere: a run-time one put the accumulators on
  // the stack)
  auto both = [&](int64_t j, auto E) __attribute__((always_inline)) {
    constexpr int e = decltype(E)::value;
    const V p0(p[0][j]), p1(p[1][j]);
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u)
      if (live(u)) {
        const V x = row(j, u);
        a[0][e][u] = at::vec::fmadd(p0, x, a[0][e][u]);
        a[1][e][u] = at::vec::fmadd(p1, x, a[1][e][u]);
      }
  };
  auto one = [&](int r, int64_t j, auto E) __attribute__((always_inline)) {
    constexpr int e = decltype(E)::value;
    const V pj(p[r][j]);
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u)
      if (live(u)) a[r][e][u] = at::vec::fmadd(pj, row(j, u), a[r][e][u]);
  };
  using Even = std::integral_constant<int, 0>;
  using Odd = std::integral_constant<int, 1>;
  const int64_t m = std::min(n[0], n[1]);
  int64_t j = 0;
  for (; j + 2 <= m; j += 2) {
    both(j, Even{});
    both(j + 1, Odd{});
  }
  if (j < m) both(j++, Even{});  // m odd: key m − 1 is even, each row's next is odd
  for (int r = 0; r < 2; ++r) {
    int64_t k = j;
    if (k < n[r] && (k & 1)) one(r, k++, Odd{});
    for (; k + 2 <= n[r]; k += 2) {
      one(r, k, Even{});
      one(r, k + 1, Odd{});
    }
    if (k < n[r]) one(r, k, Even{});
  }
  for (int r = 0; r < 2; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) {
      const int64_t c = c0 + u * W;
      if (c < Dv) {
        const int64_t w = std::min<int64_t>(W, Dv - c);
        store((a[r][0][u] + a[r][1][u]) + load(acc[r] + c, w), acc[r] + c, w);
      }
    }
}

// Two rows, head dims of any size: blocks of up to 4 accumulator vectors per row and parity.
template <typename T, typename S>
void weighted_rows_sum_2(const T* const* p, const int64_t* n, const S* v, int64_t ldv, int64_t Dv,
                         T* const* acc) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t c0 = 0; c0 < Dv; c0 += 4 * W) {
    const int64_t nv = std::min<int64_t>(4, (Dv - c0 + W - 1) / W);
    const bool full = c0 + nv * W <= Dv;
    auto run = [&](auto NVc) {
      constexpr int NV = decltype(NVc)::value;
      if (full) weighted_rows_sum_2_block<NV, true>(p, n, v, ldv, c0, Dv, acc);
      else weighted_rows_sum_2_block<NV, false>(p, n, v, ldv, c0, Dv, acc);
    };
    switch (nv) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      default: run(std::integral_constant<int, 4>{}); break;
    }
  }
}

template <int NV, typename T, typename S>
void weighted_rows_sum_nv(const T* p, int64_t nk, const S* v, int64_t ldv, int64_t c0,
                          int64_t Dv, bool skip_zero, T* acc) {
  const bool full = c0 + NV * Vec<T>::size() <= Dv;
  if (full && !skip_zero) weighted_rows_sum_block<NV, true, false>(p, nk, v, ldv, c0, Dv, acc);
  else if (full) weighted_rows_sum_block<NV, true, true>(p, nk, v, ldv, c0, Dv, acc);
  else if (!skip_zero) weighted_rows_sum_block<NV, false, false>(p, nk, v, ldv, c0, Dv, acc);
  else weighted_rows_sum_block<NV, false, true>(p, nk, v, ldv, c0, Dv, acc);
}

template <typename T, typename S>
void weighted_rows_sum(const T* p, int64_t nk, const S* v, int64_t ldv, int64_t Dv,
                       bool skip_zero, T* acc) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t c0 = 0; c0 < Dv; c0 += 8 * W) {
    const int64_t nv = std::min<int64_t>(8, (Dv - c0 + W - 1) / W);
    switch (nv) {  // the accumulators of up to 8 vectors, as many as the head dim needs
      case 1: weighted_rows_sum_nv<1>(p, nk, v, ldv, c0, Dv, skip_zero, acc); break;
      case 2: weighted_rows_sum_nv<2>(p, nk, v, ldv, c0, Dv, skip_zero, acc); break;
      case 3: weighted_rows_sum_nv<3>(p, nk, v, ldv, c0, Dv, skip_zero, acc); break;
      case 4: weighted_rows_sum_nv<4>(p, nk, v, ldv, c0, Dv, skip_zero, acc); break;
      case 5: weighted_rows_sum_nv<5>(p, nk, v, ldv, c0, Dv, skip_zero, acc); break;
      case 6: weighted_rows_sum_nv<6>(p, nk, v, ldv, c0, Dv, skip_zero, acc); break;
      case 7: weighted_rows_sum_nv<7>(p, nk, v, ldv, c0, Dv, skip_zero, acc); break;
      default: weighted_rows_sum_nv<8>(p, nk, v, ldv, c0, Dv, skip_zero, acc); break;
    }
  }
}

// 16 scores of consecutive keys from mask element `base` with the explicit mask applied as the
// per-key loop of decode_scores applies it: a bool mask's disallowed keys become −inf whatever
// their score (a preallocated cache may hold NaN there), an additive mask is added.
SEQKERN_INLINE Vec<float> explicit_mask_16(const Mask<float>& mask, int64_t base, Vec<float> sc) {
  alignas(64) float m[16];
#if defined(CPU_CAPABILITY_AVX512)
  if (mask.bmask && mask.sk == 1)
    return Vec<float>(_mm512_mask_blend_ps(static_cast<__mmask16>(allowed_bits(mask.bmask + base, 16)),
                                           Vec<float>(neg_inf<float>()), sc));
#endif
  if (mask.bmask) {
    for (int c = 0; c < 16; ++c) m[c] = mask.bmask[base + c * mask.sk] ? 1.0f : 0.0f;
    return Vec<float>::blendv(Vec<float>(neg_inf<float>()), sc, Vec<float>::loadu(m) == Vec<float>(1.0f));
  }
  if (mask.sk == 1) return add_mask(sc, Vec<float>::loadu(mask.amask + base));
  for (int c = 0; c < 16; ++c) m[c] = mask.amask[base + c * mask.sk];
  return add_mask(sc, Vec<float>::loadu(m));
}

// s[j − keys.lo] = scale·(q·k_j) for the keys of query i (then the explicit mask); returns their
// maximum; key j is row j of kbase. Shared by the decode forward and its backward, which must
// recompute the very same scores: exp(s − lse) are then the forward's weights to the last bit
// of s.
template <typename T, typename S>
T decode_scores(const T* q, const S* kbase, int64_t ldk, int64_t D, T scale, const Mask<T>& mask,
                int64_t b, int64_t h, int64_t i, Span keys, T* s) {
  using V = Vec<T>;
  T mx = neg_inf<T>();
  int64_t j = keys.lo;
  if constexpr (kBlockedDecode && std::is_same_v<T, float>) {
    V mxv(neg_inf<T>());
    Bf16Query qb;
    if constexpr (kBf16Dot && std::is_same_v<S, at::BFloat16>) qb = bf16_query(q, D);
    for (; j + kDecodeKeys <= keys.hi; j += kDecodeKeys) {
      V sc;
      if constexpr (kBf16Dot && std::is_same_v<S, at::BFloat16>)
        sc = qb.nv ? dot_16_keys_bf16(qb, kbase + j * ldk, ldk) : dot_16_keys(q, kbase + j * ldk, ldk, D);
      else
        sc = dot_16_keys(q, kbase + j * ldk, ldk, D);
      sc = sc * V(scale);
      if (mask.has_explicit()) sc = explicit_mask_16(mask, mask.at(b, h, i, j), sc);
      sc.store(s + (j - keys.lo));
      mxv = at::vec::maximum(mxv, sc);  // NaN-propagating: the max must not depend on how
                                        // the keys were split into blocks (paired rows)
    }
    mx = reduce_max<T>(mxv);
  }
  for (; j < keys.hi; ++j) {
    const S* kr = kbase + j * ldk;
    V a(T(0));
    for_each_vec<T>(D, [&](int64_t c, int64_t n) { a = at::vec::fmadd(load(q + c, n), load(kr + c, n), a); });
    T sc = reduce_sum<T>(a) * scale;
    if (mask.has_explicit()) {
      const int64_t idx = mask.at(b, h, i, j);
      if (mask.bmask) sc = mask.bmask[idx] ? sc : neg_inf<T>();
      else sc = add_mask(sc, mask.amask[idx]);
    }
    s[j - keys.lo] = sc;
    if (!(sc <= mx) && !std::isnan(mx)) mx = sc;  // a NaN score makes the max NaN, and the row
  }
  return mx;
}

// decode_scores for query rows i and i + 1 whose key spans start together: their common 16-key
// blocks two rows at a time (each key loaded once for both), the rest of each row by
// decode_scores. Both start their blocks at keys.lo, and the paired blocks sum and mask as the
// single ones do, so every score equals the one-row function's (the backward's) to the bit.
template <typename S>
std::pair<float, float> decode_scores_2_rows(const float* q0, const float* q1, const S* kbase,
                                             int64_t ldk, int64_t D, float scale,
                                             const Mask<float>& mask, int64_t b, int64_t h,
                                             int64_t i, Span keys0, Span keys1, float* s0,
                                             float* s1) {
  using V = Vec<float>;
  const int64_t lo = keys0.lo;
  // Each row's blocks as decode_scores computes them: with vdpbf16ps where its query allows
  // (bf16_query), so two rows of which only one does are not paired.
  Bf16Query qb0, qb1;
  if constexpr (kBf16Dot && std::is_same_v<S, at::BFloat16>) {
    qb0 = bf16_query(q0, D);
    qb1 = bf16_query(q1, D);
  }
  const bool bf16_dot = qb0.nv && qb1.nv;
  const int64_t nb = (qb0.nv != 0) == (qb1.nv != 0) ? std::min(keys0.hi, keys1.hi) - lo : 0;
  int64_t j = 0;
  V m0(neg_inf<float>()), m1(neg_inf<float>());
  for (; j + kDecodeKeys <= nb; j += kDecodeKeys) {
    V second;
    V a;
    if constexpr (kBf16Dot && std::is_same_v<S, at::BFloat16>)
      a = bf16_dot ? dot_16_keys_2_rows_bf16(qb0, qb1, kbase + (lo + j) * ldk, ldk, &second)
                   : dot_16_keys_2_rows(q0, q1, kbase + (lo + j) * ldk, ldk, D, &second);
    else
      a = dot_16_keys_2_rows(q0, q1, kbase + (lo + j) * ldk, ldk, D, &second);
    a = a * V(scale);
    V c = second * V(scale);
    if (mask.has_explicit()) {
      a = explicit_mask_16(mask, mask.at(b, h, i, lo + j), a);
      c = explicit_mask_16(mask, mask.at(b, h, i + 1, lo + j), c);
    }
    a.store(s0 + j);
    c.store(s1 + j);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, c);
  }
  auto vmax = [](V x) { return reduce_max<float>(x); };
  auto combined = [](float a, float r) { return std::isnan(a) || r <= a ? a : r; };
  const float r0 = decode_scores(q0, kbase, ldk, D, scale, mask, b, h, i, Span{lo + j, keys0.hi}, s0 + j);
  const float r1 = decode_scores(q1, kbase, ldk, D, scale, mask, b, h, i + 1, Span{lo + j, keys1.hi}, s1 + j);
  return {combined(vmax(m0), r0), combined(vmax(m1), r1)};
}

// Few query rows (decoding against a KV cache): the tiled kernel keeps W queries per vector and
// would use one lane of each; here a task is one query row, its scores are dot products along
// D and the P·V sum runs along Dv, both vectorised. Same outputs (O, log-sum-exp) as the tiled
// kernel; its backward is decode_backward_kernel, which recomputes the same scores. Decoding
// streams the whole cache once per token, so K and V are read in their storage type S (bf16
// caches are widened in registers, not copied).
template <typename T, typename S>
void decode_forward_kernel(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                           const at::Tensor& v_, T scale, const Mask<T>& mask,
                           const Dropout& drop, at::Tensor& out, at::Tensor& lse) {
  using V = Vec<T>;
  const Strides sq(q_), sk(k_), sv(v_);
  const T* Q = q_.data_ptr<T>();
  const S *K = k_.data_ptr<S>(), *Vp = v_.data_ptr<S>();
  S* O = out.data_ptr<S>();  // bf16 when the cache is: written in place
  double* LSE = lse.data_ptr<double>();
  const int64_t g = d.group();
  // A task is one (batch, head) and all its ≤ kDecodeRowsMax query rows: keys are visited in
  // chunks of KC (a multiple of 16, so decode_scores groups keys as one call over the whole
  // row would, and the backward recomputes identical scores), each chunk of K and V read from
  // memory once and then from L1 for the other rows. Row by row, each row streamed the whole
  // cache: 4 rows against 4096 fp32 keys, 16 heads, took 3.7× one row's time. With fewer
  // (batch, head) pairs than threads a task is one row, so that every thread has one; its keys
  // are still summed in chunks of KC, so the result does not depend on the thread count.
  const int64_t RG = d.B * d.Hq >= at::get_num_threads() ? d.Lq : 1;  // rows per task
  const int64_t groups = (d.Lq + RG - 1) / RG;
  const int64_t KC = d.Lq > 1 ? 128 : std::max<int64_t>(d.Lk, 1);
  // With a bf16 (or fp16) cache, pairs of rows share each key's load and widening, in their
  // scores and in P·V (where no explicit mask or dropout zeroes weights). Widening each chunk
  // into a buffer once for all rows, as before, cost about one row's work more. Measured, D = 64,
  // 2 threads, bf16 forward ms for 2 / 4 / 8 rows: B = 1, H = 4, 1024 keys (in L2) 0.071 /
  // 0.090 / 0.130 → 0.045 / 0.065 / 0.104; B = 2, H = 16, 4096 keys 1.56 / 2.22 → 0.95 / 1.60
  // at 2 / 4 rows. In fp32 the pairs were 5–15 % slower, L2-resident or not: the lane sums, not
  // the loads, bound that loop.
  constexpr bool pair_scores = kBlockedDecode && !std::is_same_v<S, T> && std::is_same_v<T, float>;
  const bool group_sums = !std::is_same_v<S, T> && !mask.has_explicit() && !drop.active;
  at::parallel_for(0, d.B * d.Hq * groups, 1, [&](int64_t begin, int64_t end) {
    LineVector<T> s(RG * d.Lk), acc(RG * d.Dv), part(d.Dv), keep(drop.active ? d.Lk : 0);
    LineVector<T> mx(RG), sum(RG);
    std::vector<Span> keys(RG);
    std::vector<int64_t> live(RG);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = task % groups * RG, h = (task / groups) % d.Hq, b = task / (groups * d.Hq);
      const int64_t R = std::min(RG, d.Lq - i0);  // rows i0 .. i0 + R − 1, local index i
      const S* kbase = K + sk.at(b, h / g);
      const S* vbase = Vp + sv.at(b, h / g);
      int64_t chunks = 0;
      for (int64_t i = 0; i < R; ++i) {
        keys[i] = mask.range(b, i0 + i);
        mx[i] = neg_inf<T>();
        if (!keys[i].empty()) chunks = std::max(chunks, (keys[i].hi - keys[i].lo + KC - 1) / KC);
      }
      // the chunk of row i: keys [keys.lo + c·KC, ...) of its own span
      auto chunk = [&](int64_t i, int64_t c) {
        const int64_t lo = keys[i].lo + c * KC;
        return Span{lo, std::min(lo + KC, keys[i].hi)};
      };
      auto take_max = [&](int64_t i, T m) {
        if (!std::isnan(mx[i]) && !(m <= mx[i])) mx[i] = m;  // a NaN max sticks: NaN output
      };
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t i = 0; i < R; ++i) {
          const Span ck = chunk(i, c);
          if (ck.empty()) continue;
          const T* q = Q + sq.at(b, h, i0 + i);
          T* out_s = s.data() + i * d.Lk + c * KC;
          if constexpr (pair_scores) {
            const Span ck1 = i + 1 < R ? chunk(i + 1, c) : Span{0, 0};
            if (!ck1.empty() && ck1.lo == ck.lo) {
              const auto [m0, m1] = decode_scores_2_rows(q, Q + sq.at(b, h, i0 + i + 1), kbase, sk.l, d.D, scale,
                                                         mask, b, h, i0 + i, ck, ck1, out_s, out_s + d.Lk);
              take_max(i, m0);
              take_max(i + 1, m1);
              ++i;
              continue;
            }
          }
          take_max(i, decode_scores(q, kbase, sk.l, d.D, scale, mask, b, h, i0 + i, ck, out_s));
        }
      }
      for (int64_t i = 0; i < R; ++i) {
        T* p = s.data() + i * d.Lk;
        if (keys[i].empty() || mx[i] == neg_inf<T>()) continue;  // no allowed key
        const int64_t nk = keys[i].hi - keys[i].lo;
        V sumv(T(0));
        for_each_vec<T>(nk, [&](int64_t j, int64_t n) {
          store(vexp(load(p + j, n) - V(mx[i])), p + j, n);
          sumv = sumv + load(p + j, n);  // reload: lanes past n are zero
        });
        sum[i] = reduce_sum<T>(sumv);
        if (drop.active) {
          keep_along_row(drop.row_key((b * d.Hq + h) * d.Lq + i0 + i), keys[i].lo, nk, drop.threshold, keep.data());
          for_each_vec<T>(nk, [&](int64_t j, int64_t n) { store(load(p + j, n) * load(keep.data() + j, n), p + j, n); });
        }
      }
      std::fill(acc.begin(), acc.end(), T(0));
      const bool skip = mask.has_explicit() || drop.active;
      for (int64_t c = 0; c < chunks; ++c) {
        int64_t n = 0;  // rows with keys in this chunk
        for (int64_t i = 0; i < R; ++i)
          if (!chunk(i, c).empty() && mx[i] != neg_inf<T>()) live[n++] = i;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t i = live[t];
          const Span ck = chunk(i, c);
          if (group_sums && t + 1 < n && chunk(live[t + 1], c).lo == ck.lo) {
            const int64_t i1 = live[++t];
            const T* pp[2] = {s.data() + i * d.Lk + c * KC, s.data() + i1 * d.Lk + c * KC};
            const int64_t nn[2] = {ck.hi - ck.lo, chunk(i1, c).hi - ck.lo};
            T* aa[2] = {acc.data() + i * d.Dv, acc.data() + i1 * d.Dv};
            weighted_rows_sum_2(pp, nn, vbase + ck.lo * sv.l, sv.l, d.Dv, aa);
            continue;
          }
          weighted_rows_sum(s.data() + i * d.Lk + c * KC, ck.hi - ck.lo, vbase + ck.lo * sv.l, sv.l, d.Dv, skip,
                            part.data());
          axpy(acc.data() + i * d.Dv, part.data(), d.Dv, T(1));
        }
      }
      for (int64_t i = 0; i < R; ++i) {
        S* o = O + ((b * d.Hq + h) * d.Lq + i0 + i) * d.Dv;
        double* l = LSE + (b * d.Hq + h) * d.Lq + i0 + i;
        if (keys[i].empty() || mx[i] == neg_inf<T>()) {  // no allowed key: zeros, not NaN
          std::fill(o, o + d.Dv, S(0));
          *l = neg_inf<double>();
          continue;
        }
        scaled_row_to(acc.data() + i * d.Dv, d.Dv, T(drop.keep_scale) / sum[i], o);
        *l = row_lse(mx[i], sum[i]);
      }
    }
  });
}
// ---- backward for few query rows (the decode forward's) -----------------------------------
//
// Where use_decode chose decode_forward_kernel for the forward, so does the
// recomputation here: the scores come from the same decode_scores, so exp(s − lse) are the
// forward's weights. The tiled backward would sum each score along D in one FMA chain, in
// another order than the forward did; with peaked scores that mismatch made dV 3-4× less
// accurate than torch's (which takes its math path at so few queries). Here every product runs
// along D or Dv, vectorised, and a tiled kernel's lanes for 16 query columns are not wasted on
// a few rows. A row's weights are all at hand before its dS, so Δ = Σ_j P_j·(dP ⊙ z)_j is
// summed from them rather than taken as dO·O: O was rounded to its storage type (bf16), and with
// a peaked row dS = P ⊙ (dP − Δ) is a small difference of near-equal terms that would keep that
// rounding. Tasks, outputs and conventions as backward_kernel; dK_j and dV_j are accumulated in
// place in the task's own rows. K and V are read in their storage type S, as the forward did.
template <typename T, typename S>
void decode_backward_kernel(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                            const at::Tensor& v_, const at::Tensor& do_, const at::Tensor& lse_,
                            const Mask<T>& mask, const Dropout& drop,
                            const MaskGrad<T>& mgrad, T scale, int64_t chunks, at::Tensor& dq,
                            at::Tensor& dk, at::Tensor& dv) {
  using V = Vec<T>;
  const Strides sq(q_), sk(k_), sv(v_), so(do_);
  const T *Q = q_.data_ptr<T>(), *DO = do_.data_ptr<T>();
  const S *K = k_.data_ptr<S>(), *Vp = v_.data_ptr<S>();
  const double* LSE = lse_.data_ptr<double>();
  T *DQ = dq.data_ptr<T>(), *DK = dk.data_ptr<T>(), *DV = dv.data_ptr<T>();
  const Mask<T> no_mask;  // dP = dO·Vᵀ: plain dot products

  // dK_j and dV_j get one read-modify-write per key for all the rows of a head (they took one
  // per row and key: at 8 rows against a 4096-token cache, 3 ms a row where the forward takes
  // 0.3), so a head's rows first compute their weights and dS into per-row buffers that are
  // zero outside the row's keys.
  const int64_t R = d.Lq;
  constexpr int64_t KC = 128;  // keys per chunk, a multiple of 16 as in the forward
  // bf16/fp16 caches: pairs of rows with the same first key share each key's load and widening
  // (decode_scores_2_rows gives each score the one-row function's bits)
  constexpr bool pair_rows = kBlockedDecode && !std::is_same_v<S, T> && std::is_same_v<T, float>;
  at::parallel_for(0, d.B * d.Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    LineVector<T> pbuf(R * d.Lk), dsbuf(R * d.Lk), keep(drop.active ? d.Lk : 0), qs(R * d.D), dq_row(d.D);
    std::vector<Span> spans(R);
    T* const mg = mgrad.data ? mgrad.target() : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, hk, h_begin, h_end, acc_row] = KvTask(d, chunks, task);
      const S* kbase = K + sk.at(b, hk);
      const S* vbase = Vp + sv.at(b, hk);
      T* dkb = DK + acc_row * d.Lk * d.D;
      T* dvb = DV + acc_row * d.Lk * d.Dv;
      std::fill(dkb, dkb + d.Lk * d.D, T(0));
      std::fill(dvb, dvb + d.Lk * d.Dv, T(0));
      for (int64_t h = h_begin; h < h_end; ++h) {
        Span all{d.Lk, 0};  // union of the rows' keys
        for (int64_t i = 0; i < R; ++i) {
          const int64_t row = (b * d.Hq + h) * d.Lq + i;
          spans[i] = mask.range(b, i);
          if (spans[i].empty() || LSE[row] == neg_inf<double>()) spans[i] = Span{0, 0};  // no weights: no gradient
          if (spans[i].empty()) continue;
          all.lo = std::min(all.lo, spans[i].lo);
          all.hi = std::max(all.hi, spans[i].hi);
        }
        if (all.empty()) continue;
        // the scores (q·k and dO·v) of every row, chunk by chunk, so each chunk of K and V is
        // read from memory once for all rows; chunks start at each row's first key, as in the
        // forward, so decode_scores groups the keys as it did there
        int64_t nchunks = 0;
        for (int64_t i = 0; i < R; ++i) {
          T* p = pbuf.data() + i * d.Lk;
          T* ds = dsbuf.data() + i * d.Lk;
          // zeros on the union outside the row's keys (all of it for a row without keys)
          const Span sp = spans[i].empty() ? Span{all.lo, all.lo} : spans[i];
          std::fill(p + all.lo, p + sp.lo, T(0));
          std::fill(ds + all.lo, ds + sp.lo, T(0));
          std::fill(p + sp.hi, p + all.hi, T(0));
          std::fill(ds + sp.hi, ds + all.hi, T(0));
          nchunks = std::max(nchunks, (sp.hi - sp.lo + KC - 1) / KC);
        }
        for (int64_t c = 0; c < nchunks; ++c)
          for (int64_t i = 0; i < R; ++i) {
            const int64_t lo = spans[i].lo + c * KC, hi = std::min(lo + KC, spans[i].hi);
            if (lo >= hi) continue;
            T* p = pbuf.data() + i * d.Lk + lo;
            T* ds = dsbuf.data() + i * d.Lk + lo;
            if constexpr (pair_rows) {  // as in the forward: one load of each key for two rows
              if (i + 1 < R && !spans[i + 1].empty() && spans[i + 1].lo == spans[i].lo && lo < spans[i + 1].hi) {
                const Span k0{lo, hi}, k1{lo, std::min(lo + KC, spans[i + 1].hi)};
                decode_scores_2_rows(Q + sq.at(b, h, i), Q + sq.at(b, h, i + 1), kbase, sk.l, d.D, scale,
                                     mask, b, h, i, k0, k1, p, p + d.Lk);
                decode_scores_2_rows(DO + so.at(b, h, i), DO + so.at(b, h, i + 1), vbase, sv.l, d.Dv, T(1),
                                     no_mask, b, h, i, k0, k1, ds, ds + d.Lk);
                ++i;
                continue;
              }
            }
            decode_scores(Q + sq.at(b, h, i), kbase, sk.l, d.D, scale, mask, b, h, i, Span{lo, hi}, p);
            decode_scores(DO + so.at(b, h, i), vbase, sv.l, d.Dv, T(1), no_mask, b, h, i, Span{lo, hi}, ds);
          }
        for (int64_t i = 0; i < R; ++i) {
          const int64_t row = (b * d.Hq + h) * d.Lq + i;
          const Span keys = spans[i];
          if (keys.empty()) continue;
          const int64_t nk = keys.hi - keys.lo;
          T* p = pbuf.data() + i * d.Lk + keys.lo;
          T* ds = dsbuf.data() + i * d.Lk + keys.lo;
          T hs, ls;
          split_lse(LSE[row], hs, ls);
          const V hi(hs), lo(ls);
          if (drop.active) keep_along_row(drop.row_key(row), keys.lo, nk, drop.threshold, keep.data());
          const V ks(T(drop.keep_scale));
          // P into p, dP ⊙ z into ds, and Δ; then dS = P ⊙ (dP ⊙ z − Δ) into ds and P ⊙ z into p
          V dsum(T(0));
          for_each_vec<T>(nk, [&](int64_t j, int64_t n) {
            // P = 0 where masked, also where dP is not finite (a masked cache row holding NaN),
            // and in lanes past the row, whose exp(0 − lse) may overflow (lse < −88: a row of
            // large negative additive masks) and would make Δ = inf·0
            V w = vexp(load(p + j, n) - hi - lo);
            if (n < V::size()) w = V::set(V(T(0)), w, n);
            V dpz = load(ds + j, n);
            if (drop.active) dpz = dpz * load(keep.data() + j, n) * ks;
            dpz = V::blendv(dpz, V(T(0)), w == V(T(0)));
            store(w, p + j, n);
            store(dpz, ds + j, n);
            dsum = at::vec::fmadd(w, dpz, dsum);
          });
          const V dlt(reduce_sum<T>(dsum));
          for_each_vec<T>(nk, [&](int64_t j, int64_t n) {
            const V w = load(p + j, n);
            store(w * (load(ds + j, n) - dlt), ds + j, n);
            if (drop.active) store(w * load(keep.data() + j, n) * ks, p + j, n);
          });
          if (mg) {
            T* g = mg + b * mgrad.sb + h * mgrad.sh + i * mgrad.sq;
            for (int64_t j = 0; j < nk; ++j) g[(keys.lo + j) * mgrad.sk] += ds[j];
          }
          scaled_row_to(Q + sq.at(b, h, i), d.D, scale, qs.data() + i * d.D);
        }
        // Chunk by chunk of keys: dQ_i += Σ_j dS_ij·k_j (·scale by the caller; the row is this
        // task's alone), dV_j += Σ_i (P ⊙ z)_ij·dO_i and dK_j += Σ_i dS_ij·(scale·q_i); weights
        // of 0 add nothing
        for (int64_t j0 = all.lo; j0 < all.hi; j0 += KC) {
          const int64_t j1 = std::min(j0 + KC, all.hi);
          for (int64_t i = 0; i < R; ++i) {
            const int64_t lo = std::max(j0, spans[i].lo), hi = std::min(j1, spans[i].hi);
            if (lo >= hi) continue;
            weighted_rows_sum(dsbuf.data() + i * d.Lk + lo, hi - lo, kbase + lo * sk.l, sk.l, d.D,
                              true, dq_row.data());
            axpy(DQ + ((b * d.Hq + h) * d.Lq + i) * d.D, dq_row.data(), d.D, T(1));
          }
          for (int64_t j = j0; j < j1; ++j) {
            T* dvr = dvb + j * d.Dv;
            T* dkr = dkb + j * d.D;
            for_each_vec<T>(d.Dv, [&](int64_t c, int64_t n) {
              V a = load(dvr + c, n);
              for (int64_t i = 0; i < R; ++i) {
                const T w = pbuf[i * d.Lk + j];
                if (w != T(0)) a = at::vec::fmadd(V(w), load(DO + so.at(b, h, i) + c, n), a);
              }
              store(a, dvr + c, n);
            });
            for_each_vec<T>(d.D, [&](int64_t c, int64_t n) {
              V a = load(dkr + c, n);
              for (int64_t i = 0; i < R; ++i) {
                const T w = dsbuf[i * d.Lk + j];
                if (w != T(0)) a = at::vec::fmadd(V(w), load(qs.data() + i * d.D + c, n), a);
              }
              store(a, dkr + c, n);
            });
          }
        }
      }
    }
  });
}

template void decode_forward_kernel<float, float>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, float, const Mask<float>&, const Dropout&, at::Tensor&, at::Tensor&);
template void decode_forward_kernel<float, c10::BFloat16>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, float, const Mask<float>&, const Dropout&, at::Tensor&, at::Tensor&);
template void decode_forward_kernel<float, c10::Half>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, float, const Mask<float>&, const Dropout&, at::Tensor&, at::Tensor&);
template void decode_forward_kernel<double, double>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const Mask<double>&, const Dropout&, at::Tensor&, at::Tensor&);
template void decode_backward_kernel<float, float>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Mask<float>&, const Dropout&, const MaskGrad<float>&, float, int64_t, at::Tensor&, at::Tensor&, at::Tensor&);
template void decode_backward_kernel<float, c10::BFloat16>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Mask<float>&, const Dropout&, const MaskGrad<float>&, float, int64_t, at::Tensor&, at::Tensor&, at::Tensor&);
template void decode_backward_kernel<float, c10::Half>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Mask<float>&, const Dropout&, const MaskGrad<float>&, float, int64_t, at::Tensor&, at::Tensor&, at::Tensor&);
template void decode_backward_kernel<double, double>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Mask<double>&, const Dropout&, const MaskGrad<double>&, double, int64_t, at::Tensor&, at::Tensor&, at::Tensor&);

}  // namespace seqkern::cpu::attn
