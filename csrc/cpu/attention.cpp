// Scaled dot-product attention on the CPU, flash-style: queries are processed in blocks of
// kBlockQ rows against blocks of kBlockK keys with an online softmax, so nothing of size Lq×Lk
// is ever allocated (forward or backward). The backward pass recomputes each score tile from
// the log-sum-exp saved by the forward pass.
//
// The tile products use a register-blocked micro-kernel (at::vec) instead of BLAS: a 64×64×64
// product is ~0.5 MFLOP, small enough that a BLAS call's fixed overhead is a large fraction of
// it, and the kernel can restrict each row group to the columns a causal/window mask allows,
// which BLAS cannot.
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

namespace seqkern::cpu {
namespace {

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
    for (int v = 0; v < NV; ++v) bv[v] = FULL ? V::loadu(b + v * W) : load_first(b + v * W, cnt[v]);
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
  return at::vec::vec_reduce_all<T>([](Vec<T> u, Vec<T> w) { return u + w; }, acc);
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
  int64_t group() const { return Hq / Hkv; }
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
  thread_local std::vector<T> buf;
  buf.resize(nk * nr);
  transpose<T>(mask.amask + mask.at(b, h, i0 + rlo, j0), mask.sq, buf.data(), nr, nr, nk);
  for (int64_t c = 0; c < nk; ++c) {
    const Span cs = cols[c];
    if (cs.empty()) continue;
    at::vec::map2([](Vec<T> x, Vec<T> a) { return x + a; }, st + c * ld + cs.lo,
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
        for (int64_t r = cs.lo; r < cs.hi; ++r) s[r] += a;
      } else {
        for (int64_t r = cs.lo; r < cs.hi; ++r) s[r] += mask.amask[base + r * mask.sq];
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
// log-sum-exp, from the online-softmax state of a query block; acc rows are ld_acc apart. The
// sum is over the weights before dropout, so the log-sum-exp is dropout's too.
template <typename T, typename OT = T>
void write_output_rows(int64_t mi, int64_t Dv, const T* acc, int64_t ld_acc, const T* sm,
                       const T* mx, T keep_scale, OT* o, double* l) {
  for (int64_t r = 0; r < mi; ++r) {
    const T inv = sm[r] > T(0) ? keep_scale / sm[r] : T(0);
    scaled_row_to(acc + r * ld_acc, Dv, inv, o + r * Dv);
  }
  rows_lse(mi, mx, sm, l);
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

// q (B,Hq,Lq,D), k (B,Hkv,Lk,D), v (B,Hkv,Lk,Dv), last dims contiguous; out (B,Hq,Lq,Dv) and
// lse (B,Hq,Lq) float64 contiguous, written here. Tasks are (batch, head, query block).
template <typename T, typename S = T>
void forward_kernel(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                    const at::Tensor& v_, T scale, const Mask<T>& mask, const Dropout& drop,
                    at::Tensor& out, at::Tensor& lse) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  constexpr int64_t BQ = kBlockQ;
  constexpr int64_t BK = kForwardBlockK;
  constexpr bool widen = !std::is_same_v<S, T>;
  const int64_t nqb = (d.Lq + BQ - 1) / BQ;
  const Strides sq(q_), sk(k_), sv(v_);
  const T* Q = q_.data_ptr<T>();
  const S *K = k_.data_ptr<S>(), *Vp = v_.data_ptr<S>();
  T* O = out.data_ptr<T>();
  double* LSE = lse.data_ptr<double>();
  const int64_t g = d.group();

  at::parallel_for(0, d.B * d.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> QT(d.D * BQ), ST(BK * BQ), acc(BQ * d.Dv), mx(BQ), sm(BQ);
    std::vector<T> keep(drop.active ? BK * BQ : 0);
    std::vector<T> kbuf(widen ? BK * d.D : 0), vbuf(widen ? BK * d.Dv : 0);
    uint32_t rk_lo[BQ] = {}, rk_hi[BQ] = {};
    Span rows[BQ], cols[BK];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb, h = (task / nqb) % d.Hq, b = task / (nqb * d.Hq);
      const int64_t hk = h / g, i0 = qb * BQ, mi = std::min(BQ, d.Lq - i0);
      const int64_t mp = (mi + W - 1) / W * W;  // queries rounded up to whole vectors
      const T* q = Q + sq.at(b, h, i0);
      const S* kbase = K + sk.at(b, hk);
      const S* vbase = Vp + sv.at(b, hk);
      transpose_scaled(q, sq.l, mi, d.D, scale, QT.data(), BQ, mp);  // Qᵢᵀ·scale, 0 past mi
      std::fill(acc.begin(), acc.begin() + mi * d.Dv, T(0));
      std::fill(mx.begin(), mx.end(), neg_inf<T>());
      std::fill(sm.begin(), sm.end(), T(0));
      if (drop.active) drop.row_keys(b, h, d.Hq, d.Lq, i0, mi, rk_lo, rk_hi);

      const Span keys = block_keys(mask, b, i0, mi);
      for (int64_t j0 = keys.lo / BK * BK; j0 < keys.hi; j0 += BK) {
        // (keys past keys.hi are seen by no query of the block)
        const int64_t nk = std::min(BK, keys.hi - j0);
        if (!tile_setup(mask, b, h, i0, mi, j0, nk, rows, cols)) continue;
        const auto [kj, ldk] = kv_rows(kbase + j0 * sk.l, sk.l, nk, d.D, kbuf.data());
        const auto [vj, ldv] = kv_rows(vbase + j0 * sv.l, sv.l, nk, d.Dv, vbuf.data());
        // Sᵀ = K_j · (scale·Qᵢ)ᵀ where some query may see the key, then -inf where none may
        tile_gemm_impl<T>(nk, d.D, kj, ldk, 1, QT.data(), BQ, ST.data(), BQ, false,
                          [&](int64_t r0, int64_t r1) {
                            return std::pair<Span, Span>{union_rows(cols, r0, r1, W), Span{0, d.D}};
                          });
        mask_tile_t(mask, b, h, i0, j0, nk, mp, cols, ST.data(), BQ, neg_inf<T>(), mask.has_explicit());
        if (drop.active)
          for (int64_t c = 0; c < nk; ++c) keep_down_column(rk_lo, rk_hi, mp, j0 + c, drop.threshold, keep.data() + c * BQ);
        softmax_columns<T>(ST.data(), BQ, nk, mp, mi, drop.active ? keep.data() : nullptr,
                           mx.data(), sm.data(), acc.data(), d.Dv, cols);
        // O_i += P·V_j, P read from Sᵀ (row stride 1, k stride BQ)
        tile_gemm_impl<T>(mi, nk, ST.data(), 1, BQ, vj, ldv, acc.data(), d.Dv, true,
                          [&](int64_t r0, int64_t r1) {
                            return std::pair<Span, Span>{Span{0, d.Dv}, union_rows(rows, r0, r1, 1)};
                          });
      }

      write_output_rows<T>(mi, d.Dv, acc.data(), d.Dv, sm.data(), mx.data(), T(drop.keep_scale),
                           O + ((b * d.Hq + h) * d.Lq + i0) * d.Dv, LSE + (b * d.Hq + h) * d.Lq + i0);
    }
  });
}

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
// Vector u of the column block from c0 of a row x (Dv values), widened to T; FULL: the whole
// block lies inside Dv, so no load is partial.
template <bool FULL, typename T, typename S>
SEQKERN_INLINE Vec<T> block_vector(const S* x, int64_t c0, int u, int64_t Dv) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t c = c0 + u * W;
  return FULL ? load(x + c, W) : load(x + c, std::min<int64_t>(W, Dv - c));
}

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
  if (mask.sk == 1) return sc + Vec<float>::loadu(mask.amask + base);
  for (int c = 0; c < 16; ++c) m[c] = mask.amask[base + c * mask.sk];
  return sc + Vec<float>::loadu(m);
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
    mx = at::vec::vec_reduce_all<T>([](V x, V y) { return at::vec::maximum(x, y); }, mxv);
  }
  for (; j < keys.hi; ++j) {
    const S* kr = kbase + j * ldk;
    V a(T(0));
    for_each_vec<T>(D, [&](int64_t c, int64_t n) { a = at::vec::fmadd(load(q + c, n), load(kr + c, n), a); });
    T sc = at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, a) * scale;
    if (mask.has_explicit()) {
      const int64_t idx = mask.at(b, h, i, j);
      if (mask.bmask) sc = mask.bmask[idx] ? sc : neg_inf<T>();
      else sc += mask.amask[idx];
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
  auto vmax = [](V x) { return at::vec::vec_reduce_all<float>([](V u, V w) { return at::vec::maximum(u, w); }, x); };
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
template <typename T, typename S = T>
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
    std::vector<T> s(RG * d.Lk), acc(RG * d.Dv), part(d.Dv), keep(drop.active ? d.Lk : 0);
    std::vector<T> mx(RG), sum(RG);
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
        sum[i] = at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, sumv);
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

// ------------------------------------------------------------------ bf16 forward, AMX -------
//
// bfloat16 inputs where the CPU has AMX (or another bf16 dot-product unit oneDNN packs for):
// the two tile products run as oneDNN brgemm micro-kernels with bf16 operands and fp32
// accumulation, through ATen's cpublas wrappers (the same ones torch's own CPU flash attention
// calls). The float32 tile kernel above runs at ~50% of the FMA peak; AMX does ~8× more bf16
// products per cycle, so softmax and masking, in fp32, become most of the work. What this
// changes numerically is what torch's bf16 kernel also does: P is rounded to bf16 before P·V.
//
// Scores are held row-major here (queries × keys): brgemm writes whole tiles, and the masks are
// applied per query row from the same Spans the transposed kernel uses.
constexpr int64_t kAmxBlockQ = 64;
// Keys per tile: large, so that the per-row softmax bookkeeping (rescaling the accumulator,
// the running max and sum) is paid once per 256 keys; scores are computed over the whole
// 64-key chunks some query of the block may see, skipping the others.
constexpr int64_t kAmxBlockK = 256;
constexpr int64_t kAmxChunk = 64;

// Short key sequences take one block of their length (in whole chunks) instead of padding to 256.
int64_t amx_key_block(const Dims& d) {
  return std::min(kAmxBlockK, (d.Lk + kAmxChunk - 1) / kAmxChunk * kAmxChunk);
}

