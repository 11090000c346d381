// What the attention kernels share (csrc/cpu/attention*.cpp): problem dimensions and strides,
// masks and dropout, the register-blocked tile product, the online-softmax row helpers, the
// choice of kernel for a problem, and the kernels' signatures. The entry points that check
// inputs and pick a kernel are in attention.cpp; the kernels:
//   attention_flash.cpp       tiles in the compute type (float32, float64), forward and backward
//   attention_flash_bf16.cpp  bf16 tiles (AMX, or AVX512_BF16): forward, few-query forward, backward
//   attention_decode.cpp      row-wise kernels for at most 8 queries, forward and backward
#pragma once
#include "isa.h"

#include "bindings.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/gemm.h"
#include "cpu/large_alloc.h"
#include "cpu/transpose.h"
#include "cpu/vec_math.h"

namespace seqkern::cpu::attn {


constexpr int kMR = 6;  // rows per micro-tile: 6 rows × 4 vectors = 24 accumulator registers
constexpr int kNV = 4;
// Tiles: kBlockQ queries (whole vectors: the columns of Sᵀ) × kBlockK keys (whole kMR-row
// groups: the rows of Sᵀ).
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 96;
// The forward's key tiles: its 128 × 64 score tile and the 64 × D transposed queries just fill
// L1, and fewer tiles mean fewer online-softmax rescales of the accumulator. Measured, causal
// fp32, one thread, 128 against 96 keys: 2–5 % faster at (B, H, L, D) = (16, 8, 128, 64),
// (4, 4, 256, 64), (1, 8, 1024, 64), (1, 4, 2048, 128); the backward was within ±1 %.
constexpr int64_t kForwardBlockK = 128;
// Up to kDecodeRows query rows the row-wise decode kernels run; up to kDecodeRowsMax too, except
// for bf16 where bf16 tiles serve (see use_decode).
constexpr int64_t kDecodeRows = 4;
constexpr int64_t kDecodeRowsMax = 8;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ------------------------------------------------------------------ micro-kernel -----------

// The first n lanes of a vector, as Vectorized::loadu(p, n) / store(p, n) but by value: with
// those, GCC kept the accumulators of the partial one-vector kernels (tiles of a few queries)
// on the stack and stored them at every k step.
template <typename T>
SEQKERN_INLINE Vec<T> load_first(const T* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>)
    return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  else if constexpr (std::is_same_v<T, double>)
    return _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
#endif
  return Vec<T>::loadu(p, n);
}
template <typename T>
SEQKERN_INLINE void store_first(const Vec<T>& x, T* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>)
    return _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), x);
  else if constexpr (std::is_same_v<T, double>)
    return _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), x);
#endif
  x.store(p, n);
}

// C[MR × n] (+)= A[MR × K] · B[K × n], B row-major (ldb), A addressed as A[r·a_rs + k·a_ks] so a
// transposed A (Pᵀ, dSᵀ) costs nothing. n ≤ NV·W; FULL means n == NV·W.
template <typename T, int MR, int NV, bool FULL>
void micro_kernel(int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                  T* C, int64_t ldc, int64_t n, bool accumulate) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  int64_t cnt[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) cnt[v] = FULL ? W : std::min<int64_t>(W, n - v * W);
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (accumulate)
        acc[r][v] = FULL ? V::loadu(C + r * ldc + v * W) : load_first(C + r * ldc + v * W, cnt[v]);
      else
        acc[r][v] = V(T(0));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    const T* a = A + k * a_ks;
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      bv[v] = FULL ? V::loadu(b + v * W) : load_first(b + v * W, cnt[v]);
      if constexpr (MR > 1) bv[v] = in_register(bv[v]);  // (see in_register)
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V av(a[r * a_rs]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (FULL) acc[r][v].store(C + r * ldc + v * W);
      else store_first(acc[r][v], C + r * ldc + v * W, cnt[v]);
    }
  }
}

template <typename T>
using MicroFn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t,
                         int64_t, bool);

template <typename T, int MR>
MicroFn<T> pick_nv(int nv, bool full) {
  switch (nv) {
    case 1: return full ? micro_kernel<T, MR, 1, true> : micro_kernel<T, MR, 1, false>;
    case 2: return full ? micro_kernel<T, MR, 2, true> : micro_kernel<T, MR, 2, false>;
    case 3: return full ? micro_kernel<T, MR, 3, true> : micro_kernel<T, MR, 3, false>;
    default: return full ? micro_kernel<T, MR, 4, true> : micro_kernel<T, MR, 4, false>;
  }
}

template <typename T>
MicroFn<T> pick_kernel(int mr, int nv, bool full) {
  switch (mr) {
    case 1: return pick_nv<T, 1>(nv, full);
    case 2: return pick_nv<T, 2>(nv, full);
    case 3: return pick_nv<T, 3>(nv, full);
    case 4: return pick_nv<T, 4>(nv, full);
    case 5: return pick_nv<T, 5>(nv, full);
    default: return pick_nv<T, 6>(nv, full);
  }
}

// Half-open column range [lo, hi) of a tile; per row group of kMR rows it bounds the columns of
// the scores that must be computed and the keys a P·V product must sum over.
struct Span {
  int64_t lo = 0, hi = 0;
  bool empty() const { return hi <= lo; }
};

