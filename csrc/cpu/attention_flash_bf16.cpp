// bfloat16 attention on bf16 tiles (AMX through oneDNN's brgemm or seqkern's own tile loop, or
// AVX512_BF16): the forward for many queries, the forward for 5–32 queries against a cache, and
// the backward of both.
#include "cpu/attention_common.h"

namespace seqkern::cpu::attn {

// ------------------------------------------------------------------ bf16 forward, AMX -------
//
// bfloat16 inputs where the CPU has AMX (or another bf16 dot-product unit oneDNN packs for):
// the two tile products run as oneDNN brgemm micro-kernels with bf16 operands and fp32
// accumulation, through ATen's cpublas wrappers (the same ones torch's own CPU flash attention
// calls). The float32 tile kernel (attention_flash.cpp) runs at ~50% of the FMA peak; AMX does ~8× more bf16
// products per cycle, so softmax and masking, in fp32, become most of the work. What this
// changes numerically is what torch's bf16 kernel also does: P is rounded to bf16 before P·V.
//
// Scores are held row-major here (queries × keys): brgemm writes whole tiles, and the masks are
// applied per query row from the same Spans the transposed kernel uses.
constexpr int64_t kAmxBlockQ = 64;
// Keys per tile: large, so that the per-row softmax bookkeeping (rescaling the accumulator,
// the running max and sum) is paid once per 128 or 256 keys; scores are computed over the
// whole 64-key chunks some query of the block may see, skipping the others.
constexpr int64_t kAmxBlockKMax = 256;  // (head dims past 64; up to 64: 128, amx_key_block)
constexpr int64_t kAmxChunk = 64;

// Short key sequences take one block of their length (in whole chunks) instead of padding.
// Head dims up to 64 take 128 keys: the 64 × 128 fp32 score tile (32 KB) stays in L1 between
// the product and the softmax, where 64 × 256 did not (measured, causal, 2 threads, A/B over 8
// rounds: B = 4, H = 8, L = 1024: 7.7 → 7.0 ms, L = 256 0.81 → 0.71; at B = 1, H = 16,
// L = 4096 46.6 ms both, between runs 50.2 → 46.7 and 46.7 → 49.4); at D = 128 the
// accumulator's rescaling costs more and 256 stays ahead (18.3 against 18.8 ms).
int64_t amx_key_block(const Dims& d) {
  const int64_t bk = std::max(d.D, d.Dv) <= 64 ? 128 : kAmxBlockKMax;
  return std::min(bk, (d.Lk + kAmxChunk - 1) / kAmxChunk * kAmxChunk);
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
      if (mask.amask) return store(add_mask(x, load(mask.amask + base + c, n)), s + c, n);
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
                      : add_mask(s[c] * scale, mask.amask[idx]);
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
void pack_transposed_block(const c10::BFloat16* rows, int64_t ld, int64_t n, int64_t E, int64_t BL,
                           int64_t CL, c10::BFloat16* dst) {
  for (int64_t c = 0; c < BL; c += CL) {
    const int64_t m = std::clamp<int64_t>(n - c, 0, CL);
    pack_vnni_transposed(m > 0 ? rows + c * ld : rows, ld, m, E, CL, dst + c * E);
  }
}
at::Tensor pack_transposed_blocks(const at::Tensor& src, int64_t BL, int64_t CL,
                                  const int64_t* lens = nullptr) {
  const int64_t E = src.size(3);
  return pack_blocks(src, BL, E * BL, [&](const c10::BFloat16* rows, int64_t ld, int64_t n, c10::BFloat16* dst) {
    pack_transposed_block(rows, ld, n, E, BL, CL, dst);
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

// src (B, H, L, E) bf16 as brgemm left operands srcᵀ: per (batch, head, block of BL rows) the
// Em × BL row-major transpose (Em ≥ E; rows past E and columns past L zero). For the backward's
// dVᵀ += dOᵀ·P and dKᵀ += Qᵀ·dS, which take P and dS as they come, a row pair interleaved,
// where dV += Pᵀ·dO took a transpose of each 64 × 64 tile of P and dS.
void pack_transposed_rows_block(const c10::BFloat16* rows, int64_t ld, int64_t n, int64_t E,
                                int64_t BL, int64_t Em, c10::BFloat16* dst) {
  std::fill(dst, dst + Em * BL, c10::BFloat16(0.0f));
  if (n > 0) transpose<c10::BFloat16>(rows, ld, dst, BL, n, E);
}
at::Tensor pack_transposed_rows(const at::Tensor& src, int64_t BL, int64_t Em) {
  const int64_t E = src.size(3);
  return pack_blocks(src, BL, Em * BL, [&](const c10::BFloat16* rows, int64_t ld, int64_t n, c10::BFloat16* dst) {
    pack_transposed_rows_block(rows, ld, n, E, BL, Em, dst);
  });
}

// Whether each task packs the K and V blocks of its own (batch, kv head) pair, so that they stay
// in cache, rather than all being packed up front (a write and a read of their size through
// memory): where there are pairs enough to keep every thread busy.
inline bool pack_in_tasks(const Dims& d) { return d.B * d.Hkv >= 4 * at::get_num_threads(); }

// Key block kb of (batch b, kv head hk) for the tasks that pack one such pair's blocks
// themselves: f(kb, n, k rows, v rows), n of the block's BL rows valid (keys past the batch's
// key length count as absent and are packed as zeros, as pack_blocks does).
template <typename F>
void for_each_key_block(const at::Tensor& k, const at::Tensor& v, int64_t b, int64_t hk,
                        const int64_t* key_len, int64_t BL, F f) {
  const Strides sk(k), sv(v);
  const int64_t L = k.size(2);
  const int64_t valid = key_len ? std::clamp<int64_t>(key_len[b], 0, L) : L;
  const c10::BFloat16 *kbase = k.data_ptr<c10::BFloat16>() + sk.at(b, hk),
                      *vbase = v.data_ptr<c10::BFloat16>() + sv.at(b, hk);
  for (int64_t kb = 0; kb * BL < L; ++kb)
    f(kb, std::clamp<int64_t>(valid - kb * BL, 0, BL), kbase + kb * BL * sk.l, vbase + kb * BL * sv.l);
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
  return reduce_max<float>(vmax);
}

constexpr float kLazyRescale = 8.0f;
constexpr float kLazySum = 2980.958f;  // e^kLazyRescale

// Below this |shift| (the row max, or its log-sum-exp) an exponent s·(sc·log2 e) − shift·log2 e
// with both factors rounded to fp32 is off by at most ~1e-4 where the weights are not ~0, far
// under bf16's rounding of them; above it (a row masked with a large finite constant: ~500 at
// 1e10, weights inf and the output NaN) the kernels take (s·sc − shift)·log2 e, exactly
// rounded, for one more multiply per score.
constexpr float kFastShift = 1024.0f;

// p[j] = bf16(exp(s[j]·sc − m) · keep[j]) for j < n (keep null: 1), and per lane sum +=
// exp(s[j]·sc − m) (before dropout). The exponent is taken in base 2 with one FMA
// (exp2_weights), and P goes out in bf16 straight from registers. The sum stays a vector and no
// running max is kept: a row of a tile is only 4–16 vectors, and reducing a sum and a max
// across lanes after each (two dependent shuffle chains), plus the max itself, took a quarter
// of the bf16 forward's softmax. The caller learns from the sum whether a weight got large.
template <bool kExact>
SEQKERN_INLINE void exp_row_to_bf16_impl(const float* s, int64_t n, float sc, float m,
                                         const float* keep, c10::BFloat16* p, Vec<float>& sum) {
  using V = Vec<float>;
  constexpr int64_t W = V::size();
  const float ninf = neg_inf<float>();
  const V c2(kExact ? sc : sc * kLog2e), m2(kExact ? m : m * kLog2e), l2e(kLog2e);
  auto part = [&](int64_t j, int64_t c, V& e) __attribute__((always_inline)) {
    V y = at::vec::fmsub(load(s + j, c), c2, m2);
    if constexpr (kExact) y = y * l2e;
    if (c < W) y = V::set(V(ninf), y, c);  // lanes past the row: weight 0
    e = exp2_weights<true>(y);
    sum = sum + e;
    if (keep) e = e * load(keep + j, c);
  };
  for (int64_t j = 0; j < n; j += 2 * W) {
    const int64_t c = std::min(2 * W, n - j), c0 = std::min(W, c), c1 = c - c0;
    V e0, e1(0.0f);
    part(j, c0, e0);
    if (c1 > 0) part(j + W, c1, e1);
    store_bf16_operand_pair(e0, e1, p + j, c);
  }
}
SEQKERN_INLINE void exp_row_to_bf16(const float* s, int64_t n, float sc, float m,
                                    const float* keep, c10::BFloat16* p, Vec<float>& sum) {
  if (std::abs(m) < kFastShift) exp_row_to_bf16_impl<false>(s, n, sc, m, keep, p, sum);
  else exp_row_to_bf16_impl<true>(s, n, sc, m, keep, p, sum);
}

// Whether some lane of x exceeds t (NaN lanes do not).
SEQKERN_INLINE bool any_above(const Vec<float>& x, float t) {
  return (x > Vec<float>(t)).zero_mask() != (1 << Vec<float>::size()) - 1;
}

// Rows `bad` of a VNNI-packed operand (pairs of rows interleaved, N columns) set to zero.
inline void zero_vnni_rows(c10::BFloat16* b, int64_t N, const int64_t* bad, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t e = 0; e < N; ++e) b[(bad[i] / 2) * 2 * N + 2 * e + bad[i] % 2] = c10::BFloat16(0.0f);
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
  const int64_t Dvp = amx_width(d.Dv), k_blk = d.D * BK, v_blk = BK * Dvp;
  // K and V of every (batch, kv head, key block), packed once per call and shared by every
  // query block and every query head of the group: up front, or per task (pack_in_tasks),
  // whose task then runs all the pair's query blocks
  const bool per_head = pack_in_tasks(d);
  at::Tensor kp, vp;
  if (!per_head) {
    kp = pack_transposed_blocks(k_, BK, BK, mask.key_len);
    vp = pack_row_blocks(v_, BK, mask.key_len);
  }
  const bf16 *KP = per_head ? nullptr : kp.data_ptr<bf16>(), *VP = per_head ? nullptr : vp.data_ptr<bf16>();
  const Strides sk(k_), sv(v_);
  const Strides sq(q_);
  const bf16 *Q = q_.data_ptr<bf16>(), *Vr = v_.data_ptr<bf16>();
  float* O32 = out.scalar_type() == at::kFloat ? out.data_ptr<float>() : nullptr;
  bf16* O = O32 ? nullptr : out.data_ptr<bf16>();
  double* LSE = lse.numel() ? lse.data_ptr<double>() : nullptr;  // (none: not wanted)
  const int64_t g = d.group();
  const float ninf = neg_inf<float>();

  at::parallel_for(0, per_head ? d.B * d.Hkv : d.B * d.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    // sm: each row's running sum, kept per lane (smv) until the block's rows are written
    LineVector<float> S(BQ * BK), acc(BQ * Dvp), mx(BQ), sm(BQ), smv(BQ * Vec<float>::size());
    LineVector<float> keep(drop.active ? BK : 0);
    LineVector<bf16> P(BQ * BK), edge(32 * Dvp);
    LineVector<bf16> kh(per_head ? nkb * k_blk : 0), vh(per_head ? nkb * v_blk : 0), vclean;
    uint32_t rk_lo[BQ] = {}, rk_hi[BQ] = {};
    Span rows[BQ], cols[kAmxBlockKMax];
    int64_t bad[kAmxBlockKMax];
    // query block qb of head h (batch b) against the packed key blocks of its kv head
    // isolate: V rows holding NaN or inf out of P·V (see nonfinite_rows)
    auto query_block = [&](int64_t b, int64_t h, int64_t qb, const bf16* KPh, const bf16* VPh, bool isolate) {
      const int64_t i0 = qb * BQ, mi = std::min(BQ, d.Lq - i0);
      const bf16* q = Q + sq.at(b, h, i0);
      std::fill(acc.begin(), acc.begin() + mi * Dvp, 0.0f);
      std::fill(mx.begin(), mx.end(), ninf);
      std::fill(smv.begin(), smv.end(), 0.0f);
      if (drop.active) drop.row_keys(b, h, d.Hq, d.Lq, i0, mi, rk_lo, rk_hi);
      const Span keys = block_keys(mask, b, i0, mi);
      for (int64_t j0 = keys.lo / BK * BK; j0 < keys.hi; j0 += BK) {
        const int64_t nk = std::min(BK, d.Lk - j0);
        if (!tile_setup(mask, b, h, i0, mi, j0, nk, rows, cols)) continue;
        const int64_t kb = j0 / BK;
        // the chunks of keys [klo, khi) that some query of the block may see
        const Span used = union_rows(rows, 0, mi, CK);
        const int64_t klo = used.lo, khi = (used.hi + CK - 1) / CK * CK;
        // Kᵀ of the block is one VNNI matrix (ldb = BK): its columns [klo, khi) start 2·klo in
        bf16_tile_product(mi, khi - klo, d.D, sq.l, BK, BK, false, q,
                          KPh + kb * k_blk + 2 * klo, S.data() + klo);
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
          Vec<float> rsum(0.0f);
          exp_row_to_bf16(s + lo, hi - lo, sc, m, kp, p + lo, rsum);
          float alpha = 1.0f;
          // Every weight is ≥ 0, so a lane sum past e^kLazyRescale is the only sign a weight
          // may be: then the row's max is taken, and if it moved at all the tile is redone
          // against it (moving m on any rise, not only past kLazyRescale, keeps a row whose
          // sums sit near the bound from paying this pass tile after tile).
          if (any_above(rsum, kLazySum)) {
            const float rmax = row_max_scaled(s + lo, hi - lo, sc);
            if (rmax > m) {
              alpha = std::exp(m - rmax);
              m = rmax;
              rsum = Vec<float>(0.0f);
              exp_row_to_bf16(s + lo, hi - lo, sc, m, kp, p + lo, rsum);
            }
          }
          if (mx[r] == ninf) alpha = 0.0f;  // first tile: nothing to rescale
          float* smr = smv.data() + r * Vec<float>::size();
          (Vec<float>::loadu(smr) * Vec<float>(alpha) + rsum).store(smr);
          mx[r] = m;
          if (alpha != 1.0f) scale_row(acc.data() + r * Dvp, d.Dv, alpha);
        }
        // V is packed as pairs of key rows, so key c starts c·Dvp elements in
        const Span seen = union_rows(rows, 0, mi, 1);
        const bf16* vpb = VPh + kb * v_blk;
        if (isolate) {
          const bf16* vr = Vr + sv.at(b, h / g) + (j0 + seen.lo) * sv.l;
          const int64_t nb = nonfinite_rows(vr, sv.l, seen.hi - seen.lo, d.Dv, bad);
          if (nb) {
            for (int64_t i = 0; i < nb; ++i) bad[i] += seen.lo;
            vclean.resize(v_blk);
            std::copy_n(vpb, v_blk, vclean.data());
            zero_vnni_rows(vclean.data(), Dvp, bad, nb);
            add_rows_by_hand(mi, bad, nb, vr - seen.lo * sv.l, sv.l, d.Dv,
                             [&](int64_t r, int64_t c) { return static_cast<float>(P[r * BK + c]); },
                             acc.data(), Dvp);
            vpb = vclean.data();
          }
        }
        tile_product_within(mi, Dvp, P.data(), BK, vpb, seen.lo, seen.hi, acc.data(), Dvp, edge.data());
      }
      // A non-finite output row may be a V row's NaN that reached it through a weight of 0:
      // the block is redone with such rows taken out of the product.
      if (!isolate && !all_finite(acc.data(), mi * Dvp)) return false;
      for (int64_t r = 0; r < mi; ++r) sm[r] = reduce_sum<float>(Vec<float>::loadu(smv.data() + r * Vec<float>::size()));
      write_output_rows_bf16(mi, d.Dv, acc.data(), Dvp, sm.data(), mx.data(),
                             static_cast<float>(drop.keep_scale), O, O32,
                             ((b * d.Hq + h) * d.Lq + i0) * d.Dv, LSE ? LSE + (b * d.Hq + h) * d.Lq + i0 : nullptr);
      return true;
    };
    auto query_block_checked = [&](int64_t b, int64_t h, int64_t qb, const bf16* KPh, const bf16* VPh) {
      if (!query_block(b, h, qb, KPh, VPh, false)) query_block(b, h, qb, KPh, VPh, true);
    };
    for (int64_t task = begin; task < end; ++task) {
      if (!per_head) {
        const int64_t qb = task % nqb, h = (task / nqb) % d.Hq, b = task / (nqb * d.Hq);
        const int64_t head = (b * d.Hkv + h / g) * nkb;
        query_block_checked(b, h, qb, KP + head * k_blk, VP + head * v_blk);
        continue;
      }
      const int64_t hk = task % d.Hkv, b = task / d.Hkv;
      for_each_key_block(k_, v_, b, hk, mask.key_len, BK, [&](int64_t kb, int64_t n, const bf16* kr, const bf16* vr) {
        pack_transposed_block(kr, sk.l, n, d.D, BK, BK, kh.data() + kb * k_blk);
        pack_vnni(vr, sv.l, n, d.Dv, BK, Dvp, vh.data() + kb * v_blk);
      });
      for (int64_t h = hk * g; h < (hk + 1) * g; ++h)
        for (int64_t qb = 0; qb < nqb; ++qb) query_block_checked(b, h, qb, kh.data(), vh.data());
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
// down the columns as in forward_kernel. In training (9–32 queries; fewer run row-wise, see
// use_decode) P·V is the fp32 micro-kernel over the V tile widened to fp32, with P in fp32
// (accurate enough for peaked rows' gradients, see forward_kernel_bf16_amx). That product grows
// with the rows, hence the bound: at 24–31 queries the path is still ~1.2× faster than the
// packing one. Inference (a bf16 output, no backward to serve) from 9 queries rounds P to bf16
// as torch's kernels do and runs P·V on bf16 tiles too: Pᵀ transposed into rows of P, V paired
// into VNNI form per tile; at 5–8 queries it takes rank-1 updates from the bf16 V rows
// (weighted_rows_from_bf16), P in fp32.
constexpr int64_t kFewBlockK = 128;

// P·V of the few-query kernel for at most kDecodeRowsMax query rows (P in fp32, Pᵀ's rows ldst
// apart), read from the bf16 V rows of keys [lo, hi) except `skip` (sorted; V rows holding
// NaN/inf, which the caller adds by hand): each V row is widened in registers once and meets
// every query's weight there. Widened into an fp32 tile first and multiplied by the tile
// micro-kernel (6 + 2 rows), the product took half this kernel's time at 8 queries.
template <int MI, int NV, bool FULL>
void weighted_rows_from_bf16_block(const float* st, int64_t ldst, int64_t lo, int64_t hi,
                                   const int64_t* skip, int64_t n_skip, const c10::BFloat16* v,
                                   int64_t ldv, int64_t c0, int64_t Dv, float* acc,
                                   int64_t ldacc) {
  using V = Vec<float>;
  constexpr int64_t W = V::size();
  auto width = [&](int u) { return FULL ? W : std::max<int64_t>(0, std::min<int64_t>(W, Dv - c0 - u * W)); };
  auto live = [&](int u) { return FULL || c0 + u * W < Dv; };
  V a[MI][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MI; ++m)
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) a[m][u] = load_first(acc + m * ldacc + c0 + u * W, width(u));
  // runs of keys between the skipped ones, each without branches (a test per key made GCC
  // keep the accumulators on the stack, see weighted_rows_sum_block in attention_decode.cpp)
  for (int64_t r = 0, c = lo; c < hi; ++r) {
    const int64_t end = r < n_skip ? skip[r] : hi;
    for (; c < end; ++c) {
      const c10::BFloat16* x = v + c * ldv;
      V xv[NV];
#pragma GCC unroll 4
      for (int u = 0; u < NV; ++u)
        if (live(u)) xv[u] = block_vector<FULL, float>(x, c0, u, Dv);
      const float* p = st + c * ldst;
#pragma GCC unroll 8
      for (int m = 0; m < MI; ++m) {
        const V pm(p[m]);
#pragma GCC unroll 4
        for (int u = 0; u < NV; ++u)
          if (live(u)) a[m][u] = at::vec::fmadd(pm, xv[u], a[m][u]);
      }
    }
    ++c;  // past the skipped key
  }
#pragma GCC unroll 8
  for (int m = 0; m < MI; ++m)
#pragma GCC unroll 4
    for (int u = 0; u < NV; ++u) store_first(a[m][u], acc + m * ldacc + c0 + u * W, width(u));
}

template <int MI>
void weighted_rows_from_bf16_mi(const float* st, int64_t ldst, int64_t lo, int64_t hi,
                                const int64_t* skip, int64_t n_skip, const c10::BFloat16* v,
                                int64_t ldv, int64_t Dv, float* acc, int64_t ldacc) {
  // accumulators MI × NV vectors (5–8 rows), with room for NV widened V vectors and a weight
  constexpr int NV = Vec<float>::size() == 16 ? 2 : 1;
  constexpr int64_t span = NV * Vec<float>::size();
  for (int64_t c0 = 0; c0 < Dv; c0 += span) {
    if (c0 + span <= Dv)
      weighted_rows_from_bf16_block<MI, NV, true>(st, ldst, lo, hi, skip, n_skip, v, ldv, c0, Dv, acc, ldacc);
    else
      weighted_rows_from_bf16_block<MI, NV, false>(st, ldst, lo, hi, skip, n_skip, v, ldv, c0, Dv, acc, ldacc);
  }
}

void weighted_rows_from_bf16(int64_t mi, const float* st, int64_t ldst, int64_t lo, int64_t hi,
                             const int64_t* skip, int64_t n_skip, const c10::BFloat16* v,
                             int64_t ldv, int64_t Dv, float* acc, int64_t ldacc) {
  static_assert(kDecodeRows == 4 && kDecodeRowsMax == 8, "the cases below are 5 to 8 rows");
  switch (mi) {  // (fewer rows run row-wise: use_decode)
    case 5: return weighted_rows_from_bf16_mi<5>(st, ldst, lo, hi, skip, n_skip, v, ldv, Dv, acc, ldacc);
    case 6: return weighted_rows_from_bf16_mi<6>(st, ldst, lo, hi, skip, n_skip, v, ldv, Dv, acc, ldacc);
    case 7: return weighted_rows_from_bf16_mi<7>(st, ldst, lo, hi, skip, n_skip, v, ldv, Dv, acc, ldacc);
    default:
      TORCH_INTERNAL_ASSERT(mi == 8, "weighted_rows_from_bf16: ", mi, " rows");
      return weighted_rows_from_bf16_mi<8>(st, ldst, lo, hi, skip, n_skip, v, ldv, Dv, acc, ldacc);
  }
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
  double* LSE = lse.numel() ? lse.data_ptr<double>() : nullptr;  // (none: not wanted)
  const int64_t g = d.group(), mi = d.Lq;
  const int64_t k_row_bytes = d.D * int64_t(sizeof(bf16)), v_row_bytes = d.Dv * int64_t(sizeof(bf16));
  // P·V on bf16 tiles (inference), its operands padded to whole tiles: P's rows BQ, V's columns
  // Dvp, keys (the product's K) tm.k.
  // (not at ≤ 8 queries: the fp32 product over 8 rows costs less than packing for the tiles)
  const bool pv_tiles = O32 == nullptr && d.Lq > kDecodeRowsMax;
  const TileMultiples tm = bf16_tile_multiples();
  const int64_t Dvp = pv_tiles ? amx_width(d.Dv) : d.Dv;  // acc's row stride

  at::parallel_for(0, d.B * d.Hq, 1, [&](int64_t begin, int64_t end) {
    LineVector<bf16> QT(d.D * BQ);
    const bool widened_v = !pv_tiles && mi > kDecodeRowsMax;  // the fp32 micro-kernel's V tile
    LineVector<float> ST(BK * BQ), VT(widened_v ? BK * d.Dv : 0), acc(BQ * Dvp), mx(BQ), sm(BQ);
    LineVector<float> PT(pv_tiles ? BQ * BK : 0);
    LineVector<bf16> P(pv_tiles ? BQ * BK : 0), VP(pv_tiles ? BK * Dvp : 0);
    LineVector<float> keep(drop.active ? BK * BQ : 0);
    uint32_t rk_lo[kFewRowsMax] = {}, rk_hi[kFewRowsMax] = {};
    Span rows[kFewRowsMax], cols[BK];
    int64_t skip[BK];
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
          if (all_finite(vbase + (j0 + c) * sv.l, d.Dv)) return;
          zero_row();
          add_rows_by_hand(mi, &c, 1, vbase + j0 * sv.l, sv.l, d.Dv,
                           [&](int64_t r, int64_t cc) { return ST[cc * BQ + r]; }, acc.data(), Dvp);
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
            round_to_bf16<true>(PT.data() + r * BK, P.data() + r * BK, n);
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
        if (mi <= kDecodeRowsMax) {
          int64_t n_skip = 0;
          for (int64_t c = 0; c < nk; ++c) {
            if (c >= klo && c < khi) isolate_nonfinite(c, [&] { skip[n_skip++] = c; });
            prefetch_next(vbase, sv.l, v_row_bytes, c);
          }
          weighted_rows_from_bf16(mi, ST.data(), BQ, klo, khi, skip, n_skip, vbase + j0 * sv.l,
                                  sv.l, d.Dv, acc.data(), Dvp);
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
                             (b * d.Hq + h) * d.Lq * d.Dv, LSE ? LSE + (b * d.Hq + h) * d.Lq : nullptr);
    }
    bf16_tile_release();
  });
}

// One row of the backward's tile without dropout or a mask gradient: P = exp2(s·c2 − s2 [− lo2
// after ·log2 e when EXACT]) and dS = P ⊙ (dP − Δ) for the keys [lo, hi), 0 for the others,
// rounded to bf16 straight from registers into p and ds (kAmxChunk of each). Keys outside
// [lo, hi) take a select, not a product with 0: their dP may be NaN (a V row no query may see).
template <typename Exact>
SEQKERN_INLINE void weights_to_bf16(Exact, const float* s, const float* dp, int64_t lo, int64_t hi,
                                    const Vec<float>& c2, const Vec<float>& s2,
                                    const Vec<float>& lo2, const Vec<float>& dlv,
                                    c10::BFloat16* p, c10::BFloat16* ds) {
  using V = Vec<float>;
  constexpr int64_t W = V::size();
  static_assert(kAmxChunk % (2 * W) == 0);
  for (int64_t j = 0; j < kAmxChunk; j += 2 * W) {
    V pv[2], dv[2];
    for (int u = 0; u < 2; ++u) {
      const int64_t c = j + u * W;
      if (c + W <= lo || c >= hi) {
        pv[u] = dv[u] = V(0.0f);
        continue;
      }
      V y = at::vec::fmsub(V::loadu(s + c), c2, s2);
      if constexpr (Exact::value) y = at::vec::fmsub(y, V(kLog2e), lo2);
      V e = exp2_weights<true>(y);
      V g = e * (V::loadu(dp + c) - dlv);
      if (c < lo || c + W > hi) {
        const V idx = V::arange(static_cast<float>(c), 1.0f);
        const V in = (idx >= V(static_cast<float>(lo))) & (idx < V(static_cast<float>(hi)));
        e = V::blendv(V(0.0f), e, in);
        g = V::blendv(V(0.0f), g, in);
      }
      pv[u] = e;
      dv[u] = g;
    }
    store_bf16_operand_pair(pv[0], pv[1], p + j, 2 * W);
    store_bf16_operand_pair(dv[0], dv[1], ds + j, 2 * W);
  }
}

// Backward of the bf16 forwards above on brgemm tiles, for key/value head hk of batch b
// and query heads [h_begin, h_end) of its group (as backward_kernel, whose equations these
// are). Per (query block i, key block j) of 64 × 64:
//   S = Qᵢ·Kⱼᵀ and dP = dOᵢ·Vⱼᵀ (bf16 products, fp32 tiles), P and dS from them rounded to
//   bf16 as operands of dVⱼᵀ += dOᵢᵀ·P, dKⱼᵀ += Qᵢᵀ·dS (P and dS with row pairs interleaved;
//   dKⱼᵀ, dVⱼᵀ transposed back once per key block) and dQᵢ += dS·Kⱼ.
// The packed operands (Kᵀ, Vᵀ, K rows, Qᵀ, dOᵀ) are made up front or per task (pack_in_tasks).
// dq is (B, Hq, Lq, amx_width(D)) fp32, unscaled, accumulated in place (each query head
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
  const int64_t Dp = amx_width(d.D);
  // dKᵀ and dVᵀ accumulate D (Dv) rows, in whole 16-row tiles
  const int64_t Dm = (d.D + 15) / 16 * 16, Dvm = (d.Dv + 15) / 16 * 16;
  // elements per packed block: Kᵀ, Vᵀ (VNNI), K rows (VNNI), Qᵀ, dOᵀ
  const int64_t kt_blk = d.D * BK, vt_blk = d.Dv * BK, kr_blk = BK * Dp, qt_blk = Dm * BQ,
                dot_blk = Dvm * BQ;
  // Packed up front, or (as in the forward) per task where each task holds a whole (batch, kv
  // head) pair (pack_in_tasks). (keys past a batch's key length are packed as zeros: see
  // pack_blocks)
  const bool per_pair = chunks == 1 && pack_in_tasks(d);
  at::Tensor kt, vt, kr, qt, dot;
  if (!per_pair) {
    kt = pack_transposed_blocks(k_, BK, BK, mask.key_len);
    vt = pack_transposed_blocks(v_, BK, BK, mask.key_len);
    kr = pack_row_blocks(k_, BK, mask.key_len);
    qt = pack_transposed_rows(q_, BQ, Dm);
    dot = pack_transposed_rows(do_, BQ, Dvm);
  }
  auto base = [&](const at::Tensor& t) { return per_pair ? nullptr : t.data_ptr<bf16>(); };
  const bf16 *KT = base(kt), *VT = base(vt), *KR = base(kr), *QT = base(qt), *DOT = base(dot);
  const Strides sq(q_), so(do_), sk(k_), sv(v_);
  const bf16 *Q = q_.data_ptr<bf16>(), *DO = do_.data_ptr<bf16>(), *Kr = k_.data_ptr<bf16>(),
             *Vr = v_.data_ptr<bf16>();
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
    LineVector<float> S(BQ * BK), dP(BQ * BK), dkT(Dm * BK), dvT(Dvm * BK), keep(BK);
    LineVector<bf16> Pb(BQ * BK), dSb(BQ * BK), Pv(BQ * BK), dSv(BQ * BK), edge(32 * Dp), kclean;
    int64_t bad_k[BK], bad_v[BK];
    const int64_t g = d.group();
    LineVector<bf16> ktl(per_pair ? nkb * kt_blk : 0), vtl(per_pair ? nkb * vt_blk : 0),
        krl(per_pair ? nkb * kr_blk : 0), qtl(per_pair ? g * nqb * qt_blk : 0),
        dotl(per_pair ? g * nqb * dot_blk : 0);
    uint32_t rk_lo[BQ] = {}, rk_hi[BQ] = {};
    float* const mg = mgrad.data ? mgrad.target() : nullptr;
    Span rows[BQ], cols[BK];
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, hk, h_begin, h_end, acc_row] = KvTask(d, chunks, task);
      // this task's packed blocks: key block kb of K at KTt + kb·kt_blk, query block qb of
      // head h at QTt + ((h − h_begin)·nqb + qb)·qt_blk (likewise V, K rows, dO)
      const bf16 *KTt, *VTt, *KRt, *QTt, *DOTt;
      if (per_pair) {
        for_each_key_block(k_, v_, b, hk, mask.key_len, BK, [&](int64_t kb, int64_t n, const bf16* kr, const bf16* vr) {
          pack_transposed_block(kr, sk.l, n, d.D, BK, BK, ktl.data() + kb * kt_blk);
          pack_transposed_block(vr, sv.l, n, d.Dv, BK, BK, vtl.data() + kb * vt_blk);
          pack_vnni(kr, sk.l, n, d.D, BK, Dp, krl.data() + kb * kr_blk);
        });
        for (int64_t h = h_begin; h < h_end; ++h)
          for (int64_t qb = 0; qb < nqb; ++qb) {
            const int64_t n = std::min(BQ, d.Lq - qb * BQ), slot = (h - h_begin) * nqb + qb;
            pack_transposed_rows_block(Q + sq.at(b, h, qb * BQ), sq.l, n, d.D, BQ, Dm, qtl.data() + slot * qt_blk);
            pack_transposed_rows_block(DO + so.at(b, h, qb * BQ), so.l, n, d.Dv, BQ, Dvm, dotl.data() + slot * dot_blk);
          }
        KTt = ktl.data(), VTt = vtl.data(), KRt = krl.data(), QTt = qtl.data(), DOTt = dotl.data();
      } else {
        const int64_t kh = (b * d.Hkv + hk) * nkb, qh = (b * d.Hq + h_begin) * nqb;
        KTt = KT + kh * kt_blk, VTt = VT + kh * vt_blk, KRt = KR + kh * kr_blk;
        QTt = QT + qh * qt_blk, DOTt = DOT + qh * dot_blk;
      }
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t j0 = kb * BK, nk = std::min(BK, d.Lk - j0), nkp = (nk + 1) / 2 * 2;
        std::fill(dkT.begin(), dkT.end(), 0.0f);
        std::fill(dvT.begin(), dvT.end(), 0.0f);
        // K and V rows holding NaN or inf (see nonfinite_rows; keys past the key length are
        // packed as zeros): dQ += dS·K takes K's rows with the bad ones zero and adds them by
        // hand; a bad V row makes its column of dP NaN, whose dS is set to 0 where P is 0
        const int64_t n_in = mask.key_len ? std::clamp<int64_t>(mask.key_len[b] - j0, 0, nk) : nk;
        const bf16* kr0 = Kr + sk.at(b, hk) + j0 * sk.l;
        const int64_t nbk = nonfinite_rows(kr0, sk.l, n_in, d.D, bad_k);
        const int64_t nbv = nonfinite_rows(Vr + sv.at(b, hk) + j0 * sv.l, sv.l, n_in, d.Dv, bad_v);
        const bf16* krb = KRt + kb * kr_blk;
        if (nbk) {
          kclean.resize(kr_blk);
          std::copy_n(krb, kr_blk, kclean.data());
          zero_vnni_rows(kclean.data(), Dp, bad_k, nbk);
          krb = kclean.data();
        }
        // dS = 0 where P = 0 in the bad V rows' columns of row r (P, dS in bf16 or fp32)
        auto clear_bad_columns = [&](auto* p, auto* ds) {
          for (int64_t i = 0; i < nbv; ++i)
            if (static_cast<float>(p[bad_v[i]]) == 0.0f) ds[bad_v[i]] = 0.0f;
        };
        for (int64_t h = h_begin; h < h_end; ++h) {
          for (int64_t qb = 0; qb < nqb; ++qb) {
            const int64_t i0 = qb * BQ, mi = std::min(BQ, d.Lq - i0), mip = (mi + 1) / 2 * 2;
            const Span keys = block_keys(mask, b, i0, mi);
            if (keys.hi <= j0 || keys.lo >= j0 + nk) continue;
            if (!tile_setup(mask, b, h, i0, mi, j0, nk, rows, cols)) continue;
            const int64_t qblk = (h - h_begin) * nqb + qb;  // within the task's heads
            const double* l = LSE + (b * d.Hq + h) * d.Lq + i0;
            const float* dl = DELTA + (b * d.Hq + h) * d.Lq + i0;
            bf16_tile_product(mi, BK, d.D, sq.l, BK, BK, false, Q + sq.at(b, h, i0),
                              KTt + kb * kt_blk, S.data());
            bf16_tile_product(mi, BK, d.Dv, so.l, BK, BK, false, DO + so.at(b, h, i0),
                              VTt + kb * vt_blk, dP.data());
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
                  p = exp2_weights<true>(p);
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
              if (!drop.active && !mg) {  // (the common case: P and dS go out as bf16 directly)
                if (exact) weights_to_bf16(std::true_type{}, s, dp, lo, hi, c2, s2, lo2, dlv,
                                           Pb.data() + r * BK, dSb.data() + r * BK);
                else weights_to_bf16(std::false_type{}, s, dp, lo, hi, c2, s2, lo2, dlv,
                                     Pb.data() + r * BK, dSb.data() + r * BK);
                clear_bad_columns(Pb.data() + r * BK, dSb.data() + r * BK);
                continue;
              }
              if (exact) weights(std::true_type{});
              else weights(std::false_type{});
              std::fill(s, s + lo, 0.0f);
              std::fill(s + hi, s + BK, 0.0f);
              std::fill(dp, dp + lo, 0.0f);
              std::fill(dp + hi, dp + BK, 0.0f);
              clear_bad_columns(s, dp);
              if (mg) {
                float* gr = mg + b * mgrad.sb + h * mgrad.sh + (i0 + r) * mgrad.sq + j0 * mgrad.sk;
                for (int64_t cc = lo; cc < hi; ++cc) gr[cc * mgrad.sk] += dp[cc];
              }
              round_to_bf16<true>(s, Pb.data() + r * BK, BK);
              round_to_bf16<true>(dp, dSb.data() + r * BK, BK);
            }
            // P and dS (queries × keys, zero past nk) as right operands: row pairs interleaved
            pack_vnni(Pb.data(), BK, mip, BK, mip, BK, Pv.data());
            pack_vnni(dSb.data(), BK, mip, BK, mip, BK, dSv.data());
            bf16_tile_product(Dvm, BK, mip, BQ, BK, BK, true, DOTt + qblk * dot_blk, Pv.data(), dvT.data());
            bf16_tile_product(Dm, BK, mip, BQ, BK, BK, true, QTt + qblk * qt_blk, dSv.data(), dkT.data());
            float* dqr = DQ + ((b * d.Hq + h) * d.Lq + i0) * Dp;
            const Span seen = union_rows(rows, 0, mi, 1);
            if (seen.lo == 0 && seen.hi == nk)
              bf16_tile_product(mi, Dp, nkp, BK, Dp, Dp, true, dSb.data(), krb, dqr);
            else  // (K rows no query of the tile sees may hold NaN)
              tile_product_within(mi, Dp, dSb.data(), BK, krb, seen.lo, seen.hi, dqr, Dp, edge.data());
            add_rows_by_hand(mi, bad_k, nbk, kr0, sk.l, d.D,
                             [&](int64_t r, int64_t c) { return static_cast<float>(dSb[r * BK + c]); }, dqr, Dp);
          }
        }
        float* dkd = DK + (acc_row * d.Lk + j0) * d.D;
        float* dvd = DV + (acc_row * d.Lk + j0) * d.Dv;
        transpose<float>(dkT.data(), BK, dkd, d.D, d.D, nk);
        transpose<float>(dvT.data(), BK, dvd, d.Dv, d.Dv, nk);
        scale_row(dkd, nk * d.D, scale);
      }
    }
    bf16_tile_release();
  });
}

}  // namespace seqkern::cpu::attn