// Right operands with a head dim E as their N are packed E rounded up to a multiple of 32 wide
// (the accumulators are that wide), so one brgemm call covers all of N (measured 2–8 % faster
// than calls over chunks of 64 columns).
int64_t amx_width(int64_t E) { return (E + 31) / 32 * 32; }

bool amx_usable(const Dims& d) {
  if (!bf16_tiles_supported() || d.D % 2 || d.Dv % 2) return false;
  const char* env = std::getenv("SEQKERN_ATTENTION_AMX");  // "0": the fp32 tile kernels
  return !(env && env[0] == '0');
}

// Whether the row-wise decode kernels take these queries; the backward must take them exactly
// when the forward did, to recompute its scores. Measured with 2 threads, D = 64, fp32: 8 queries
// against a 4096-token cache (B = 2, H = 16) forward 2.9 ms against the tile kernel's 4.3 (its
// 16-query vectors half empty), forward+backward 23 ms both; self-attention at L = 8 (B = 256,
// H = 8) forward+backward 6.3 against 15.1 ms; at 16 queries the tile kernel is ahead. With AMX,
// bf16 at 5–32 queries has its own kernel (forward_kernel_bf16_few), except under an explicit
// mask: the decode kernels skip the keys it rules out, where a preallocated cache may hold NaN,
// while tile products take 0·NaN from such rows (forward and backward alike).
// bf16 inference (no float32 output kept for a backward) takes forward_kernel_bf16_few from 5
// queries under an explicit mask too: it keeps V rows holding NaN/inf away from the queries
// that give them weight 0, as the row-wise kernels do.
bool use_decode(const Dims& d, at::ScalarType t, bool explicit_mask, bool inference = false) {
  if (d.Lq <= kDecodeRows) return true;
  const bool bf16_tiles = t == at::kBFloat16 && amx_usable(d);
  return d.Lq <= kDecodeRowsMax && (!bf16_tiles || (explicit_mask && !inference));
}

// Row-major score tiles (the bf16 kernels): with an explicit mask, scores [lo, hi) of query i
// (keys j0 + lo …) become scale·s + mask, or -inf where a bool mask forbids, and the factor
// left to apply is 1; without one they are left raw and the factor is `scale`.
inline float apply_explicit_mask_row(const Mask<float>& mask, int64_t b, int64_t h, int64_t i,
                                     int64_t j0, int64_t lo, int64_t hi, float scale, float* s) {
  if (!mask.has_explicit()) return scale;
  using V = Vec<float>;
  if (mask.sk == 1) {  // the mask row runs along the keys: a vector of keys at a time
    const int64_t base = mask.at(b, h, i, j0);
    for_each_vec<float>(hi - lo, [&](int64_t o, int64_t n) {
      const int64_t c = lo + o;
      const V x = load(s + c, n) * V(scale);
      if (mask.amask) return store(x + load(mask.amask + base + c, n), s + c, n);
#if defined(CPU_CAPABILITY_AVX512)
      const auto allowed = static_cast<__mmask16>(allowed_bits(mask.bmask + base + c, n));
      store(V(_mm512_mask_blend_ps(allowed, V(neg_inf<float>()), x)), s + c, n);
#else
      float t[V::size()];
      x.store(t, n);
      for (int64_t e = 0; e < n; ++e) s[c + e] = mask.bmask[base + c + e] ? t[e] : neg_inf<float>();
#endif
    });
    return 1.0f;
  }
  for (int64_t c = lo; c < hi; ++c) {
    const int64_t idx = mask.at(b, h, i, j0 + c);
    s[c] = mask.bmask ? (mask.bmask[idx] ? s[c] * scale : neg_inf<float>())
                      : s[c] * scale + mask.amask[idx];
  }
  return 1.0f;
}

// src (B, H, L, E) bf16 packed block by block: out (B, H, nb, block_size), where
// pack_block(rows, ld, n, dst) writes the block of BL rows starting at `rows` (n of them valid,
// the rest zero). With `lens` (per batch: key lengths), rows past lens[b] are left out as well:
// a KV cache may hold anything there, and the chunk-wide products would take 0·inf = NaN from it.
template <typename F>
at::Tensor pack_blocks(const at::Tensor& src, int64_t BL, int64_t block_size, F pack_block,
                       const int64_t* lens = nullptr) {
  using bf16 = c10::BFloat16;
  const int64_t B = src.size(0), H = src.size(1), L = src.size(2);
  const int64_t nb = (L + BL - 1) / BL;
  at::Tensor out = empty_large({B, H, nb, block_size}, src.options());
  const Strides ss(src);
  const bf16* S = src.data_ptr<bf16>();
  bf16* O = out.data_ptr<bf16>();
  at::parallel_for(0, B * H * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % nb, h = (t / nb) % H, b = t / (nb * H);
      const int64_t valid = lens ? std::clamp<int64_t>(lens[b], 0, L) : L;
      const int64_t n = std::clamp<int64_t>(valid - blk * BL, 0, BL);
      pack_block(S + ss.at(b, h, blk * BL), ss.l, n, O + t * block_size);
    }
  });
  return out;
}

// src (B, H, L, E) bf16, E even, as brgemm right operands srcᵀ: per (batch, head, block of BL
// rows), chunks of CL rows, each the VNNI form of its E × CL transpose (rows past L zero). For
// S = Q·Kᵀ (src = K) and dP = dO·Vᵀ (src = V).
at::Tensor pack_transposed_blocks(const at::Tensor& src, int64_t BL, int64_t CL,
                                  const int64_t* lens = nullptr) {
  const int64_t E = src.size(3);
  return pack_blocks(src, BL, E * BL, [&](const c10::BFloat16* rows, int64_t ld, int64_t n, c10::BFloat16* dst) {
    for (int64_t c = 0; c < BL; c += CL) {
      const int64_t m = std::clamp<int64_t>(n - c, 0, CL);
      pack_vnni_transposed(m > 0 ? rows + c * ld : rows, ld, m, E, CL, dst + c * E);
    }
  }, lens);
}

// src (B, H, L, E) bf16 as brgemm right operands themselves: per (batch, head, block of BL rows)
// the BL × amx_width(E) block in VNNI form (rows past L and columns past E zero). For P·V
// (src = V), dV += Pᵀ·dO, dK += dSᵀ·Q and dQ += dS·K.
at::Tensor pack_row_blocks(const at::Tensor& src, int64_t BL, const int64_t* lens = nullptr) {
  const int64_t E = src.size(3), Ep = amx_width(E);
  return pack_blocks(src, BL, BL * Ep, [&](const c10::BFloat16* rows, int64_t ld, int64_t n, c10::BFloat16* dst) {
    pack_vnni(rows, ld, n, E, BL, Ep, dst);
  }, lens);
}

// The largest of s[0 .. n) · sc (NaN ignored), -inf for none.
inline float row_max_scaled(const float* s, int64_t n, float sc) {
  using V = Vec<float>;
  const float ninf = neg_inf<float>();
  V vmax(ninf);
  for_each_vec<float>(n, [&](int64_t j, int64_t c) {
    const V x = load(s + j, c) * V(sc);
    vmax = max_no_nan(vmax, c == V::size() ? x : V::set(V(ninf), x, c));
  });
  return at::vec::vec_reduce_all<float>([](V x, V y) { return at::vec::maximum(x, y); }, vmax);
}

constexpr float kLazyRescale = 8.0f;

// Below this |shift| (the row max, or its log-sum-exp) an exponent s·(sc·log2 e) − shift·log2 e
// with both factors rounded to fp32 is off by at most ~1e-4 where the weights are not ~0, far
// under bf16's rounding of them; above it (a row masked with a large finite constant: ~500 at
// 1e10, weights inf and the output NaN) the kernels take (s·sc − shift)·log2 e, exactly
// rounded, for one more multiply per score.
constexpr float kFastShift = 1024.0f;

// p[j] = bf16(exp(s[j]·sc − m) · keep[j]) for j < n (keep null: 1); sum = Σ exp(s[j]·sc − m)
// (before dropout), max = the largest s[j]·sc. The exponent s·sc − m is taken in base 2 with
// one FMA (exp2_weights), and P goes out in bf16 straight from registers.
template <bool kExact>
SEQKERN_INLINE void exp_row_to_bf16_impl(const float* s, int64_t n, float sc, float m,
                                         const float* keep, c10::BFloat16* p, float& sum_out,
                                         float& max_out) {
  using V = Vec<float>;
  constexpr int64_t W = V::size();
  const float ninf = neg_inf<float>();
  const V c2(kExact ? sc : sc * kLog2e), m2(kExact ? m : m * kLog2e), l2e(kLog2e);
  V sum(0.0f), vmax(ninf);
  auto part = [&](int64_t j, int64_t c, V& e) __attribute__((always_inline)) {
    V y = at::vec::fmsub(load(s + j, c), c2, m2);
    if constexpr (kExact) y = y * l2e;
    if (c < W) y = V::set(V(ninf), y, c);  // lanes past the row: weight 0
    vmax = max_no_nan(vmax, y);
    e = exp2_weights(y);
    sum = sum + e;
    if (keep) e = e * load(keep + j, c);
  };
  for (int64_t j = 0; j < n; j += 2 * W) {
    const int64_t c = std::min(2 * W, n - j), c0 = std::min(W, c), c1 = c - c0;
    V e0, e1(0.0f);
    part(j, c0, e0);
    if (c1 > 0) part(j + W, c1, e1);
    store_bf16_pair(e0, e1, p + j, c);
  }
  sum_out = at::vec::vec_reduce_all<float>([](V x, V y) { return x + y; }, sum);
  const float ymax = at::vec::vec_reduce_all<float>([](V x, V y) { return at::vec::maximum(x, y); }, vmax);
  max_out = ymax * kLn2 + m;  // back to the natural units of m (-inf stays -inf)
}
SEQKERN_INLINE void exp_row_to_bf16(const float* s, int64_t n, float sc, float m,
                                    const float* keep, c10::BFloat16* p, float& sum_out,
                                    float& max_out) {
  if (std::abs(m) < kFastShift) exp_row_to_bf16_impl<false>(s, n, sc, m, keep, p, sum_out, max_out);
  else exp_row_to_bf16_impl<true>(s, n, sc, m, keep, p, sum_out, max_out);
}