// C[M × N] (+)= A[M × K] · B[K × N], row group by row group (kMR rows); `span_of(r0, r1)`
// gives the columns [n.lo, n.hi) rows r0..r1-1 need (others are left untouched) and the k range
// they sum over (the caller guarantees A is zero outside it).
template <typename T, typename SpanOf>
void tile_gemm_impl(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B,
                    int64_t ldb, T* C, int64_t ldc, bool accumulate, SpanOf span_of) {
  constexpr int64_t W = Vec<T>::size();
  constexpr int64_t NC = kNV * W;
  for (int64_t r0 = 0; r0 < M; r0 += kMR) {
    const int mr = (int)std::min<int64_t>(kMR, M - r0);
    const auto [n, k] = span_of(r0, r0 + mr);
    if (n.empty()) continue;
    if (k.empty()) {
      if (!accumulate)
        for (int64_t r = 0; r < mr; ++r) std::fill(C + (r0 + r) * ldc + n.lo, C + (r0 + r) * ldc + n.hi, T(0));
      continue;
    }
    for (int64_t c = n.lo; c < n.hi; c += NC) {
      const int64_t nn = std::min(NC, n.hi - c);
      const int nv = (int)((nn + W - 1) / W);
      pick_kernel<T>(mr, nv, nn == nv * W)(k.hi - k.lo, A + r0 * a_rs + k.lo * a_ks, a_rs, a_ks,
                                           B + k.lo * ldb + c, ldb, C + r0 * ldc + c, ldc, nn,
                                           accumulate);
    }
  }
}

// Union of per-row ranges over rows [r0, r1); the low end rounded down to a vector boundary
// when `align` (column ranges), so every computed vector starts aligned within the row.
inline Span union_rows(const Span* rows, int64_t r0, int64_t r1, int64_t align) {
  Span u{std::numeric_limits<int64_t>::max(), 0};
  for (int64_t r = r0; r < r1; ++r) {
    if (rows[r].empty()) continue;
    u.lo = std::min(u.lo, rows[r].lo);
    u.hi = std::max(u.hi, rows[r].hi);
  }
  if (u.empty()) return Span{0, 0};
  u.lo = u.lo / align * align;
  return u;
}

// Keys [c0, c1) of a transposed tile (cols[c]: the queries that may see key c) that some query
// of the vector of queries [r0, r0 + W) may see: both ends of cols[c] are non-decreasing in c,
// so every other key lies before c0 or from c1 on. Their weights are 0 without an exp; on a
// causal diagonal tile that is 3/8 of them.
template <int64_t W>
SEQKERN_INLINE Span vector_keys(const Span* cols, int64_t nk, int64_t r0) {
  int64_t c0 = 0, c1 = nk;
  while (c0 < nk && cols[c0].hi <= r0) ++c0;
  while (c1 > c0 && cols[c1 - 1].lo >= r0 + W) --c1;
  return Span{c0, c1};
}

// ------------------------------------------------------------------ row helpers ------------

template <typename T>
SEQKERN_INLINE Vec<T> vexp(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) return exp2_weights(x * Vec<float>(kLog2e));
  else return x.exp();
}

// max(m, x) for a running maximum of scores, in one instruction for float (at::vec::maximum
// spends four on NaN propagation; a NaN score makes its weight NaN anyway).
template <typename T>
SEQKERN_INLINE Vec<T> running_max(const Vec<T>& m, const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) return max_no_nan(m, x);
  else return at::vec::maximum(m, x);
}

// o[0 .. n) = a · f, stored in o's type: a bf16 output is rounded here, in the kernel, rather
// than by a conversion pass over a float32 copy afterwards.
template <typename T, typename OT>
SEQKERN_INLINE void scaled_row_to(const T* a, int64_t n, T f, OT* o) {
  if constexpr (std::is_same_v<OT, T>) {
    for_each_vec<T>(n, [&](int64_t j, int64_t cnt) { store(load(a + j, cnt) * Vec<T>(f), o + j, cnt); });
  } else if constexpr (std::is_same_v<T, float> && std::is_same_v<OT, c10::BFloat16>) {
    // (at::vec::convert rounds in software, and past whole 32s one value at a time)
    constexpr int64_t W = Vec<float>::size();
    for (int64_t j = 0; j < n; j += 2 * W) {
      const int64_t c = std::min<int64_t>(2 * W, n - j);
      const Vec<float> lo = load(a + j, std::min<int64_t>(W, c)) * Vec<float>(f);
      const Vec<float> hi = c <= W ? Vec<float>(0.0f) : load(a + j + W, c - W) * Vec<float>(f);
      store_bf16_pair(lo, hi, o + j, c);
    }
  } else {
    constexpr int64_t kChunk = 256;
    T tmp[kChunk];
    for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
      const int64_t m = std::min(kChunk, n - j0);
      for_each_vec<T>(m, [&](int64_t j, int64_t cnt) { store(load(a + j0 + j, cnt) * Vec<T>(f), tmp + j, cnt); });
      at::vec::convert(tmp, o + j0, m);
    }
  }
}

