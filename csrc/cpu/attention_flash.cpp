// Flash-style attention in the compute type (float32, float64; K and V may be stored in bf16 or
// fp16 and are widened block by block): queries in blocks of kBlockQ rows against blocks of keys
// with an online softmax, so nothing of size Lq×Lk is allocated, forward or backward. The
// backward recomputes each score tile from the log-sum-exp the forward saved.
#include "cpu/attention_common.h"

namespace seqkern::cpu::attn {

// q (B,Hq,Lq,D), k (B,Hkv,Lk,D), v (B,Hkv,Lk,Dv), last dims contiguous; out (B,Hq,Lq,Dv) and
// lse (B,Hq,Lq) float64 contiguous, written here. Tasks are (batch, head, query block).
template <typename T, typename S>
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
  double* LSE = lse.numel() ? lse.data_ptr<double>() : nullptr;  // (none: not wanted)
  const int64_t g = d.group();

  at::parallel_for(0, d.B * d.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    LineVector<T> QT(d.D * BQ), ST(BK * BQ), acc(BQ * d.Dv), mx(BQ), sm(BQ);
    LineVector<T> keep(drop.active ? BK * BQ : 0);
    LineVector<T> kbuf(widen ? BK * d.D : 0), vbuf(widen ? BK * d.Dv : 0), vclean;
    uint32_t rk_lo[BQ] = {}, rk_hi[BQ] = {};
    Span rows[BQ], cols[BK];
    int64_t bad[BK];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb, h = (task / nqb) % d.Hq, b = task / (nqb * d.Hq);
      const int64_t hk = h / g, i0 = qb * BQ, mi = std::min(BQ, d.Lq - i0);
      const int64_t mp = (mi + W - 1) / W * W;  // queries rounded up to whole vectors
      const T* q = Q + sq.at(b, h, i0);
      const S* kbase = K + sk.at(b, hk);
      const S* vbase = Vp + sv.at(b, hk);
      transpose_scaled(q, sq.l, mi, d.D, scale, QT.data(), BQ, mp);  // Qᵢᵀ·scale, 0 past mi
      if (drop.active) drop.row_keys(b, h, d.Hq, d.Lq, i0, mi, rk_lo, rk_hi);
      const Span keys = block_keys(mask, b, i0, mi);
      // isolate: V rows holding NaN or inf out of P·V (see nonfinite_rows)
      auto attend = [&](bool isolate) {
        std::fill(acc.begin(), acc.begin() + mi * d.Dv, T(0));
        std::fill(mx.begin(), mx.end(), neg_inf<T>());
        std::fill(sm.begin(), sm.end(), T(0));
        for (int64_t j0 = keys.lo / BK * BK; j0 < keys.hi; j0 += BK) {
          // (keys past keys.hi are seen by no query of the block)
          const int64_t nk = std::min(BK, keys.hi - j0);
          if (!tile_setup(mask, b, h, i0, mi, j0, nk, rows, cols)) continue;
          const auto [kj, ldk] = kv_rows(kbase + j0 * sk.l, sk.l, nk, d.D, kbuf.data());
          auto [vj, ldv] = kv_rows(vbase + j0 * sv.l, sv.l, nk, d.Dv, vbuf.data());
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
          if (isolate) {
            const int64_t nb = nonfinite_rows(vj, ldv, nk, d.Dv, bad);
            if (nb) {
              vclean.resize(BK * d.Dv);
              copy_rows_zeroing(vj, ldv, nk, d.Dv, bad, nb, vclean.data());
              add_rows_by_hand(mi, bad, nb, vj, ldv, d.Dv, [&](int64_t r, int64_t c) { return ST[c * BQ + r]; },
                               acc.data(), d.Dv);
              vj = vclean.data(), ldv = d.Dv;
            }
          }
          // O_i += P·V_j, P read from Sᵀ (row stride 1, k stride BQ)
          tile_gemm_impl<T>(mi, nk, ST.data(), 1, BQ, vj, ldv, acc.data(), d.Dv, true,
                            [&](int64_t r0, int64_t r1) {
                              return std::pair<Span, Span>{Span{0, d.Dv}, union_rows(rows, r0, r1, 1)};
                            });
        }
      };
      attend(false);
      // A non-finite output row may be a V row's NaN that reached it through a weight of 0:
      // the block is redone with such rows taken out of the product.
      if (!all_finite(acc.data(), mi * d.Dv)) attend(true);

      write_output_rows<T>(mi, d.Dv, acc.data(), d.Dv, sm.data(), mx.data(), T(drop.keep_scale),
                           O + ((b * d.Hq + h) * d.Lq + i0) * d.Dv, LSE ? LSE + (b * d.Hq + h) * d.Lq + i0 : nullptr);
    }
  });
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
template <typename T, typename S>
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
    LineVector<T> QT, DOT, DELTA;  // the task's heads' query-side operands
    LineVector<T> PT(BK * BQ), dST(BK * BQ), dk_loc(BK * d.D), dv_loc(BK * d.Dv);
    LineVector<T> kbuf(widen ? BK * d.D : 0), vbuf(widen ? BK * d.Dv : 0);
    LineVector<T> keep(drop.active ? BK * BQ : 0), kclean;
    uint32_t rk_lo[BQ] = {}, rk_hi[BQ] = {};
    int64_t bad_k[BK], bad_v[BK];
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
        // K and V rows holding NaN or inf (see nonfinite_rows): dQ += dS·K takes K_j with the
        // bad rows zero and adds them by hand; a bad V row makes its column of dPᵀ NaN, whose
        // dS is set to 0 where P is 0
        const int64_t nbk = nonfinite_rows(kj, ldk, nk, d.D, bad_k);
        const int64_t nbv = nonfinite_rows(vj, ldv, nk, d.Dv, bad_v);
        const T* kq = kj;
        int64_t ldkq = ldk;
        if (nbk) {
          kclean.resize(BK * d.D);
          copy_rows_zeroing(kj, ldk, nk, d.D, bad_k, nbk, kclean.data());
          kq = kclean.data(), ldkq = d.D;
        }
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
            for (int64_t i = 0; i < nbv; ++i)
              for (int64_t r = 0; r < mp; ++r)
                if (PT[bad_v[i] * BQ + r] == T(0)) dST[bad_v[i] * BQ + r] = T(0);
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
            T* dqr = DQ + ((b * d.Hq + h) * d.Lq + i0) * d.D;
            tile_gemm_impl<T>(mi, nk, dST.data(), 1, BQ, kq, ldkq, dqr, d.D, true, row_spans);
            add_rows_by_hand(mi, bad_k, nbk, kj, ldk, d.D, [&](int64_t r, int64_t c) { return dST[c * BQ + r]; },
                             dqr, d.D);
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