// Whether n bf16 values are all finite (no exponent of all ones).
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

// A VNNI-packed right operand (pairs of rows interleaved, N columns) of n rows (even) copied
// with its rows outside [lo, hi) zero.
inline void vnni_rows_within(const c10::BFloat16* src, int64_t N, int64_t n, int64_t lo,
                             int64_t hi, c10::BFloat16* out) {
  for (int64_t k = 0; k < n; k += 2) {
    const bool keep0 = k >= lo && k < hi, keep1 = k + 1 >= lo && k + 1 < hi;
    const auto* w = reinterpret_cast<const uint32_t*>(src + k * N);
    auto* o = reinterpret_cast<uint32_t*>(out + k * N);
    const uint32_t m = (keep0 ? 0x0000FFFFu : 0u) | (keep1 ? 0xFFFF0000u : 0u);
    for (int64_t c = 0; c < N; ++c) o[c] = w[c] & m;  // (vectorised by the compiler)
  }
}

// acc (+)= A[:, a..e)·B[a..e) for the 32-row chunks [a, e) of B (VNNI, N columns) that hold
// rows [lo, hi), the only rows A's columns weight: chunks wholly outside are skipped and B's
// rows outside [lo, hi) in the edge chunks read as zero (copied into `edge`, 32·N). Those are
// keys no query of the tile may see, whose K or V rows may hold NaN or inf (a cache slot never
// written), and a tile product would take 0·NaN from them.
inline void tile_product_within(int64_t M, int64_t N, const c10::BFloat16* A, int64_t lda,
                                const c10::BFloat16* B, int64_t lo, int64_t hi, float* C,
                                int64_t ldc, c10::BFloat16* edge) {
  constexpr int64_t CH = 32;
  const int64_t a = lo / CH * CH, e = (hi + CH - 1) / CH * CH;
  // Rows as usual all finite (their pairs [a, lo) and [hi, e) checked): one product over
  // [a, e), A's columns there being 0. (A window's tiles have two edge chunks each.)
  const int64_t p0 = lo / 2 * 2, p1 = (hi + 1) / 2 * 2;
  if (all_finite(B + a * N, (p0 - a) * N) && all_finite(B + p1 * N, (e - p1) * N) &&
      (p0 == lo || all_finite(B + p0 * N, 2 * N)) && (p1 == hi || all_finite(B + (p1 - 2) * N, 2 * N))) {
    bf16_tile_product(M, N, e - a, lda, N, ldc, true, A + a, B + a * N, C);
    return;
  }
  for (int64_t c = a; c < hi;) {
    if (c >= lo && c + CH <= hi) {  // a run of whole chunks
      const int64_t c1 = c + (hi - c) / CH * CH;
      bf16_tile_product(M, N, c1 - c, lda, N, ldc, true, A + c, B + c * N, C);
      c = c1;
      continue;
    }
    vnni_rows_within(B + c * N, N, CH, lo - c, hi - c, edge);
    bf16_tile_product(M, N, CH, lda, N, ldc, true, A + c, edge, C);
    c += CH;
  }
}

// q, k, v bf16 with the last dimension contiguous; out (bf16, or float32 when the caller keeps
// the unrounded output for the backward) and lse as in forward_kernel.
// More than 32 queries: fewer take forward_kernel_bf16_few below, whose P stays in fp32 (with P
// rounded to bf16, a peaked row's dS = P ⊙ (dP − Δ), Δ = rowsum(dO ⊙ O), kept the rounding: bf16
// dK was 4× less accurate than torch's at Lq = 5, where torch takes its exact math path).
void forward_kernel_bf16_amx(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                             const at::Tensor& v_, float scale, const Mask<float>& mask,
                             const Dropout& drop, at::Tensor& out, at::Tensor& lse) {
  using bf16 = c10::BFloat16;
  constexpr int64_t BQ = kAmxBlockQ, CK = kAmxChunk;
  const int64_t BK = amx_key_block(d);
  const int64_t nqb = (d.Lq + BQ - 1) / BQ, nkb = (d.Lk + BK - 1) / BK;
  // K and V of every (batch, kv head, key block), packed once per call and shared by every
  // query block and every query head of the group
  const at::Tensor kp = pack_transposed_blocks(k_, BK, BK, mask.key_len),
                   vp = pack_row_blocks(v_, BK, mask.key_len);
  const int64_t Dvp = amx_width(d.Dv);
  const bf16 *KP = kp.data_ptr<bf16>(), *VP = vp.data_ptr<bf16>();
  const Strides sq(q_);
  const bf16* Q = q_.data_ptr<bf16>();
  float* O32 = out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  bf16* O = O32 ? nullptr : out.data_ptr<bf16>();
  double* LSE = lse.data_ptr<double>();
  const int64_t g = d.group();
  const float ninf = neg_inf<float>();

  at::parallel_for(0, d.B * d.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(BQ * BK), acc(BQ * Dvp), mx(BQ), sm(BQ), keep(drop.active ? BK : 0);
    std::vector<bf16> P(BQ * BK), edge(32 * Dvp);
    uint32_t rk_lo[BQ] = {}, rk_hi[BQ] = {};
    Span rows[BQ], cols[kAmxBlockK];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb, h = (task / nqb) % d.Hq, b = task / (nqb * d.Hq);
      const int64_t hk = h / g, i0 = qb * BQ, mi = std::min(BQ, d.Lq - i0);
      const bf16* q = Q + sq.at(b, h, i0);
      std::fill(acc.begin(), acc.begin() + mi * Dvp, 0.0f);
      std::fill(mx.begin(), mx.end(), ninf);
      std::fill(sm.begin(), sm.end(), 0.0f);
      if (drop.active) drop.row_keys(b, h, d.Hq, d.Lq, i0, mi, rk_lo, rk_hi);
      const Span keys = block_keys(mask, b, i0, mi);
      for (int64_t j0 = keys.lo / BK * BK; j0 < keys.hi; j0 += BK) {
        const int64_t nk = std::min(BK, d.Lk - j0);
        if (!tile_setup(mask, b, h, i0, mi, j0, nk, rows, cols)) continue;
        const int64_t kb = j0 / BK, blk = (b * d.Hkv + hk) * nkb + kb;
        // the chunks of keys [klo, khi) that some query of the block may see
        const Span used = union_rows(rows, 0, mi, CK);
        const int64_t klo = used.lo, khi = (used.hi + CK - 1) / CK * CK;
        // Kᵀ of the block is one VNNI matrix (ldb = BK): its columns [klo, khi) start 2·klo in
        bf16_tile_product(mi, khi - klo, d.D, sq.l, BK, BK, false, q,
                          KP + blk * d.D * BK + 2 * klo, S.data() + klo);
        for (int64_t r = 0; r < mi; ++r) {
          const float* s = S.data() + r * BK;
          bf16* p = P.data() + r * BK;
          if (rows[r].empty()) {  // (a window and a key length can leave lo > hi)
            std::fill(p + klo, p + khi, bf16(0.0f));
            continue;
          }
          const int64_t lo = rows[r].lo, hi = rows[r].hi;  // within [klo, khi)
          // Without an explicit mask the scale is applied on the fly, saving a store per score.
          const float sc = apply_explicit_mask_row(mask, b, h, i0 + r, j0, lo, hi, scale, S.data() + r * BK);
          std::fill(p + klo, p + lo, bf16(0.0f));
          std::fill(p + hi, p + khi, bf16(0.0f));
          // Lazy rescaling: exponents are taken against the row's reference max m, which only
          // moves when a tile's max exceeds it by more than kLazyRescale (then that tile is
          // redone). So a row pays one pass per tile, not a max pass and then an exp pass, and
          // the accumulator is rescaled rarely. Weights up to e^kLazyRescale are exact in fp32
          // and in bf16's range; the first tile a row sees sets m from its true max.
          float m = mx[r];
          if (m == ninf) {
            m = row_max_scaled(s + lo, hi - lo, sc);
            if (m == ninf) {  // nothing allowed yet for this row
              std::fill(p + lo, p + hi, bf16(0.0f));
              continue;
            }
          }
          const float* kp = nullptr;
          if (drop.active) {  // the normaliser is over the weights before dropout
            keep_along_row(Dropout::RowKey{rk_lo[r], rk_hi[r]}, j0 + lo, hi - lo, drop.threshold, keep.data());
            kp = keep.data();
          }
          float rsum, rmax;
          exp_row_to_bf16(s + lo, hi - lo, sc, m, kp, p + lo, rsum, rmax);
          float alpha = 1.0f;
          if (rmax > m + kLazyRescale) {
            alpha = std::exp(m - rmax);
            m = rmax;
            exp_row_to_bf16(s + lo, hi - lo, sc, m, kp, p + lo, rsum, rmax);
          }
          if (mx[r] == ninf) alpha = 0.0f;  // first tile: nothing to rescale
          sm[r] = sm[r] * alpha + rsum;
          mx[r] = m;
          if (alpha != 1.0f) scale_row(acc.data() + r * Dvp, d.Dv, alpha);
        }
        // V is packed as pairs of key rows, so key c starts c·Dvp elements in
        const Span seen = union_rows(rows, 0, mi, 1);
        tile_product_within(mi, Dvp, P.data(), BK, VP + blk * BK * Dvp, seen.lo, seen.hi,
                            acc.data(), Dvp, edge.data());
      }
      write_output_rows_bf16(mi, d.Dv, acc.data(), Dvp, sm.data(), mx.data(),
                             static_cast<float>(drop.keep_scale), O, O32,
                             ((b * d.Hq + h) * d.Lq + i0) * d.Dv, LSE + (b * d.Hq + h) * d.Lq + i0);
    }
    bf16_tile_release();
  });
}