template <typename T>
void scale_row(T* x, int64_t n, T a) {
  scaled_row_to(x, n, a, x);
}

// Σ_c x_c·y_c over n values stored in S, computed in T.
template <typename T, typename S>
SEQKERN_INLINE T row_dot(const S* x, const S* y, int64_t n) {
  Vec<T> acc(T(0));
  for_each_vec<T>(n, [&](int64_t c, int64_t m) { acc = at::vec::fmadd(load(x + c, m), load(y + c, m), acc); });
  return reduce_sum<T>(acc);
}

// ------------------------------------------------------------------ masks ------------------

// Everything that decides whether query i may see key j (SPEC "Causal masked attention").
template <typename T>
struct Mask {
  int64_t Lq = 0, Lk = 0;
  bool causal = false;
  int64_t offset = 0;  // δ: 0 top-left, Lk − Lq bottom-right
  int64_t window = 0;  // 0: none
  const int64_t* key_len = nullptr;
  // explicit mask, expanded to (B, Hq, Lq, Lk) by strides (0 where broadcast)
  const bool* bmask = nullptr;
  const T* amask = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;

  bool has_explicit() const { return bmask || amask; }

  // Keys [lo, hi) that the structural masks allow for query i of batch b (may be empty).
  Span range(int64_t b, int64_t i) const {
    Span s{0, Lk};
    if (key_len) s.hi = std::min(s.hi, key_len[b]);
    if (causal) s.hi = std::min(s.hi, i + offset + 1);
    if (window > 0) s.lo = std::max<int64_t>(0, i + offset - window + 1);
    return s;
  }

  int64_t at(int64_t b, int64_t h, int64_t i, int64_t j) const { return b * sb + h * sh + i * sq + j * sk; }

  // Whether the explicit mask allows any key of [j0 + lo_r, j0 + hi_r) for some row; lets a
  // tile that only the explicit mask rules out be skipped before its scores are computed.
  bool explicit_any(int64_t b, int64_t h, int64_t i0, int64_t mi, int64_t j0, const Span* rows) const {
    for (int64_t r = 0; r < mi; ++r) {
      const int64_t base = at(b, h, i0 + r, j0);
      for (int64_t c = rows[r].lo; c < rows[r].hi; ++c) {
        if (bmask ? bmask[base + c * sk] : amask[base + c * sk] != neg_inf<T>()) return true;
      }
    }
    return false;
  }
};

// Keys [lo, hi) that some query of rows [i0, i0 + mi) may see (structural masks only).
template <typename T>
Span block_keys(const Mask<T>& mask, int64_t b, int64_t i0, int64_t mi) {
  Span u{mask.Lk, 0};
  for (int64_t r = 0; r < mi; ++r) {
    const Span s = mask.range(b, i0 + r);
    if (s.empty()) continue;
    u.lo = std::min(u.lo, s.lo);
    u.hi = std::max(u.hi, s.hi);
  }
  return u;
}

struct Dims {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  int64_t group() const { return Hkv ? Hq / Hkv : 1; }
};

// 4-D strides of a (B, H, L, E) tensor whose last dimension is contiguous.
struct Strides {
  int64_t b, h, l;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), l(t.stride(2)) {}
  int64_t at(int64_t bi, int64_t hi, int64_t li = 0) const { return bi * b + hi * h + li * l; }
};

// ------------------------------------------------------------------ dropout ----------------
//
// Dropout on the attention weights: P_ij is zeroed with probability p and the rest scaled by
// 1/(1−p). Whether (b, h, i, j) is dropped is a hash of the seed and those indices, not a draw
// from a random stream: the backward regenerates the pattern tile by tile with nothing saved
// (an Lq×Lk bit mask would break O(L) memory), any tile order or thread split gives the same
// pattern, and `attention_dropout_mask` materialises it for the reference to apply.
struct Dropout {
  uint32_t threshold = 0;  // keep iff hash ≥ threshold (p·2³²)
  double keep_scale = 1;   // 1/(1−p); 0 when p = 1 (everything dropped)
  uint64_t seed = 0;
  bool active = false;

  Dropout() = default;
  Dropout(double p, uint64_t s) : seed(s), active(p > 0) {
    threshold = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
    keep_scale = p >= 1 ? 0.0 : 1.0 / (1.0 - p);
  }

  // A row's 64-bit key, splitmix64 of its flat index (b·Hq + h)·Lq + i and the seed, in halves:
  // key j of the row is kept by mix32((lo + j·φ) ^ hi), so two rows whose lo differ by d·φ
  // (which alone would give one pattern shifted by d keys) still differ through hi.
  struct RowKey {
    uint32_t lo, hi;
  };
  RowKey row_key(int64_t row) const {
    uint64_t z = seed + static_cast<uint64_t>(row + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return {static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32)};
  }
  // keys of query rows [i0, i0 + n) of (b, h), as two arrays (they vectorise down a column)
  void row_keys(int64_t b, int64_t h, int64_t Hq, int64_t Lq, int64_t i0, int64_t n,
                uint32_t* lo, uint32_t* hi) const {
    for (int64_t r = 0; r < n; ++r) {
      const RowKey k = row_key((b * Hq + h) * Lq + i0 + r);
      lo[r] = k.lo;
      hi[r] = k.hi;
    }
  }
};