template void forward_kernel<float, float>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, float, const Mask<float>&, const Dropout&, at::Tensor&, at::Tensor&);
template void forward_kernel<float, c10::BFloat16>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, float, const Mask<float>&, const Dropout&, at::Tensor&, at::Tensor&);
template void forward_kernel<float, c10::Half>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, float, const Mask<float>&, const Dropout&, at::Tensor&, at::Tensor&);
template void forward_kernel<double, double>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const Mask<double>&, const Dropout&, at::Tensor&, at::Tensor&);
template void backward_kernel<float, float>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Mask<float>&, const Dropout&, const MaskGrad<float>&, float, int64_t, at::Tensor&, at::Tensor&, at::Tensor&);
template void backward_kernel<float, c10::BFloat16>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Mask<float>&, const Dropout&, const MaskGrad<float>&, float, int64_t, at::Tensor&, at::Tensor&, at::Tensor&);
template void backward_kernel<float, c10::Half>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Mask<float>&, const Dropout&, const MaskGrad<float>&, float, int64_t, at::Tensor&, at::Tensor&, at::Tensor&);
template void backward_kernel<double, double>(const Dims&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Mask<double>&, const Dropout&, const MaskGrad<double>&, double, int64_t, at::Tensor&, at::Tensor&, at::Tensor&);

}  // namespace seqkern::cpu::attn