// ---- bf16 with a few queries (kDecodeRows < Lq ≤ 32): Sᵀ on brgemm with K read in place ----
//
// With few queries, forward_kernel_bf16_amx spends most of its time packing: all of K is
// transposed into VNNI blocks (and V paired) for products whose other side is a few rows (0.6×
// torch's speed at 5–15 queries against 4096 keys). Transposed, the score product needs no
// packing of K: Sᵀ = K_j·Qᵀ takes K's rows in place as brgemm's left operand and Qᵀ (D × the
// queries rounded up to whole vectors, packed once per head) as its right. The softmax then runs
// down the columns as in forward_kernel, and P·V is the fp32 micro-kernel over the V tile
// widened to fp32, with P in fp32 (accurate enough for peaked rows' gradients, see
// forward_kernel_bf16_amx). That product grows with the rows, hence the bound: at 24–31
// queries the path is still ~1.2× faster than the packing one.
// Inference (a bf16 output, no backward to serve) rounds P to bf16 as torch's kernels do and
// runs P·V on bf16 tiles too: Pᵀ transposed into rows of P, V paired into VNNI form per tile.
constexpr int64_t kFewBlockK = 128;
constexpr int64_t kFewRowsMax = 32;

inline bool bf16_few_queries(const Dims& d, bool explicit_mask, bool inference) {
  return d.Lq <= kFewRowsMax && !use_decode(d, at::kBFloat16, explicit_mask, inference) &&
         amx_usable(d);
}