// lowbias32 (Wellons): a full-avalanche 32-bit mix, five integer ops that vectorise.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}
inline uint32_t column_key(int64_t j) { return static_cast<uint32_t>(j) * 0x9E3779B9u; }

// Keep factors (1 or 0) of key j for n query rows with keys (lo, hi): a column of a transposed
// tile.
template <typename T>
void keep_down_column(const uint32_t* lo, const uint32_t* hi, int64_t n, int64_t j,
                      uint32_t threshold, T* out) {
  const uint32_t ck = column_key(j);
  for (int64_t r = 0; r < n; ++r) out[r] = mix32((lo[r] + ck) ^ hi[r]) >= threshold ? T(1) : T(0);
}

// Keep factors of keys [j0, j0 + n) for the query row with key k.
template <typename T>
void keep_along_row(Dropout::RowKey k, int64_t j0, int64_t n, uint32_t threshold, T* out) {
  for (int64_t j = 0; j < n; ++j)
    out[j] = mix32((k.lo + column_key(j0 + j)) ^ k.hi) >= threshold ? T(1) : T(0);
}

// Task t of a backward pass: batch b, key/value head hk and the query heads [h_begin, h_end) of
// its group that this task covers (a group is split `chunks` ways when there are too few
// (batch, kv head) pairs for the threads); acc_row indexes its dK/dV rows, (B, Hkv, chunks, Lk, ·).
struct KvTask {
  int64_t b, hk, h_begin, h_end, acc_row;
  KvTask(const Dims& d, int64_t chunks, int64_t t) {
    const int64_t g = d.group(), per = (g + chunks - 1) / chunks, c = t % chunks;
    hk = (t / chunks) % d.Hkv;
    b = t / (chunks * d.Hkv);
    // (the last chunks may be empty, h_begin == h_end: g = 5 in 4 chunks of 2 leaves none for
    // the fourth, whose dK/dV rows must still be written, as zeros)
    h_begin = std::min(hk * g + c * per, hk * g + g);
    h_end = std::min(hk * g + g, h_begin + per);
    acc_row = (b * d.Hkv + hk) * chunks + c;
  }
};

// Where the gradient of an additive mask goes: dS, summed over the dimensions along which the
// mask broadcasts (stride 0 in the (B, Hq, Lq, Lk) view). When it broadcasts over batches or
// heads, two tasks may add to one element, so each thread sums into its own copy.
template <typename T>
struct MaskGrad {
  T* data = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  int64_t per_thread = 0;  // elements of one thread's copy; 0: one shared copy, tasks disjoint
  T* target() const { return per_thread ? data + at::get_thread_num() * per_thread : data; }
};

// ------------------------------------------------------------------ transposed tiles -------
//
// Both passes hold score tiles transposed, keys × queries (Sᵀ = K_j·Qᵢᵀ): K and V are then read
// in place as broadcast operands (no transposed copies; a KV-cache view works as is), only
// query-side blocks are transposed, and per-query softmax statistics are reduced down columns,
// W queries per vector, with no horizontal operations.

// rows[r]: keys of the tile [j0, j0 + nk) that query i0 + r may see; cols[c]: the queries that
// may see key j0 + c, an interval because both ends of rows[r] are non-decreasing in r.
// Returns false when the tile can be skipped.
template <typename T>
bool tile_setup(const Mask<T>& mask, int64_t b, int64_t h, int64_t i0, int64_t mi, int64_t j0,
                int64_t nk, Span* rows, Span* cols) {
  // The structural ranges never move left as the query index grows, so when the first row
  // reaches past the tile and the last starts before it, every row sees every key: the interior
  // tiles of causal and windowed attention, most of them, need no per-row work.
  if (mi > 0) {
    const Span first = mask.range(b, i0), last = mask.range(b, i0 + mi - 1);
    if (last.lo <= j0 && first.hi >= j0 + nk) {
      std::fill(rows, rows + mi, Span{0, nk});
      if (mask.has_explicit() && !mask.explicit_any(b, h, i0, mi, j0, rows)) return false;
      std::fill(cols, cols + nk, Span{0, mi});
      return true;
    }
  }
  bool any = false;
  for (int64_t r = 0; r < mi; ++r) {
    const Span s = mask.range(b, i0 + r);
    rows[r] = Span{std::clamp<int64_t>(s.lo - j0, 0, nk), std::clamp<int64_t>(s.hi - j0, 0, nk)};
    any |= !rows[r].empty();
  }
  if (!any) return false;
  if (mask.has_explicit() && !mask.explicit_any(b, h, i0, mi, j0, rows)) return false;
  for (int64_t c = 0, first = 0, last = 0; c < nk; ++c) {
    while (first < mi && rows[first].hi <= c) ++first;
    while (last < mi && rows[last].lo <= c) ++last;
    cols[c] = Span{first, std::max(first, last)};
  }
  return true;
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kBoolMaskRows = true;
// Bit c set for each of the n ≤ 64 bool mask bytes at p that allows its key: one masked load
// and one test instead of a byte at a time.
SEQKERN_INLINE uint64_t allowed_bits(const bool* p, int64_t n) {
  const __mmask64 valid = n == 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
  const __m512i bytes = _mm512_maskz_loadu_epi8(valid, p);
  return _mm512_test_epi8_mask(bytes, bytes);
}
#else
constexpr bool kBoolMaskRows = false;
#endif

// A score plus an additive mask entry, where a −inf entry rules the key out whatever the
// score is: a cache slot whose K row holds NaN/inf (never written) would otherwise give
// NaN + (−inf) = NaN, and every query's row NaN, although the mask excludes it (as a bool mask
// does, by storing −inf).
template <typename T>
SEQKERN_INLINE T add_mask(T s, T a) {
  return a == neg_inf<T>() ? a : s + a;
}
template <typename T>
SEQKERN_INLINE Vec<T> add_mask(const Vec<T>& s, const Vec<T>& a) {
  return Vec<T>::blendv(s + a, a, a == Vec<T>(neg_inf<T>()));
}

// The explicit mask over a transposed tile whose mask rows run along the keys (sk == 1, the
// usual layout; sq != 0), a query row at a time instead of a strided gather down each key:
// a bool row (AVX-512 builds) is read 64 keys per load, and only its false entries are stored (-inf), so a
// tile the mask allows whole costs a load and a test per query row; an additive block is
// transposed (16 × 16 register transposes) and added down the keys' spans. Rows [rlo, rhi)
// hold every query some key of the tile's spans has. Entries outside the spans are -inf
// already, and stay so.
template <typename T>
void explicit_mask_rows_t(const Mask<T>& mask, int64_t b, int64_t h, int64_t i0, int64_t j0,
                          int64_t nk, const Span* cols, T* st, int64_t ld, int64_t rlo,
                          int64_t rhi) {
  if (mask.bmask) {
#if defined(CPU_CAPABILITY_AVX512)
    for (int64_t r = rlo; r < rhi; ++r) {
      const bool* m = mask.bmask + mask.at(b, h, i0 + r, j0);
      for (int64_t c0 = 0; c0 < nk; c0 += 64) {
        const int64_t n = std::min<int64_t>(64, nk - c0);
        const uint64_t all = n == 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1;
        for (uint64_t off = all & ~allowed_bits(m + c0, n); off; off &= off - 1)
          st[(c0 + __builtin_ctzll(off)) * ld + r] = neg_inf<T>();
      }
    }
#endif
    return;
  }
  const int64_t nr = rhi - rlo;
  thread_local LineVector<T> buf;
  buf.resize(nk * nr);
  transpose<T>(mask.amask + mask.at(b, h, i0 + rlo, j0), mask.sq, buf.data(), nr, nr, nk);
  for (int64_t c = 0; c < nk; ++c) {
    const Span cs = cols[c];
    if (cs.empty()) continue;
    at::vec::map2([](Vec<T> x, Vec<T> a) { return add_mask(x, a); }, st + c * ld + cs.lo,
                  st + c * ld + cs.lo, buf.data() + c * nr + (cs.lo - rlo), cs.hi - cs.lo);
  }
}

// Sᵀ rows (keys) over the first mp query columns: disallowed entries get `fill` (-inf for
// scores, 0 for other tiles computed only on the allowed spans); the explicit mask is applied
// when `explicit_mask`.
template <typename T>
void mask_tile_t(const Mask<T>& mask, int64_t b, int64_t h, int64_t i0, int64_t j0, int64_t nk,
                 int64_t mp, const Span* cols, T* st, int64_t ld, T fill, bool explicit_mask) {
  Span rs{mp, 0};  // the queries of the tile's spans
  for (int64_t c = 0; c < nk; ++c) {
    T* s = st + c * ld;
    const Span cs = cols[c];
    if (cs.empty()) {
      std::fill(s, s + mp, fill);
      continue;
    }
    rs = Span{std::min(rs.lo, cs.lo), std::max(rs.hi, cs.hi)};
    std::fill(s, s + cs.lo, fill);
    std::fill(s + cs.hi, s + mp, fill);
  }
  if (!explicit_mask || rs.empty()) return;
  if (mask.sk == 1 && mask.sq != 0 && (mask.amask || kBoolMaskRows))
    return explicit_mask_rows_t(mask, b, h, i0, j0, nk, cols, st, ld, rs.lo, rs.hi);
  // Otherwise key by key. A mask broadcast along the queries (stride 0: a (B, 1, 1, Lk)
  // padding mask) is one value for the whole column.
  for (int64_t c = 0; c < nk; ++c) {
    T* s = st + c * ld;
    const Span cs = cols[c];
    if (cs.empty()) continue;
    const int64_t base = mask.at(b, h, i0, j0 + c);
    if (mask.bmask) {
      if (mask.sq == 0) {
        if (!mask.bmask[base]) std::fill(s + cs.lo, s + cs.hi, neg_inf<T>());
      } else {
        for (int64_t r = cs.lo; r < cs.hi; ++r) s[r] = mask.bmask[base + r * mask.sq] ? s[r] : neg_inf<T>();
      }
    } else if (mask.amask) {
      if (mask.sq == 0) {
        const T a = mask.amask[base];
        for (int64_t r = cs.lo; r < cs.hi; ++r) s[r] = add_mask(s[r], a);
      } else {
        for (int64_t r = cs.lo; r < cs.hi; ++r) s[r] = add_mask(s[r], mask.amask[base + r * mask.sq]);
      }
    }
  }
}

// dst[e·ld_dst + r] = scale · src[r·ld_src + e] for r < rows, e < cols, and zero for rows up to
// rows_to: a block of query-side rows transposed for the tile products, in 16 × 16 register
// transposes (an element-by-element gather was a quarter of the fp32 forward's own profile at
// L = 128; most of what remains there is the first read of Q from memory).
template <typename T>
void transpose_scaled(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T scale, T* dst,
                      int64_t ld_dst, int64_t rows_to) {
  transpose<T>(src, ld_src, dst, ld_dst, rows, cols);
  for (int64_t e = 0; e < cols; ++e) {
    T* d = dst + e * ld_dst;
    if (scale != T(1))
      at::vec::map([scale](Vec<T> x) { return x * Vec<T>(scale); }, d, d, rows);
    std::fill(d + rows, d + rows_to, T(0));
  }
}

// ------------------------------------------------------------------ forward ----------------

// Vector u of the column block from c0 of a row x (Dv values), widened to T; FULL: the whole
// block lies inside Dv, so no load is partial.
template <bool FULL, typename T, typename S>
SEQKERN_INLINE Vec<T> block_vector(const S* x, int64_t c0, int u, int64_t Dv) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t c = c0 + u * W;
  return FULL ? load(x + c, W) : load(x + c, std::min<int64_t>(W, Dv - c));
}