void forward_kernel_bf16_few(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                             const at::Tensor& v_, float scale, const Mask<float>& mask,
                             const Dropout& drop, at::Tensor& out, at::Tensor& lse) {
  using bf16 = c10::BFloat16;
  constexpr int64_t W = Vec<float>::size(), BK = kFewBlockK;
  const int64_t BQ = (d.Lq + W - 1) / W * W;  // query lanes: whole vectors
  TORCH_INTERNAL_ASSERT(BQ <= kFewRowsMax);
  const Strides sq(q_), sk(k_), sv(v_);
  const bf16 *Q = q_.data_ptr<bf16>(), *K = k_.data_ptr<bf16>(), *Vb = v_.data_ptr<bf16>();
  float* O32 = out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  bf16* O = O32 ? nullptr : out.data_ptr<bf16>();
  double* LSE = lse.data_ptr<double>();
  const int64_t g = d.group(), mi = d.Lq;
  const int64_t k_row_bytes = d.D * int64_t(sizeof(bf16)), v_row_bytes = d.Dv * int64_t(sizeof(bf16));
  // P·V on bf16 tiles (inference), its operands padded to whole tiles: P's rows BQ, V's columns
  // Dvp, keys (the product's K) tm.k.
  // (not at ≤ 8 queries: the fp32 product over 8 rows costs less than packing for the tiles)
  const bool pv_tiles = O32 == nullptr && d.Lq > kDecodeRowsMax;
  const TileMultiples tm = bf16_tile_multiples();
  const int64_t Dvp = pv_tiles ? amx_width(d.Dv) : d.Dv;  // acc's row stride

  at::parallel_for(0, d.B * d.Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> QT(d.D * BQ);
    std::vector<float> ST(BK * BQ), VT(pv_tiles ? 0 : BK * d.Dv), acc(BQ * Dvp), mx(BQ), sm(BQ);
    std::vector<float> PT(pv_tiles ? BQ * BK : 0);
    std::vector<bf16> P(pv_tiles ? BQ * BK : 0), VP(pv_tiles ? BK * Dvp : 0);
    std::vector<float> keep(drop.active ? BK * BQ : 0);
    uint32_t rk_lo[kFewRowsMax] = {}, rk_hi[kFewRowsMax] = {};
    Span rows[kFewRowsMax], cols[BK];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task % d.Hq, b = task / d.Hq, hk = h / g;
      const bf16* kbase = K + sk.at(b, hk);
      const bf16* vbase = Vb + sv.at(b, hk);
      pack_vnni_transposed(Q + sq.at(b, h, 0), sq.l, mi, d.D, BQ, QT.data());
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(mx.begin(), mx.end(), neg_inf<float>());
      std::fill(sm.begin(), sm.end(), 0.0f);
      if (drop.active) drop.row_keys(b, h, d.Hq, d.Lq, 0, mi, rk_lo, rk_hi);
      const Span keys = block_keys(mask, b, 0, mi);
      for (int64_t j0 = keys.lo / BK * BK; j0 < keys.hi; j0 += BK) {
        const int64_t nk = std::min(BK, d.Lk - j0);
        // The next tile's K and V into L2 while this one computes: each key is read once, in
        // order. Spread over this tile's per-key loops, a row or two at a time: issued all at
        // once before the tile, the 2·128 rows' prefetches filled the miss queue and stalled
        // there (a third of this function's time at 8 queries against 4096 keys).
        const int64_t next_hi = std::min(j0 + 2 * BK, keys.hi);
        auto prefetch_next = [&](const bf16* base, int64_t ld, int64_t row_bytes, int64_t c) {
          const int64_t j = j0 + BK + c;
          if (j >= next_hi) return;
          const char* r = reinterpret_cast<const char*>(base + j * ld);
          for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(r + o, _MM_HINT_T1);
        };
        // A V row holding NaN or inf (a cache slot never written, ruled out for some queries
        // by a mask) reaches only the queries that weight it, as in the row-wise kernels: it is
        // zero in the product (zero_row) and added by hand where the weight is not 0.
        auto isolate_nonfinite = [&](int64_t c, auto&& zero_row) {
          const bf16* vr = vbase + (j0 + c) * sv.l;
          if (all_finite(vr, d.Dv)) return;
          zero_row();
          for (int64_t r = 0; r < mi; ++r) {
            const float w = ST[c * BQ + r];
            if (w != 0.0f)
              for (int64_t e = 0; e < d.Dv; ++e) acc[r * Dvp + e] += w * static_cast<float>(vr[e]);
          }
        };
        if (!tile_setup(mask, b, h, 0, mi, j0, nk, rows, cols)) continue;
        // keys [klo, khi) some query may see; the others are -inf'd by mask_tile_t
        const Span used = union_rows(rows, 0, mi, 1);
        const int64_t klo = used.lo, khi = used.hi;
        bf16_tile_product(khi - klo, BQ, d.D, sk.l, BQ, BQ, false,
                          kbase + (j0 + klo) * sk.l, QT.data(), ST.data() + klo * BQ);
        for (int64_t c = 0; c < nk; ++c) {
          if (c >= klo && c < khi) scale_row(ST.data() + c * BQ, BQ, scale);
          prefetch_next(kbase, sk.l, k_row_bytes, c);
        }
        mask_tile_t(mask, b, h, 0, j0, nk, BQ, cols, ST.data(), BQ, neg_inf<float>(),
                    mask.has_explicit());
        if (drop.active)
          for (int64_t c = 0; c < nk; ++c)
            keep_down_column(rk_lo, rk_hi, BQ, j0 + c, drop.threshold, keep.data() + c * BQ);
        softmax_columns<float>(ST.data(), BQ, nk, BQ, mi, drop.active ? keep.data() : nullptr,
                               mx.data(), sm.data(), acc.data(), Dvp);
        if (pv_tiles) {
          // keys [klo, khi) as the product's k = 0 .. kk; past khi, zeros in P and in V (a
          // key outside [klo, khi) is ruled out for every query, and its V row may hold
          // anything)
          const int64_t n = khi - klo, kk = (n + tm.k - 1) / tm.k * tm.k;
          transpose<float>(ST.data() + klo * BQ, BQ, PT.data(), BK, n, BQ);
          for (int64_t r = 0; r < BQ; ++r) {
            round_to_bf16(PT.data() + r * BK, P.data() + r * BK, n);
            std::fill(P.data() + r * BK + n, P.data() + r * BK + kk, bf16(0.0f));
          }
          pack_vnni(vbase + (j0 + klo) * sv.l, sv.l, n, d.Dv, kk, Dvp, VP.data());
          for (int64_t c = 0; c < nk; ++c) prefetch_next(vbase, sv.l, v_row_bytes, c);
          for (int64_t c = 0; c < n; ++c)
            isolate_nonfinite(klo + c, [&] {
              for (int64_t e = 0; e < d.Dv; ++e) VP[(c / 2) * 2 * Dvp + 2 * e + c % 2] = bf16(0.0f);
            });
          bf16_tile_product(BQ, Dvp, kk, BK, Dvp, Dvp, true, P.data(), VP.data(), acc.data());
          continue;
        }
        for (int64_t c = 0; c < nk; ++c) {
          // (at::vec::convert widens 8 values at a time)
          if (c >= klo && c < khi) {
            widen_row(vbase + (j0 + c) * sv.l, VT.data() + c * d.Dv, d.Dv);
            isolate_nonfinite(c, [&] { std::fill_n(VT.data() + c * d.Dv, d.Dv, 0.0f); });
          }
          prefetch_next(vbase, sv.l, v_row_bytes, c);
        }
        tile_gemm_impl<float>(mi, nk, ST.data(), 1, BQ, VT.data(), d.Dv, acc.data(), d.Dv, true,
                              [&](int64_t r0, int64_t r1) {
                                return std::pair<Span, Span>{Span{0, d.Dv}, union_rows(rows, r0, r1, 1)};
                              });
      }
      write_output_rows_bf16(mi, d.Dv, acc.data(), Dvp, sm.data(), mx.data(),
                             static_cast<float>(drop.keep_scale), O, O32,
                             (b * d.Hq + h) * d.Lq * d.Dv, LSE + (b * d.Hq + h) * d.Lq);
    }
    bf16_tile_release();
  });
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
// Backward of the bf16 forwards above on brgemm tiles, for key/value head hk of batch b
// and query heads [h_begin, h_end) of its group (as backward_kernel, whose equations these
// are). Per (query block i, key block j) of 64 × 64:
//   S = Qᵢ·Kⱼᵀ and dP = dOᵢ·Vⱼᵀ (bf16 products, fp32 tiles), P and dS in fp32 from them,
//   then P and dS rounded to bf16 as operands of dVⱼ += Pᵀ·dOᵢ, dKⱼ += dSᵀ·Qᵢ, dQᵢ += dS·Kⱼ.
// Pᵀ and dSᵀ are transposed copies of the bf16 tiles; every right operand is packed once per
// call. dq is (B, Hq, Lq, amx_width(D)) fp32, unscaled, accumulated in place (each query head
// belongs to one task); dk, dv as in backward_kernel.
void backward_kernel_bf16_amx(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                              const at::Tensor& v_, const at::Tensor& do_, const at::Tensor& lse_,
                              const at::Tensor& delta_, const Mask<float>& mask,
                              const Dropout& drop, const MaskGrad<float>& mgrad, float scale,
                              int64_t chunks, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using V = Vec<float>;
  using bf16 = c10::BFloat16;
  constexpr int64_t BQ = kAmxBlockQ, BK = kAmxChunk;
  const int64_t nqb = (d.Lq + BQ - 1) / BQ, nkb = (d.Lk + BK - 1) / BK;
  const int64_t Dp = amx_width(d.D), Dvp = amx_width(d.Dv);
  // (keys past a batch's key length are packed as zeros: see pack_blocks)
  const at::Tensor kt = pack_transposed_blocks(k_, BK, BK, mask.key_len),
                   vt = pack_transposed_blocks(v_, BK, BK, mask.key_len);
  const at::Tensor kr = pack_row_blocks(k_, BK, mask.key_len), qr = pack_row_blocks(q_, BQ),
                   dor = pack_row_blocks(do_, BQ);
  const bf16 *KT = kt.data_ptr<bf16>(), *VT = vt.data_ptr<bf16>(), *KR = kr.data_ptr<bf16>(),
             *QR = qr.data_ptr<bf16>(), *DOR = dor.data_ptr<bf16>();
  const Strides sq(q_), so(do_);
  const bf16 *Q = q_.data_ptr<bf16>(), *DO = do_.data_ptr<bf16>();
  const double* LSE = lse_.data_ptr<double>();
  const float* DELTA = delta_.data_ptr<float>();
  float *DQ = dq.data_ptr<float>(), *DK = dk.data_ptr<float>(), *DV = dv.data_ptr<float>();
  const float ninf = neg_inf<float>();
  // Each row's weights are exp2(s·(sc·log2 e) − lse·log2 e) below kFastShift, else
  // exp2((s·sc − hi)·log2 e − lo·log2 e) with hi + lo = lse (split_lse); the shifts are split
  // once per row here, not once per key block (a per-row cost in the innermost loop).
  struct RowShift {
    float shift, lo2;
    bool exact;
  };
  std::vector<RowShift> shifts(d.B * d.Hq * d.Lq);
  at::parallel_for(0, d.B * d.Hq * d.Lq, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float hi, lo;
      split_lse(LSE[t], hi, lo);
      const bool exact = !(std::abs(LSE[t]) < kFastShift);
      shifts[t] = RowShift{exact ? hi : static_cast<float>(LSE[t] * kLog2e),
                           static_cast<float>(lo * kLog2e), exact};
    }
  });

  at::parallel_for(0, d.B * d.Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(BQ * BK), dP(BQ * BK), dk_loc(BK * Dp), dv_loc(BK * Dvp), keep(BK);
    std::vector<bf16> Pb(BQ * BK), dSb(BQ * BK), PbT(BK * BQ), dSbT(BK * BQ), edge(32 * Dp);
    uint32_t rk_lo[BQ] = {}, rk_hi[BQ] = {};
    float* const mg = mgrad.data ? mgrad.target() : nullptr;
    Span rows[BQ], cols[BK];
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, hk, h_begin, h_end, acc_row] = KvTask(d, chunks, task);
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t j0 = kb * BK, nk = std::min(BK, d.Lk - j0), nkp = (nk + 1) / 2 * 2;
        const int64_t kblk = (b * d.Hkv + hk) * nkb + kb;
        std::fill(dk_loc.begin(), dk_loc.end(), 0.0f);
        std::fill(dv_loc.begin(), dv_loc.end(), 0.0f);
        for (int64_t h = h_begin; h < h_end; ++h) {
          for (int64_t qb = 0; qb < nqb; ++qb) {
            const int64_t i0 = qb * BQ, mi = std::min(BQ, d.Lq - i0), mip = (mi + 1) / 2 * 2;
            const Span keys = block_keys(mask, b, i0, mi);
            if (keys.hi <= j0 || keys.lo >= j0 + nk) continue;
            if (!tile_setup(mask, b, h, i0, mi, j0, nk, rows, cols)) continue;
            const int64_t qblk = (b * d.Hq + h) * nqb + qb;
            const double* l = LSE + (b * d.Hq + h) * d.Lq + i0;
            const float* dl = DELTA + (b * d.Hq + h) * d.Lq + i0;
            bf16_tile_product(mi, BK, d.D, sq.l, BK, BK, false, Q + sq.at(b, h, i0),
                              KT + kblk * d.D * BK, S.data());
            bf16_tile_product(mi, BK, d.Dv, so.l, BK, BK, false, DO + so.at(b, h, i0),
                              VT + kblk * d.Dv * BK, dP.data());
            if (drop.active) drop.row_keys(b, h, d.Hq, d.Lq, i0, mi, rk_lo, rk_hi);
            for (int64_t r = 0; r < mip; ++r) {
              float* s = S.data() + r * BK;
              float* dp = dP.data() + r * BK;
              const int64_t lo = r < mi ? rows[r].lo : 0, hi = r < mi ? rows[r].hi : 0;
              if (hi <= lo || l[r] == ninf) {  // nothing allowed: P = dS = 0
                std::fill(Pb.data() + r * BK, Pb.data() + (r + 1) * BK, bf16(0.0f));
                std::fill(dSb.data() + r * BK, dSb.data() + (r + 1) * BK, bf16(0.0f));
                continue;
              }
              const float sc = apply_explicit_mask_row(mask, b, h, i0 + r, j0, lo, hi, scale, s);
              if (drop.active) keep_along_row(Dropout::RowKey{rk_lo[r], rk_hi[r]}, j0 + lo, hi - lo, drop.threshold, keep.data());
              const RowShift rs = shifts[(b * d.Hq + h) * d.Lq + i0 + r];
              const bool exact = rs.exact;
              const V c2(exact ? sc : sc * kLog2e), s2(rs.shift), lo2(rs.lo2), l2e(kLog2e),
                  dlv(dl[r]), ks(static_cast<float>(drop.keep_scale));
              auto weights = [&](auto exact_tag) {
                for_each_vec<float>(hi - lo, [&](int64_t j, int64_t n) {
                  V p = at::vec::fmsub(load(s + lo + j, n), c2, s2);
                  if constexpr (decltype(exact_tag)::value) p = at::vec::fmsub(p, l2e, lo2);
                  p = exp2_weights(p);
                  if (drop.active) {
                    const V z = load(keep.data() + j, n) * ks;
                    store(p * z, s + lo + j, n);
                    store(p * at::vec::fmsub(load(dp + lo + j, n), z, dlv), dp + lo + j, n);
                  } else {
                    store(p, s + lo + j, n);
                    store(p * (load(dp + lo + j, n) - dlv), dp + lo + j, n);
                  }
                });
              };
              if (exact) weights(std::true_type{});
              else weights(std::false_type{});
              std::fill(s, s + lo, 0.0f);
              std::fill(s + hi, s + BK, 0.0f);
              std::fill(dp, dp + lo, 0.0f);
              std::fill(dp + hi, dp + BK, 0.0f);
              if (mg) {
                float* gr = mg + b * mgrad.sb + h * mgrad.sh + (i0 + r) * mgrad.sq + j0 * mgrad.sk;
                for (int64_t cc = lo; cc < hi; ++cc) gr[cc * mgrad.sk] += dp[cc];
              }
              round_to_bf16(s, Pb.data() + r * BK, BK);
              round_to_bf16(dp, dSb.data() + r * BK, BK);
            }
            // Pᵀ and dSᵀ (keys × queries) as the left operands of the key-side products
            for (int64_t r = 0; r < mip; r += 32)
              for (int64_t cc = 0; cc < nk; cc += 32) {
                const int m = static_cast<int>(std::min<int64_t>(32, mip - r));
                const int n = static_cast<int>(std::min<int64_t>(32, nk - cc));
                at::vec::transpose_mxn<bf16>(Pb.data() + r * BK + cc, BK, PbT.data() + cc * BQ + r, BQ, m, n);
                at::vec::transpose_mxn<bf16>(dSb.data() + r * BK + cc, BK, dSbT.data() + cc * BQ + r, BQ, m, n);
              }
            bf16_tile_product(nk, Dvp, mip, BQ, Dvp, Dvp, true, PbT.data(),
                              DOR + qblk * BQ * Dvp, dv_loc.data());
            bf16_tile_product(nk, Dp, mip, BQ, Dp, Dp, true, dSbT.data(),
                              QR + qblk * BQ * Dp, dk_loc.data());
            float* dqr = DQ + ((b * d.Hq + h) * d.Lq + i0) * Dp;
            const Span seen = union_rows(rows, 0, mi, 1);
            if (seen.lo == 0 && seen.hi == nk)
              bf16_tile_product(mi, Dp, nkp, BK, Dp, Dp, true, dSb.data(), KR + kblk * BK * Dp, dqr);
            else  // (K rows no query of the tile sees may hold NaN)
              tile_product_within(mi, Dp, dSb.data(), BK, KR + kblk * BK * Dp, seen.lo, seen.hi,
                                  dqr, Dp, edge.data());
          }
        }
        float* dkd = DK + (acc_row * d.Lk + j0) * d.D;
        float* dvd = DV + (acc_row * d.Lk + j0) * d.Dv;
        for (int64_t r = 0; r < nk; ++r) {
          for_each_vec<float>(d.D, [&](int64_t j, int64_t n) {
            store(load(dk_loc.data() + r * Dp + j, n) * V(scale), dkd + r * d.D + j, n);
          });
          std::copy(dv_loc.data() + r * Dvp, dv_loc.data() + r * Dvp + d.Dv, dvd + r * d.Dv);
        }
      }
    }
    bf16_tile_release();
  });
}

// f(S{}) for the storage type S of K and V: bf16 or fp16 where the inputs are (kernels
// computing in float32 read them as stored and widen them in cache), else the compute type T.
template <typename T, typename F>
void with_kv_type(at::ScalarType kv, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    if (kv == at::kBFloat16) return f(c10::BFloat16{});
    if (kv == at::kHalf) return f(c10::Half{});
  }
  TORCH_CHECK(kv == c10::CppTypeToScalarType<T>::value, "seqkern attention: ", kv,
              " K and V need float32 compute");
  f(T{});
}

// ------------------------------------------------------------------ backward ---------------

template <typename T>
SEQKERN_INLINE void backward_shift(const double* lse, int64_t n, Vec<T>& hi, Vec<T>& lo) {
  constexpr int64_t W = Vec<T>::size();
  T h[W], l[W];
  for (int64_t r = 0; r < W; ++r) split_lse(r < n ? lse[r] : neg_inf<double>(), h[r], l[r]);
  hi = Vec<T>::loadu(h);
  lo = Vec<T>::loadu(l);
}