// The log-sum-exp m + log(sum) of a row, kept in float64 whatever the compute type: the
// backward recomputes the weights as exp(s − lse), and with peaked scores (|lse| in the tens)
// a float32 lse would be off by up to half an ulp of it, 2e-6 of every weight of the row,
// 20× the error of the forward's own exp(s − m). The backwards split it (split_lse).
template <typename T>
double row_lse(T mx, T sum) {
  if (sum > T(0)) return static_cast<double>(mx) + std::log(static_cast<double>(sum));
  // no allowed key: -inf; NaN scores (sum NaN) keep NaN, so the backward's weights are NaN too
  return std::isnan(sum) ? std::numeric_limits<double>::quiet_NaN() : neg_inf<double>();
}

// row_lse of n rows, a vector of doubles at a time: a scalar log per row was 3.6 % of a bf16
// forward at L = 128.
template <typename T>
void rows_lse(int64_t n, const T* mx, const T* sum, double* l) {
  using VD = Vec<double>;
  constexpr int64_t WD = VD::size();
  for (int64_t r0 = 0; r0 < n; r0 += WD) {
    const int64_t m = std::min(WD, n - r0);
    double sums[WD], logs[WD];
    for (int64_t i = 0; i < WD; ++i) sums[i] = i < m && sum[r0 + i] > T(0) ? double(sum[r0 + i]) : 1.0;
    VD::loadu(sums).log().store(logs);
    for (int64_t i = 0; i < m; ++i)
      l[r0 + i] = sum[r0 + i] > T(0) ? static_cast<double>(mx[r0 + i]) + logs[i] : row_lse(mx[r0 + i], sum[r0 + i]);
  }
}

// Rows of O = keep_scale · acc / sum (zeros for a row that saw no allowed key) and their
// log-sum-exp (unless l is null), from the online-softmax state of a query block; acc rows are
// ld_acc apart. The sum is over the weights before dropout, so the log-sum-exp is dropout's too.
template <typename T, typename OT = T>
void write_output_rows(int64_t mi, int64_t Dv, const T* acc, int64_t ld_acc, const T* sm,
                       const T* mx, T keep_scale, OT* o, double* l) {
  for (int64_t r = 0; r < mi; ++r) {
    const T inv = sm[r] > T(0) ? keep_scale / sm[r] : T(0);
    scaled_row_to(acc + r * ld_acc, Dv, inv, o + r * Dv);
  }
  if (l) rows_lse(mi, mx, sm, l);
}

// write_output_rows into a bf16 output, or a float32 one (o32 non-null): the unrounded output
// a training forward keeps for the backward's Δ (see attention_forward).
inline void write_output_rows_bf16(int64_t mi, int64_t Dv, const float* acc, int64_t ld_acc,
                                   const float* sm, const float* mx, float keep_scale,
                                   c10::BFloat16* o16, float* o32, int64_t offset, double* l) {
  if (o32) write_output_rows<float, float>(mi, Dv, acc, ld_acc, sm, mx, keep_scale, o32 + offset, l);
  else write_output_rows<float, c10::BFloat16>(mi, Dv, acc, ld_acc, sm, mx, keep_scale, o16 + offset, l);
}

// The online softmax of a transposed score tile st (nk keys × mp queries, rows ld apart) down
// its columns, W queries per vector: folds the tile into the running max mx and sum sm, rescales
// the accumulator rows (acc, Dv apart) of the queries whose max moved, and leaves the weights
// exp(s − max) in place, times keep (same layout) where given; the sum is over the weights
// before dropout. With `cols` (as from tile_setup), keys no query of a vector may see get weight
// 0 without an exp (vector_keys).
template <typename T>
void softmax_columns(T* st, int64_t ld, int64_t nk, int64_t mp, int64_t mi, const T* keep, T* mx,
                     T* sm, T* acc, int64_t Dv, const Span* cols = nullptr) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  for (int64_t r0 = 0; r0 < mp; r0 += W) {
    const auto [c0, c1] = cols ? vector_keys<W>(cols, nk, r0) : Span{0, nk};
    for (int64_t c = 0; c < c0; ++c) V(T(0)).store(st + c * ld + r0);
    for (int64_t c = c1; c < nk; ++c) V(T(0)).store(st + c * ld + r0);
    V bmax(neg_inf<T>());
    for (int64_t c = c0; c < c1; ++c) bmax = running_max(bmax, V::loadu(st + c * ld + r0));
    OnlineSoftmaxLanes<T> os;
    os.max = V::loadu(mx + r0);
    os.sum = V::loadu(sm + r0);
    V shift;
    const V alpha = os.update_max(bmax, shift);
    V colsum(T(0));
    for (int64_t c = c0; c < c1; ++c) {
      T* s = st + c * ld + r0;
      const V p = vexp(V::loadu(s) - shift);
      colsum = colsum + p;
      (keep ? p * V::loadu(keep + c * ld + r0) : p).store(s);
    }
    (os.sum + colsum).store(sm + r0);
    os.max.store(mx + r0);
    T a[W];
    alpha.store(a);
    for (int64_t r = r0; r < std::min(r0 + W, mi); ++r)
      if (a[r - r0] != T(1)) scale_row(acc + r * Dv, Dv, a[r - r0]);
  }
}

// Rows of K or V as the tile products read them: in place when stored in the compute type T;
// a bf16 cache without AMX is widened block by block into `buf` (rows cols apart), in cache,
// instead of converted whole up front: a (2, 16, 4104, 64) K and V took 5 ms to convert for an
// 8-query forward of 4 ms.
template <typename T, typename S>
SEQKERN_INLINE std::pair<const T*, int64_t> kv_rows(const S* src, int64_t ld, int64_t rows,
                                                    int64_t cols, T* buf) {
  if constexpr (std::is_same_v<S, T>) {
    return {src, ld};
  } else {
    for (int64_t r = 0; r < rows; ++r) widen_row(src + r * ld, buf + r * cols, cols);
    return {buf, cols};
  }
}



// A cache slot never written may hold NaN or inf in K or V, and a tile product multiplies the
// rows a query may not see by 0: 0·NaN is NaN, and it would reach every row of the tile. Such
// rows are taken out of the product (zero in a copy) and added by hand to the rows whose weight
// is not 0. Rare, so only looked for where a result came out non-finite (the forwards redo the
// query block) or where it is cheap (the backwards check each key block once per task).

// The keys c < n whose rows (ld apart, `width` values) are not all finite, into bad; how many.
template <typename S>
inline int64_t nonfinite_rows(const S* rows, int64_t ld, int64_t n, int64_t width, int64_t* bad) {
  int64_t nb = 0;
  for (int64_t c = 0; c < n; ++c)
    if (!all_finite(rows + c * ld, width)) bad[nb++] = c;
  return nb;
}

// Rows [0, n) of src into dst (rows `width` apart), the rows in bad zero.
template <typename T>
inline void copy_rows_zeroing(const T* src, int64_t ld, int64_t n, int64_t width,
                              const int64_t* bad, int64_t nb, T* dst) {
  for (int64_t c = 0; c < n; ++c) std::copy_n(src + c * ld, width, dst + c * width);
  for (int64_t i = 0; i < nb; ++i) std::fill_n(dst + bad[i] * width, width, T(0));
}

// out row r (ldo apart) += w(r, c) · row c of `rows`, for the keys c in bad and the rows r < m
// whose weight is not 0.
template <typename T, typename S, typename Weight>
inline void add_rows_by_hand(int64_t m, const int64_t* bad, int64_t nb, const S* rows, int64_t ld,
                             int64_t width, Weight w, T* out, int64_t ldo) {
  for (int64_t i = 0; i < nb; ++i) {
    const S* x = rows + bad[i] * ld;
    for (int64_t r = 0; r < m; ++r) {
      const T wr = static_cast<T>(w(r, bad[i]));
      if (wr != T(0))
        for (int64_t e = 0; e < width; ++e) out[r * ldo + e] += wr * static_cast<T>(x[e]);
    }
  }
}

// The backward's weights are exp((s − hi) − lo) with hi + lo = lse (float64) and hi in T: when
// |lse| is large against the spread of the scores that carry weight, s is within a factor 2 of
// hi and s − hi is exact (Sterbenz), so the weights are as accurate as the forward's; otherwise
// s − hi is small and its rounding error small in absolute terms. A row with no allowed key
// (lse = −inf) gets hi = +inf, lo = 0, so its weights are 0; so do backward_shift's lanes
// [n, W), rows past the block.
template <typename T>
SEQKERN_INLINE void split_lse(double lse, T& hi, T& lo) {
  hi = lse == neg_inf<double>() ? std::numeric_limits<T>::infinity() : static_cast<T>(lse);
  lo = lse == neg_inf<double>() ? T(0) : static_cast<T>(lse - static_cast<double>(hi));
}