// Gradients for key/value head hk of batch b from query heads [h_begin, h_end) of its group,
// key block by key block: dK_j, dV_j stay in local buffers while every query tile that may see
// block j is visited; dQ rows accumulate in dq (each query head belongs to one task).
//   Sᵀ = K_j·(scale·Qᵢ)ᵀ, Pᵀ = exp(Sᵀ − lse) (see split_lse), dPᵀ = V_j·dOᵢᵀ,
//   dSᵀ = Pᵀ ⊙ (dPᵀ − Δ),
//   dV_j += Pᵀ·dOᵢ, dK_j += dSᵀ·Qᵢ (·scale at the end), dQᵢ += dS·K_j (·scale at the end).
// Each query head belongs to one task, so the task prepares the query-side operands of its
// heads itself, just before it uses them: the transposed blocks (scale·Qᵢ)ᵀ and dOᵢᵀ, the rows
// Δ = rowsum(dO ⊙ O), and dQ zeroed, then scaled at the end. As separate passes over the whole
// tensors (three packs, a zero_ and a mul_) they were a fifth of the fp32 backward at L = 128,
// and wrote and re-read twice Q's size.
template <typename T, typename S = T>
void backward_kernel(const Dims& d, const at::Tensor& q_, const at::Tensor& k_,
                     const at::Tensor& v_, const at::Tensor& do_, const at::Tensor& o_,
                     const at::Tensor& lse_, const Mask<T>& mask, const Dropout& drop,
                     const MaskGrad<T>& mgrad, T scale, int64_t chunks, at::Tensor& dq,
                     at::Tensor& dk, at::Tensor& dv) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  constexpr int64_t BQ = kBlockQ;
  constexpr int64_t BK = kBlockK;
  const int64_t nqb = (d.Lq + BQ - 1) / BQ;
  const Strides sq(q_), sk(k_), sv(v_), so(do_), sout(o_);
  const T *Q = q_.data_ptr<T>(), *DO = do_.data_ptr<T>(), *O = o_.data_ptr<T>();
  const S *K = k_.data_ptr<S>(), *Vp = v_.data_ptr<S>();
  constexpr bool widen = !std::is_same_v<S, T>;
  const double* LSE = lse_.data_ptr<double>();
  T *DQ = dq.data_ptr<T>(), *DK = dk.data_ptr<T>(), *DV = dv.data_ptr<T>();
  const int64_t qt_size = nqb * d.D * BQ, dot_size = nqb * d.Dv * BQ;

  at::parallel_for(0, d.B * d.Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> QT, DOT, DELTA;  // the task's heads' query-side operands
    std::vector<T> PT(BK * BQ), dST(BK * BQ), dk_loc(BK * d.D), dv_loc(BK * d.Dv);
    std::vector<T> kbuf(widen ? BK * d.D : 0), vbuf(widen ? BK * d.Dv : 0);
    std::vector<T> keep(drop.active ? BK * BQ : 0);
    uint32_t rk_lo[BQ] = {}, rk_hi[BQ] = {};
    const V keep_scale{T(drop.keep_scale)};
    T* const mg = mgrad.data ? mgrad.target() : nullptr;
    Span rows[BQ], cols[BK];
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, hk, h_begin, h_end, acc_row] = KvTask(d, chunks, task);
      const S* kbase = K + sk.at(b, hk);
      const S* vbase = Vp + sv.at(b, hk);
      const int64_t nh = h_end - h_begin;
      QT.resize(nh * qt_size);
      DOT.resize(nh * dot_size);
      DELTA.resize(nh * d.Lq);
      for (int64_t h = h_begin; h < h_end; ++h) {
        const int64_t hl = h - h_begin;
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t i0 = qb * BQ, mi = std::min(BQ, d.Lq - i0);
          transpose_scaled(Q + sq.at(b, h, i0), sq.l, mi, d.D, scale,
                           QT.data() + hl * qt_size + qb * d.D * BQ, BQ, BQ);
          transpose_scaled(DO + so.at(b, h, i0), so.l, mi, d.Dv, T(1),
                           DOT.data() + hl * dot_size + qb * d.Dv * BQ, BQ, BQ);
        }
        for (int64_t i = 0; i < d.Lq; ++i)
          DELTA[hl * d.Lq + i] = row_dot<T>(DO + so.at(b, h, i), O + sout.at(b, h, i), d.Dv);
        std::fill_n(DQ + (b * d.Hq + h) * d.Lq * d.D, d.Lq * d.D, T(0));
      }

      for (int64_t j0 = 0; j0 < d.Lk; j0 += BK) {
        const int64_t nk = std::min(BK, d.Lk - j0);
        std::fill(dk_loc.begin(), dk_loc.end(), T(0));
        std::fill(dv_loc.begin(), dv_loc.end(), T(0));
        const auto [kj, ldk] = kv_rows(kbase + j0 * sk.l, sk.l, nk, d.D, kbuf.data());
        const auto [vj, ldv] = kv_rows(vbase + j0 * sv.l, sv.l, nk, d.Dv, vbuf.data());
        for (int64_t h = h_begin; h < h_end; ++h) {
          for (int64_t qb = 0; qb < nqb; ++qb) {
            const int64_t i0 = qb * BQ, mi = std::min(BQ, d.Lq - i0);
            const int64_t mp = (mi + W - 1) / W * W;
            const Span keys = block_keys(mask, b, i0, mi);
            if (keys.hi <= j0 || keys.lo >= j0 + nk) continue;
            if (!tile_setup(mask, b, h, i0, mi, j0, nk, rows, cols)) continue;
            const int64_t hl = h - h_begin;
            const T* qT = QT.data() + hl * qt_size + qb * d.D * BQ;
            const T* doT = DOT.data() + hl * dot_size + qb * d.Dv * BQ;
            const double* l = LSE + (b * d.Hq + h) * d.Lq + i0;
            const T* dl = DELTA.data() + hl * d.Lq + i0;
            auto col_spans = [&](int64_t depth) {
              return [&, depth](int64_t r0, int64_t r1) {
                return std::pair<Span, Span>{union_rows(cols, r0, r1, W), Span{0, depth}};
              };
            };
            tile_gemm_impl<T>(nk, d.D, kj, ldk, 1, qT, BQ, PT.data(), BQ, false, col_spans(d.D));
            tile_gemm_impl<T>(nk, d.Dv, vj, ldv, 1, doT, BQ, dST.data(), BQ, false, col_spans(d.Dv));
            mask_tile_t(mask, b, h, i0, j0, nk, mp, cols, PT.data(), BQ, neg_inf<T>(), mask.has_explicit());
            mask_tile_t(mask, b, h, i0, j0, nk, mp, cols, dST.data(), BQ, T(0), false);
            if (drop.active) {
              drop.row_keys(b, h, d.Hq, d.Lq, i0, mi, rk_lo, rk_hi);
              for (int64_t cc = 0; cc < nk; ++cc)
                keep_down_column(rk_lo, rk_hi, mp, j0 + cc, drop.threshold, keep.data() + cc * BQ);
            }
            // With dropout (keep factors z): O = (P ⊙ z)·V, so dV uses P ⊙ z and the gradient
            // reaching P is dP ⊙ z; Δ = rowsum(dO ⊙ O) is still Σ_j P_ij (dP ⊙ z)_ij.
            for (int64_t r0 = 0; r0 < mp; r0 += W) {
              V shift, low;
              backward_shift(l + r0, std::min(W, mi - r0), shift, low);
              const V dlv = V::loadu(dl + r0, std::min(W, mi - r0));
              const auto [c0, c1] = vector_keys<W>(cols, nk, r0);
              auto zero = [&](int64_t cc) {
                V(T(0)).store(PT.data() + cc * BQ + r0);
                V(T(0)).store(dST.data() + cc * BQ + r0);
              };
              for (int64_t cc = 0; cc < c0; ++cc) zero(cc);
              for (int64_t cc = c1; cc < nk; ++cc) zero(cc);
              for (int64_t cc = c0; cc < c1; ++cc) {
                T* p = PT.data() + cc * BQ + r0;
                T* ds = dST.data() + cc * BQ + r0;
                const V pv = vexp(V::loadu(p) - shift - low);
                if (drop.active) {
                  const V z = V::loadu(keep.data() + cc * BQ + r0) * keep_scale;
                  (pv * z).store(p);
                  (pv * at::vec::fmsub(V::loadu(ds), z, dlv)).store(ds);
                } else {
                  pv.store(p);
                  (pv * (V::loadu(ds) - dlv)).store(ds);
                }
              }
            }
            if (mg) {  // d(mask) = dS where some query may see the key, 0 elsewhere
              T* g = mg + b * mgrad.sb + h * mgrad.sh + i0 * mgrad.sq + j0 * mgrad.sk;
              for (int64_t cc = 0; cc < nk; ++cc)
                for (int64_t r = cols[cc].lo; r < cols[cc].hi; ++r)
                  g[r * mgrad.sq + cc * mgrad.sk] += dST[cc * BQ + r];
            }
            auto row_spans = [&](int64_t r0, int64_t r1) {
              return std::pair<Span, Span>{Span{0, d.D}, union_rows(rows, r0, r1, 1)};
            };
            auto key_spans = [&](int64_t depth) {
              return [&, depth](int64_t r0, int64_t r1) {
                return std::pair<Span, Span>{Span{0, depth}, union_rows(cols, r0, r1, 1)};
              };
            };
            // dV_j += Pᵀ·dOᵢ, dK_j += dSᵀ·Qᵢ, dQᵢ += dS·K_j (dS read from dSᵀ: row stride 1)
            tile_gemm_impl<T>(nk, mi, PT.data(), BQ, 1, DO + so.at(b, h, i0), so.l, dv_loc.data(),
                              d.Dv, true, key_spans(d.Dv));
            tile_gemm_impl<T>(nk, mi, dST.data(), BQ, 1, Q + sq.at(b, h, i0), sq.l, dk_loc.data(),
                              d.D, true, key_spans(d.D));
            tile_gemm_impl<T>(mi, nk, dST.data(), 1, BQ, kj, ldk,
                              DQ + ((b * d.Hq + h) * d.Lq + i0) * d.D, d.D, true, row_spans);
          }
        }
        T* dkd = DK + (acc_row * d.Lk + j0) * d.D;
        for (int64_t i = 0; i < nk * d.D; ++i) dkd[i] = dk_loc[i] * scale;
        std::copy(dv_loc.begin(), dv_loc.begin() + nk * d.Dv, DV + (acc_row * d.Lk + j0) * d.Dv);
      }
      for (int64_t h = h_begin; h < h_end; ++h) scale_row(DQ + (b * d.Hq + h) * d.Lq * d.D, d.Lq * d.D, scale);
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
template <typename T, typename S = T>
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
    std::vector<T> pbuf(R * d.Lk), dsbuf(R * d.Lk), keep(drop.active ? d.Lk : 0), qs(R * d.D), dq_row(d.D);
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
          const V dlt(at::vec::vec_reduce_all<T>([](V x, V y) { return x + y; }, dsum));
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

// ------------------------------------------------------------------ entry points -----------

// The type the fp32/fp64 kernels read K and V in: bf16 and fp16 as stored (the decode kernels
// widen them in registers, the tile kernels block by block: kv_rows), else the compute type.
// Forward and backward must agree: the backward recomputes the forward's scores.
at::ScalarType kv_storage_type(at::ScalarType t) {
  return at::isReducedFloatingType(t) ? t : compute_type(t, "seqkern attention");
}

// t in type ct with its last dimension contiguous (a no-op for the usual layouts, including
// slices of a packed qkv projection and views into a KV cache; see contiguous_as).
at::Tensor rows_contiguous(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct && t.stride(-1) == 1 && !t.is_neg()) return t;
  return contiguous_as(t, ct);  // (which materialises a negative-bit view)
}

Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "seqkern attention: q, k, v must be 4-D (B, H, L, D), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "seqkern attention: the CPU kernel needs CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "seqkern attention: q, k, v dtypes differ: ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble ||
                  q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "seqkern attention: dtype must be float32, float64, bfloat16 or float16, got ",
              q.scalar_type());
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == d.B && v.size(0) == d.B, "seqkern attention: batch sizes differ");
  TORCH_CHECK(k.size(3) == d.D, "seqkern attention: q and k head dims differ: ", d.D, " vs ", k.size(3));
  TORCH_CHECK(v.size(1) == d.Hkv && v.size(2) == d.Lk, "seqkern attention: k and v shapes differ: ",
              k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "seqkern attention: query heads (", d.Hq,
              ") must be a multiple of key/value heads (", d.Hkv, ")");
  return d;
}

template <typename T>
Mask<T> make_mask(const Dims& d, const c10::optional<at::Tensor>& attn_mask,
                  const c10::optional<at::Tensor>& key_lengths, bool is_causal, bool bottom_right,
                  int64_t window, at::Tensor& mask_hold, at::Tensor& len_hold) {
  Mask<T> m;
  m.Lq = d.Lq;
  m.Lk = d.Lk;
  m.causal = is_causal;
  m.offset = bottom_right ? d.Lk - d.Lq : 0;
  TORCH_CHECK(window >= 0, "seqkern attention: window must be >= 1 (0 for none), got ", window);
  m.window = window;
  if (key_lengths.has_value() && key_lengths->defined()) {
    TORCH_CHECK(key_lengths->dim() == 1 && key_lengths->size(0) == d.B,
                "seqkern attention: key_lengths must have shape (", d.B, "), got ", key_lengths->sizes());
    len_hold = key_lengths->to(at::kLong).contiguous();
    m.key_len = len_hold.data_ptr<int64_t>();
  }
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& am = *attn_mask;
    TORCH_CHECK(am.dim() <= 4, "seqkern attention: attn_mask must have at most 4 dims, got ", am.sizes());
    if (am.scalar_type() == at::kBool) {
      mask_hold = am.expand({d.B, d.Hq, d.Lq, d.Lk});
      m.bmask = mask_hold.data_ptr<bool>();
    } else {
      // convert before expanding so a broadcast mask is not materialised at full size
      // (resolve_neg: a negative-bit view's memory holds -mask)
      mask_hold = am.resolve_neg().to(c10::CppTypeToScalarType<T>::value)
                      .expand({d.B, d.Hq, d.Lq, d.Lk});
      m.amask = mask_hold.data_ptr<T>();
    }
    m.sb = mask_hold.stride(0);
    m.sh = mask_hold.stride(1);
    m.sq = mask_hold.stride(2);
    m.sk = mask_hold.stride(3);
  }
  return m;
}

Dropout make_dropout(double p, const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0 && p <= 1, "seqkern attention: dropout_p must be in [0, 1], got ", p);
  if (p == 0) return Dropout();
  TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1 &&
                  seed->scalar_type() == at::kLong,
              "seqkern attention: dropout_p > 0 needs dropout_seed, a one-element int64 tensor");
  return Dropout(p, static_cast<uint64_t>(seed->item<int64_t>()));
}

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_lengths,
    bool is_causal, bool bottom_right, int64_t window, double scale, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed, bool out_fp32) {
  const Dims d = check_inputs(q, k, v);
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  const at::ScalarType ct = compute_type(q.scalar_type(), "seqkern attention");
  const bool explicit_mask = attn_mask.has_value() && attn_mask->defined();
  const bool decode = use_decode(d, q.scalar_type(), explicit_mask, !out_fp32);
  // A bf16/fp16 output in float32, as computed: the backward's Δ = rowsum(dO ⊙ O) is a
  // difference of near-equal terms for a peaked row, and with O rounded to bf16 it kept that
  // rounding (dK 3.9× torch's error at Dv ≠ D, where torch computes exactly).
  const bool wide = out_fp32 && at::isReducedFloatingType(q.scalar_type());
  const at::ScalarType out_type = wide ? at::kFloat : q.scalar_type();
  // The bf16 tile kernels write their output themselves (bf16, or float32 if wide), the decode
  // kernel in the storage type; the fp32 tile kernel writes float32.
  const bool amx = !decode && q.scalar_type() == at::kBFloat16 && amx_usable(d);
  const bool narrow_out = decode && at::isReducedFloatingType(q.scalar_type());  // decode writes it too
  at::Tensor out = empty_large({d.B, d.Hq, d.Lq, d.Dv},
                               q.options().dtype(amx ? out_type : narrow_out ? q.scalar_type() : ct));
  at::Tensor lse = at::empty({d.B, d.Hq, d.Lq}, q.options().dtype(at::kDouble));
  if (out.numel() == 0 || lse.numel() == 0 || d.Lk == 0) {  // no keys: every row sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {contiguous_as(out, out_type), lse};
  }
  if (amx) {
    at::Tensor mask_hold, len_hold;
    const auto mask = make_mask<float>(d, attn_mask, key_lengths, is_causal, bottom_right, window,
                                       mask_hold, len_hold);
    auto kernel = bf16_few_queries(d, explicit_mask, !out_fp32) ? forward_kernel_bf16_few
                                                                 : forward_kernel_bf16_amx;
    kernel(d, rows_contiguous(q, at::kBFloat16), rows_contiguous(k, at::kBFloat16),
           rows_contiguous(v, at::kBFloat16), static_cast<float>(scale), mask, drop, out, lse);
    return {out, lse};
  }
  // K and V in bf16/fp16 are widened block by block in the tile loop (kv_rows), once per query
  // tile that visits the block; where each block meets several query tiles it is cheaper to
  // widen them once up front (exact either way, so the backward, which widens block by block,
  // recomputes the same scores). Measured, bf16 causal D=64, 2 threads, per tile → up front:
  // B=1 H=16 L=4096 150.0 → 140.4 ms, B=4 H=8 L=1024 21.3 → 20.5; but B=8 H=4 L=256 1.67 → 2.21
  // (the conversion pass costs more than 4 query tiles' widening).
  const bool widen_once = !decode && at::isReducedFloatingType(q.scalar_type()) &&
                          d.group() * ((d.Lq + kBlockQ - 1) / kBlockQ) >= 16;
  const at::ScalarType kv_type = widen_once ? ct : kv_storage_type(q.scalar_type());
  at::Tensor qc = rows_contiguous(q, ct);
  at::Tensor kc = rows_contiguous(k, kv_type), vc = rows_contiguous(v, kv_type);
  at::Tensor mask_hold, len_hold;
  AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_attention_forward", [&] {
    const auto mask = make_mask<scalar_t>(d, attn_mask, key_lengths, is_causal, bottom_right,
                                          window, mask_hold, len_hold);
    if (!decode) {
      with_kv_type<scalar_t>(kv_type, [&](auto s) {
        forward_kernel<scalar_t, decltype(s)>(d, qc, kc, vc, (scalar_t)scale, mask, drop, out, lse);
      });
    } else {
      with_kv_type<scalar_t>(kv_type, [&](auto s) {
        decode_forward_kernel<scalar_t, decltype(s)>(d, qc, kc, vc, (scalar_t)scale, mask, drop, out, lse);
      });
    }
  });
  // (the decode backward sums Δ from its weights and does not read O: a bf16 one widens here)
  return {contiguous_as(out, out_type), lse};
}

// Δ (B, H, L) in the compute type T: Δ_i = Σ_c dO_ic·O_ic per query row, read in the storage
// type S in place (no widened copies of dO and O).
template <typename T, typename S>
at::Tensor row_dots(const at::Tensor& a, const at::Tensor& b) {
  using V = Vec<T>;
  const int64_t B = a.size(0), H = a.size(1), L = a.size(2), E = a.size(3);
  at::Tensor out = at::empty({B, H, L}, a.options().dtype(c10::CppTypeToScalarType<T>::value));
  const Strides sa(a), sb(b);
  const S *A = a.data_ptr<S>(), *Bp = b.data_ptr<S>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, B * H * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % L, h = (t / L) % H, bi = t / (L * H);
      O[t] = row_dot<T>(A + sa.at(bi, h, i), Bp + sb.at(bi, h, i), E);
    }
  });
  return out;
}