// Right operands with a head dim E as their N are packed E rounded up to a multiple of 32 wide
// (the accumulators are that wide), so one brgemm call covers all of N (measured 2–8 % faster
// than calls over chunks of 64 columns).
inline int64_t amx_width(int64_t E) { return (E + 31) / 32 * 32; }

inline bool amx_usable(const Dims& d) {
  if (!bf16_tiles_supported() || d.D % 2 || d.Dv % 2) return false;
  const char* env = std::getenv("SEQKERN_ATTENTION_AMX");  // "0": the fp32 tile kernels
  return !(env && env[0] == '0');
}

// Whether the row-wise decode kernels take these queries; the backward must take them exactly
// when the forward did, to recompute its scores. Measured with 2 threads, D = 64, fp32: 8 queries
// against a 4096-token cache (B = 2, H = 16) forward 2.9 ms against the tile kernel's 4.3 (its
// 16-query vectors half empty), forward+backward 23 ms both; self-attention at L = 8 (B = 256,
// H = 8) forward+backward 6.3 against 15.1 ms; at 16 queries the tile kernel is ahead.
// With bf16 tiles, bf16 inference from 5 queries has its own kernel (forward_kernel_bf16_few),
// which keeps a V row holding NaN/inf away from the queries that give it weight 0, as the
// row-wise kernels do. Training at 5–8 queries stays row-wise: its backward on bf16 tiles
// multiplies dS = 0 by a K row that holds NaN (a cache slot only other queries see), which
// reached every query's dQ; row-wise is faster too (forward+backward, 2 threads: 8 queries
// against 4096 keys, B = 2, H = 16, 30.2 → 28.5 ms; 8-token self-attention, B = 256, H = 8,
// 18.9 → 6.0 ms).
inline bool use_decode(const Dims& d, at::ScalarType t, bool inference) {
  if (d.Lq <= kDecodeRows) return true;
  const bool bf16_tiles = t == at::kBFloat16 && amx_usable(d);
  return d.Lq <= kDecodeRowsMax && (!bf16_tiles || !inference);
}

// The few-query bf16 kernel's limit (forward_kernel_bf16_few, attention_flash_bf16.cpp).
constexpr int64_t kFewRowsMax = 32;

inline bool bf16_few_queries(const Dims& d, bool inference) {
  return d.Lq <= kFewRowsMax && !use_decode(d, at::kBFloat16, inference) &&
         amx_usable(d);
}

// ------------------------------------------------------------------ kernels ----------------
// (instantiated for T, S = float, float | float, BFloat16 | float, Half | double, double: S is
// the storage type of K and V)

// Tiles in the compute type T (attention_flash.cpp).
template <typename T, typename S = T>
void forward_kernel(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                    const at::Tensor& v_, T scale, const Mask<T>& mask, const Dropout& drop,
                    at::Tensor& out, at::Tensor& lse);
template <typename T, typename S = T>
void backward_kernel(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                     const at::Tensor& v_, const at::Tensor& do_, const at::Tensor& o_,
                     const at::Tensor& lse_, const Mask<T>& mask, const Dropout& drop,
                     const MaskGrad<T>& mgrad, T scale, int64_t chunks, at::Tensor& dq,
                     at::Tensor& dk, at::Tensor& dv);

// At most kDecodeRowsMax queries, row by row (attention_decode.cpp); the backward must run
// exactly where the forward did (use_decode), to recompute its scores.
template <typename T, typename S = T>
void decode_forward_kernel(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                           const at::Tensor& v_, T scale, const Mask<T>& mask,
                           const Dropout& drop, at::Tensor& out, at::Tensor& lse);
template <typename T, typename S = T>
void decode_backward_kernel(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                            const at::Tensor& v_, const at::Tensor& do_, const at::Tensor& lse_,
                            const Mask<T>& mask, const Dropout& drop,
                            const MaskGrad<T>& mgrad, T scale, int64_t chunks, at::Tensor& dq,
                            at::Tensor& dk, at::Tensor& dv);

// bf16 tiles (attention_flash_bf16.cpp): more than 32 queries, 5–32 queries (bf16_few_queries:
// inference from 5, training from 9), and the backward of both.
void forward_kernel_bf16_amx(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                             const at::Tensor& v_, float scale, const Mask<float>& mask,
                             const Dropout& drop, at::Tensor& out, at::Tensor& lse);
void forward_kernel_bf16_few(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                             const at::Tensor& v_, float scale, const Mask<float>& mask,
                             const Dropout& drop, at::Tensor& out, at::Tensor& lse);
void backward_kernel_bf16_amx(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                              const at::Tensor& v_, const at::Tensor& do_, const at::Tensor& lse_,
                              const at::Tensor& delta_, const Mask<float>& mask,
                              const Dropout& drop, const MaskGrad<float>& mgrad, float scale,
                              int64_t chunks, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace seqkern::cpu::attn