// The gradient of an additive attn_mask of at most 4 dims, in its own shape with leading 1s
// (so a caller reshapes it back); rows of `buffer` are per-thread copies when tasks share
// elements (see MaskGrad).
struct MaskGradBuffer {
  at::Tensor buffer;
  std::vector<int64_t> shape;
  template <typename T>
  MaskGrad<T> view(const Dims& d) {
    MaskGrad<T> g;
    g.data = buffer.data_ptr<T>();
    const int64_t full[4] = {d.B, d.Hq, d.Lq, d.Lk};
    int64_t st[4], stride = 1;
    for (int i = 3; i >= 0; --i) {
      st[i] = shape[i] == 1 && full[i] != 1 ? 0 : stride;
      stride *= shape[i];
    }
    g.sb = st[0], g.sh = st[1], g.sq = st[2], g.sk = st[3];
    if (buffer.size(0) > 1) g.per_thread = stride;
    return g;
  }
};

MaskGradBuffer mask_grad_buffer(const Dims& d, const c10::optional<at::Tensor>& attn_mask,
                                at::ScalarType ct) {
  TORCH_CHECK(attn_mask.has_value() && attn_mask->defined() && attn_mask->is_floating_point(),
              "seqkern attention_backward: mask_grad needs an additive (floating-point) attn_mask");
  MaskGradBuffer m;
  m.shape.assign(4 - attn_mask->dim(), 1);
  for (int64_t s : attn_mask->sizes()) m.shape.push_back(s);
  const bool shared = (m.shape[0] == 1 && d.B > 1) || (m.shape[1] == 1 && d.Hq > 1);
  const int64_t copies = shared ? at::get_num_threads() : 1;
  m.buffer = at::zeros({copies, m.shape[0] * m.shape[1] * m.shape[2] * m.shape[3]},
                       attn_mask->options().dtype(ct));
  return m;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_lengths, bool is_causal, bool bottom_right,
    int64_t window, double scale, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed, bool mask_grad) {
  const Dims d = check_inputs(q, k, v);
  const at::ScalarType ct = compute_type(q.scalar_type(), "seqkern attention");
  const Dropout drop = make_dropout(dropout_p, dropout_seed);
  MaskGradBuffer mgrad;
  if (mask_grad) mgrad = mask_grad_buffer(d, attn_mask, ct);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == at::IntArrayRef({d.B, d.Hq, d.Lq, d.Dv}),
              "seqkern attention_backward: grad_out/out must have shape (", d.B, ", ", d.Hq,
              ", ", d.Lq, ", ", d.Dv, "), got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({d.B, d.Hq, d.Lq}) && lse.scalar_type() == at::kDouble,
              "seqkern attention_backward: lse must be Double of shape (", d.B, ", ", d.Hq,
              ", ", d.Lq, "), got ", lse.scalar_type(), " ", lse.sizes());
  const int64_t g = d.Hq / std::max<int64_t>(d.Hkv, 1);
  // Split a key/value head's query group over several tasks only when there are too few
  // (batch, kv head) pairs to keep every thread busy; each split needs its own dK/dV buffer.
  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (d.B * d.Hkv < 4 * threads) chunks = std::min<int64_t>(g, (4 * threads + d.B * d.Hkv - 1) / std::max<int64_t>(d.B * d.Hkv, 1));
  chunks = std::max<int64_t>(chunks, 1);

  const bool direct = chunks == 1;  // else the chunks' partial dK, dV are summed
  const bool decode = use_decode(d, q.scalar_type(), attn_mask.has_value() && attn_mask->defined());
  const bool amx = !decode && q.scalar_type() == at::kBFloat16 && amx_usable(d);
  // the bf16 tile kernel's dQ accumulator is as wide as its packed operands; backward_kernel
  // zeroes and scales its dQ rows itself, the others' are zeroed here and scaled after
  at::Tensor dq = empty_large({d.B, d.Hq, d.Lq, amx ? amx_width(d.D) : d.D}, q.options().dtype(ct));
  if (decode || amx) dq.zero_();
  at::Tensor dk_acc = empty_large({d.B, d.Hkv, chunks, d.Lk, d.D}, q.options().dtype(ct));
  at::Tensor dv_acc = empty_large({d.B, d.Hkv, chunks, d.Lk, d.Dv}, q.options().dtype(ct));
  if (dq.numel() == 0 || dk_acc.numel() == 0 || dv_acc.numel() == 0 || d.Lq == 0 || d.Lk == 0) {
    dq = dq.zero_().narrow(-1, 0, d.D);
    dk_acc.zero_();
    dv_acc.zero_();
  } else if (amx) {
    at::Tensor qb = rows_contiguous(q, at::kBFloat16), kb = rows_contiguous(k, at::kBFloat16),
               vb = rows_contiguous(v, at::kBFloat16), go = rows_contiguous(grad_out, at::kBFloat16);
    // Δ from the float32 output when the forward kept it (out_fp32), else from the bf16 one
    at::Tensor delta = out.scalar_type() == at::kFloat
        ? row_dots<float, float>(rows_contiguous(grad_out, at::kFloat), rows_contiguous(out, at::kFloat))
        : row_dots<float, c10::BFloat16>(go, rows_contiguous(out, at::kBFloat16));
    at::Tensor mask_hold, len_hold;
    const auto mask = make_mask<float>(d, attn_mask, key_lengths, is_causal, bottom_right, window,
                                       mask_hold, len_hold);
    const MaskGrad<float> mg = mask_grad ? mgrad.view<float>(d) : MaskGrad<float>();
    backward_kernel_bf16_amx(d, qb, kb, vb, go, lse.contiguous(), delta, mask, drop, mg,
                             static_cast<float>(scale), chunks, dq, dk_acc, dv_acc);
    dq = dq.mul_(scale).narrow(-1, 0, d.D);
  } else {
    const at::ScalarType kv_type = kv_storage_type(q.scalar_type());
    at::Tensor qc = rows_contiguous(q, ct), kc = rows_contiguous(k, kv_type),
               vc = rows_contiguous(v, kv_type);
    at::Tensor go = rows_contiguous(grad_out, ct);
    at::Tensor mask_hold, len_hold;
    AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_attention_backward", [&] {
      const auto mask = make_mask<scalar_t>(d, attn_mask, key_lengths, is_causal, bottom_right,
                                            window, mask_hold, len_hold);
      const MaskGrad<scalar_t> mg = mask_grad ? mgrad.view<scalar_t>(d) : MaskGrad<scalar_t>();
      if (decode) {
        with_kv_type<scalar_t>(kv_type, [&](auto s) {
          decode_backward_kernel<scalar_t, decltype(s)>(d, qc, kc, vc, go, lse.contiguous(), mask,
                                                        drop, mg, (scalar_t)scale, chunks, dq,
                                                        dk_acc, dv_acc);
        });
        dq.mul_(scale);
      } else {
        const at::Tensor oc = rows_contiguous(out, ct);
        with_kv_type<scalar_t>(kv_type, [&](auto s) {
          backward_kernel<scalar_t, decltype(s)>(d, qc, kc, vc, go, oc, lse.contiguous(), mask,
                                                 drop, mg, (scalar_t)scale, chunks, dq, dk_acc,
                                                 dv_acc);
        });
      }
    });
  }
  at::Tensor dk = direct ? dk_acc.squeeze(2) : dk_acc.sum(2);
  at::Tensor dv = direct ? dv_acc.squeeze(2) : dv_acc.sum(2);
  at::Tensor dmask = mask_grad ? mgrad.buffer.sum(0).view(mgrad.shape).to(attn_mask->scalar_type())
                               : at::empty({0}, q.options());
  return {contiguous_as(dq, q.scalar_type()), contiguous_as(dk, q.scalar_type()), contiguous_as(dv, q.scalar_type()), dmask};
}

// Materialises what the kernels regenerate tile by tile; for tests and the reference.
at::Tensor attention_dropout_mask(int64_t B, int64_t H, int64_t Lq, int64_t Lk, double p,
                                  const at::Tensor& seed) {
  const Dropout drop = make_dropout(p, seed);
  at::Tensor keep = at::empty({B, H, Lq, Lk}, at::kFloat);
  float* K = keep.data_ptr<float>();
  at::parallel_for(0, B * H * Lq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (drop.active) keep_along_row(drop.row_key(row), 0, Lk, drop.threshold, K + row * Lk);
      else std::fill(K + row * Lk, K + (row + 1) * Lk, 1.0f);
    }
  });
  return keep.to(at::kBool);
}

}  // namespace
}  // namespace seqkern::cpu

namespace seqkern {
void register_attention(pybind11::module_& m) {
  m.def("attention_bf16_tiles", &cpu::bf16_tiles_supported,
        "Whether bfloat16 attention runs on bf16 tiles here (AMX through oneDNN's brgemm, or AVX512_BF16)");
  m.def("attention_forward", &cpu::attention_forward, kReleaseGil,
        "Flash-style attention forward: (q, k, v, attn_mask, key_lengths, is_causal, "
        "bottom_right, window, scale, dropout_p, dropout_seed, out_fp32) -> (out, lse); out in "
        "float32 for bf16/fp16 inputs when out_fp32 (what the backward wants), else q's dtype",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("attn_mask"),
        pybind11::arg("key_lengths"), pybind11::arg("is_causal"), pybind11::arg("bottom_right"),
        pybind11::arg("window"), pybind11::arg("scale"), pybind11::arg("dropout_p") = 0.0,
        pybind11::arg("dropout_seed") = pybind11::none(), pybind11::arg("out_fp32") = false);
  m.def("attention_backward", &cpu::attention_backward, kReleaseGil,
        "Attention backward recomputing scores from lse: -> (dq, dk, dv, d attn_mask or empty)",
        pybind11::arg("grad_out"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("attn_mask"),
        pybind11::arg("key_lengths"), pybind11::arg("is_causal"), pybind11::arg("bottom_right"),
        pybind11::arg("window"), pybind11::arg("scale"), pybind11::arg("dropout_p") = 0.0,
        pybind11::arg("dropout_seed") = pybind11::none(), pybind11::arg("mask_grad") = false);
  m.def("attention_dropout_mask", &cpu::attention_dropout_mask, kReleaseGil,
        "The keep pattern (True = kept) that attention dropout with this p and seed applies to "
        "weights of shape (B, H, Lq, Lk)",
        pybind11::arg("B"), pybind11::arg("H"), pybind11::arg("Lq"), pybind11::arg("Lk"),
        pybind11::arg("dropout_p"), pybind11::arg("dropout_seed"));
}
}  // namespace seqkern
