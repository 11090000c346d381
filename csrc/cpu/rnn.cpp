// Whole-sequence recurrences (one layer, one direction) for RNN-tanh/relu, LSTM (optionally
// peephole and projected), GRU (PyTorch convention) and GRU (Cho 2014 convention).
//
// Structure, forward:  xg = x·W_ihᵀ for all steps as ONE GEMM (the biases are added in the gate
// pass); then per step one recurrent GEMM h·W_hhᵀ (M = active batch) followed by one fused,
// vectorised pass over the gates that also updates the state. Backward: the reverse loop only
// does the per-step recurrent GEMM dgates·W_hh and the fused gate derivatives; dx, dW_ih, dW_hh
// and the biases are large GEMMs/reductions over all steps after the loop. (The fused float32
// loop instead folds the input projection into its per-step products, fuse_input_projection, or
// makes it with its own threads before the first step, xg_in_loop.)
//
// Sequences are in packed layout: x is (N, I) with N = Σ_t batch_sizes[t] rows, step t owning
// rows [offset_t, offset_t + batch_sizes[t]) (torch's PackedSequence.data). A padded,
// time-major (T, B, I) tensor with equal lengths is the same memory with batch_sizes = [B]*T.
// Because batch_sizes is non-increasing, the active rows of every step are a prefix of the
// state, so ended (forward) and not-yet-started (reverse) sequences simply are not touched.
#include "isa.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "cpu/dtype.h"
#include "cpu/gemm.h"
#include "cpu/large_alloc.h"
#include "cpu/rnn.h"
#include "cpu/rnn_cells.h"
#include "cpu/rnn_common.h"
#include "cpu/vec_math.h"

#include <memory>

namespace seqkern::cpu {
namespace {

using namespace rnn_detail;

// The bf16 operands a bfloat16 forward uses as given (see recurrent_forward); all undefined
// for other dtypes.
struct Bf16Operands {
  at::Tensor xg;    // x·W_ihᵀ in fp32 from a bf16 GEMM, or undefined
  at::Tensor w_hh;  // for the recurrent product on brgemm tiles, or undefined
  at::Tensor x, w_ih;  // for the input projection on brgemm tiles, or undefined
  // w_hh (above) read as bf16 by forward_impl's per-step few-row products, not converted
  bool few_rows = false;
};

// Whether a bfloat16 layer runs its per-step products on bf16 tiles: the fused loop, and on AMX
// a batch of at least 8 rows (below, a brgemm call costs more than the step's product). The
// vdpbf16ps register tiles serve any batch: against few-row products per step (the other bf16
// path below 8 rows) LSTM T = 50, B = 4 was 0.21-0.36 ms against 0.39-0.42 at H = 128, 2.6-2.9
// against 3.1-4.0 at H = 512 (Zen 4, 2 threads, 3 alternated runs each).
bool bf16_tiles(Cell cell, bool proj, const Layout& L, int64_t H) {
  return L.B >= (bf16_register_tiles() ? 1 : 8) && amx_recurrence_supported() &&
         fused_supported(cell, proj, L, H);
}

// Whether a bfloat16 layer on brgemm tiles does its input projection in the loop too, as
// [h | x_t]·[W_hh | W_ih]ᵀ, rather than as one bf16 GEMM over all steps beforehand. Fused,
// each step streams W_ih as well as W_hh; once the two outgrow L2 that costs a read of both
// per step, paid back only by enough rows. Apart, the GEMM is fast, but the loop then reads
// x·W_ihᵀ in fp32 (4 bytes per gate and row) from memory, rows G·H apart, and stalls on it.
// Measured, ms per call, apart → fused (2 threads, bytes of [W_hh | W_ih] per thread):
// LSTM H = I = 512 (2 MB): B = 8 23.2 → 29.3, B = 16 33.3 → 28.5, B = 64 246 → 183;
// RNN H = I = 1024 (2 MB) B = 64 61 → 54; GRU H = I = 512 (1.5 MB) B = 8 14.6 → 21.7, B = 64
// 168 → 125; LSTM H = I = 1024 (8 MB) B = 64 294 → 337, B = 128 417 → 385; GRU H = I = 1024
// (6 MB) B = 64 211 → 263, B = 128 204 → 241 (its x product is a second brgemm call).
// Those were on AVX512_BF16 tiles (Zen 5). seqkern's AMX tiles make the fused step's products
// 4-5x cheaper, so the rows' share of the streaming decides alone (Xeon with AMX, T = 64,
// I = H = 1024, apart → fused): LSTM B = 64 (128 KB a row) 80.5 → 66.8 ms, B = 8 19.5 → 30.2;
// GRU B = 64 62.7 → 46.7, B = 8 13.5 → 22.9. What decides there is all of the weights per row,
// not a thread's share: LSTM I = H = 1024, T = 64, apart → fused, 1 thread: B = 16 (1 MB a
// row) 35.9 → 45.3 ms, B = 32 (512 KB) 53.7 → 51.0, B = 64 (256 KB) 110 → 74.9; 2 threads:
// B = 16 18.4 → 23.5, B = 32 24.8 → 25.5, B = 64 80.5 → 66.8.
bool fuse_bf16_projection(Cell cell, int64_t weight_elems, int64_t B) {
  if (const char* env = std::getenv("SEQKERN_RNN_BF16_FUSE")) return env[0] == '1';
  const int64_t bytes = weight_elems * int64_t(sizeof(at::BFloat16));
  const int64_t per_thread = bytes / at::get_num_threads();
  const int64_t per_row = per_thread / std::max<int64_t>(B, 1);
  constexpr int64_t MB = int64_t(1) << 20, KB = int64_t(1) << 10;
  if (bf16_tile_multiples().k == 32)
    return per_thread <= MB || bytes / std::max<int64_t>(B, 1) <= 256 * KB;
  return per_thread <= MB || (per_thread <= 2 * MB && per_row <= 128 * KB) ||
         (cell != Cell::Gru && per_row <= 64 * KB);
}

const at::BFloat16* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<at::BFloat16>() : nullptr;
}

// t's data when it holds T (a bfloat16 forward passes some operands only in bf16), else null
// (also for an undefined t).
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.scalar_type() == c10::CppTypeToScalarType<T>::value ? t.data_ptr<T>()
                                                                              : nullptr;
}

const at::Tensor& opt(const c10::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t.has_value() ? *t : undefined;
}

// The per-step loop's recurrent products reuse W_hh packed by MKL (PackedWeight) once packing
// is paid for: about 64 rows of products over the sequence, not for a few steps (PackedWeight
// itself never packs for single rows). Measured forward, 2 threads, packed against not: GRU and
// LSTM with B = 2, T = 4..6 or B = 3, T = 5 1.1–1.9× slower packed (B = 1, T = 5, H = 512:
// packing the 4 MB W_hh took 1.2 ms of a 1618 µs LSTM call, 395 µs without); Cho GRU and
// projected LSTM (the cells that still pack: the others take the fused loop from 16 rows)
// with B = 4, T = 8..16 1.2× slower to even, B = 16, T = 12 and B = 8, T = 20 1.06–1.7×
// faster packed.
static int64_t packed_rows(const Layout& L) { return L.T >= 4 && L.N >= 64 ? L.B : 0; }

// ---------------------------------------------------------------- forward -----------------

template <typename T>
void forward_impl(Cell cell, const Layout& L, const at::Tensor& x, const at::Tensor& h0,
                  const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                  const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_peep,
                  const at::Tensor& w_hr, bool reverse, at::Tensor& out, at::Tensor& h_state,
                  at::Tensor& c_state, at::Tensor& ws_gates, at::Tensor& ws_cells,
                  at::Tensor& ws_hprev, bool save, const Bf16Operands& bf) {
  const at::Tensor& xg_given = bf.xg;
  const int64_t G = gate_count(cell);
  const int64_t H = w_hh.size(0) / G;
  const int64_t Hs = h0.size(1);  // state width: H, or proj_size
  const int64_t I = x.size(1);
  const int64_t N = L.N;
  const bool proj = w_hr.defined();
  const bool peep = w_peep.defined();

  // Input projection of every step in one GEMM, with every bias that sits outside the
  // recurrent matmul folded in (GRU's b_hn multiplies with r, so it stays out).
  // The summed bias is added in the gate pass rather than pre-filled into xg, which would
  // cost one more full write of the (N, G·H) buffer.
  const bool fused = std::is_same_v<T, float> && fused_supported(cell, proj, L, H) && !bf.few_rows;
  const bool fuse_x = fused && (bf.x.defined() ||
                                (!xg_given.defined() && fuse_input_projection(cell, L, I, H)));
  // A projection the fused loop does not take into its steps (nor is given) is made by the
  // loop's own threads before the first step, in its panel order (xg_in_loop).
  const bool xg_loop = fused && !fuse_x && !xg_given.defined() && !bf.w_hh.defined() &&
                       xg_in_loop(cell, H);
  const int64_t xg_width = xg_loop ? xg_panel_width(cell, H) : G * H;
  at::Tensor xg = xg_given.defined() ? xg_given
                  : fuse_x           ? at::Tensor()
                                     : empty_large({N, xg_width}, h0.options());
  // (plain loops: at B = 1 a call is ~100 µs, and each tensor op here cost about 1)
  std::vector<T> bias(G * H, T(0));
  const int64_t b_hh_n = cell == Cell::Gru ? 2 * H : G * H;
  auto add_bias = [&](const at::Tensor& b, int64_t n) {
    const T* p = b.data_ptr<T>();
    for (int64_t j = 0; j < n; ++j) bias[j] += p[j];
  };
  if (b_ih.defined()) add_bias(b_ih, G * H);
  if (b_hh.defined()) add_bias(b_hh, b_hh_n);
  // A few rows outside the fused loop (a streaming step; a short sequence, fewer than 16 rows
  // in all; bf16 weights that the tiles do not take): per step, h·W_hhᵀ as few-row products, one parallel pass
  // over W_hh (bf16 as stored), in place of MKL's GEMV (26 GB/s here) or converting a bf16 W_hh
  // to fp32 per call (4 MB at H = 512). A single step also takes x·W_ihᵀ in the same pass.
  const bool few = L.B <= kFewRows && !proj && cell != Cell::GruCho && !fused;
  const bool few_x = few && L.T == 1 && !xg_given.defined();
  if (!xg_given.defined() && !fuse_x && !few_x && !xg_loop) {
    gemm<T>(N, xg_width, I, T(1), x.data_ptr<T>(), I, w_ih.data_ptr<T>(), I, true, T(0),
            xg.data_ptr<T>(), xg_width);
  }
  const T* bz = bias.data();
  const T* b_hn = (cell == Cell::Gru && b_hh.defined()) ? b_hh.data_ptr<T>() + 2 * H : nullptr;

  T* hs = h_state.data_ptr<T>();
  T* cs = proj || cell == Cell::Lstm ? c_state.data_ptr<T>() : nullptr;
  const T* whh = data_or_null<T>(w_hh);
  const T* peep_p = peep ? w_peep.data_ptr<T>() : nullptr;
  T* outp = out.data_ptr<T>();
  T* gsave = save && ws_gates.defined() ? ws_gates.data_ptr<T>() : nullptr;
  T* csave = save && ws_cells.defined() ? ws_cells.data_ptr<T>() : nullptr;
  T* hsave = save ? ws_hprev.data_ptr<T>() : nullptr;
  const int64_t GH = G * H;
  if constexpr (std::is_same_v<T, float>) {
    if (fused) {
      ForwardArgs fa{cell, &L, H, reverse, fuse_x ? nullptr : xg.data_ptr<float>(),
                     data_or_null<float>(x), data_or_null<float>(w_ih), I, bz, b_hn, whh,
                     ptr(bf.w_hh), ptr(bf.x), ptr(bf.w_ih), peep_p,
                     h0.data_ptr<float>(), cs, outp, hs, gsave, csave, hsave,
                     xg_width, xg_loop ? xg.data_ptr<float>() : nullptr};
      fused_forward(fa);
      return;
    }
  }
  at::Tensor rec = at::empty({L.B, G * H}, h0.options());
  at::Tensor aux = at::empty({L.B, H}, h0.options());  // r⊙h (Cho GRU) or o⊙tanh(c) (proj)
  T* recp = rec.data_ptr<T>();
  T* auxp = aux.data_ptr<T>();
  // The recurrent matrices are packed once for all T steps.
  const bool cho = cell == Cell::GruCho;
  const int64_t pack_m = few ? 0 : packed_rows(L);
  std::vector<at::BFloat16> h_bf16(few && !whh ? L.B * Hs : 0);
  PackedWeight<T> w_rec(whh, Hs, true, cho ? 2 * H : GH, Hs, pack_m);
  std::unique_ptr<PackedWeight<T>> w_n, w_proj;
  if (cho) w_n = std::make_unique<PackedWeight<T>>(whh + 2 * H * Hs, Hs, true, H, H, pack_m);
  if (proj) w_proj = std::make_unique<PackedWeight<T>>(w_hr.data_ptr<T>(), H, true, Hs, H, pack_m);

  for (int64_t s = 0; s < L.T; ++s) {
    const int64_t t = L.step(s, reverse);
    const int64_t bs = L.bs[t], o = L.off[t];
    const T* xgt = xg.data_ptr<T>() + o * GH;
    if (hsave) std::memcpy(hsave + o * Hs, hs, sizeof(T) * bs * Hs);

    if (cell == Cell::GruCho) {
      w_rec.multiply(bs, hs, Hs, T(0), recp, GH);
      over_rows(bs, H, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const T* xr = xgt + b * GH;
          T* rr = recp + b * GH;
          for_each_vec<T>(H, [&](int64_t j, int64_t n) {
            auto r = sigmoid(load(xr + j, n) + load(rr + j, n) + load(bz + j, n));
            auto z = sigmoid(load(xr + H + j, n) + load(rr + H + j, n) + load(bz + H + j, n));
            store(r, rr + j, n);
            store(z, rr + H + j, n);
            store(r * load(hs + b * Hs + j, n), auxp + b * H + j, n);
          });
        }
      });
      w_n->multiply(bs, auxp, H, T(0), recp + 2 * H, GH);
    } else if (few && whh) {
      RowProduct<T> xw{few_x ? bs : 0, GH, I, x.data_ptr<T>(), I, w_ih.data_ptr<T>(),
                       xg.data_ptr<T>(), GH};
      few_row_products<T>(xw, {bs, GH, Hs, hs, Hs, whh, recp, GH});
    } else if (few) {  // bf16 W_hh: h rounded to bf16 for the product, as on the tiles
      if constexpr (std::is_same_v<T, float>) {
        round_to_bf16<true>(hs, h_bf16.data(), bs * Hs);
        few_row_products<float, at::BFloat16>({}, {bs, GH, Hs, h_bf16.data(), Hs, ptr(bf.w_hh), recp, GH});
      }
    } else {
      w_rec.multiply(bs, hs, Hs, T(0), recp, GH);
    }

    over_rows(bs, GH, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const T* xr = xgt + b * GH;
        T* rr = recp + b * GH;
        T* h = hs + b * Hs;
        T* gs = gsave ? gsave + (o + b) * (cell == Cell::Gru ? 4 * H : GH) : nullptr;
        switch (cell) {
          case Cell::RnnTanh:
          case Cell::RnnRelu:
            for_each_vec<T>(H, [&](int64_t j, int64_t n) {
              auto a = load(xr + j, n) + load(rr + j, n) + load(bz + j, n);
              store(rnn_activation(a, cell == Cell::RnnRelu), h + j, n);
            });
            break;
          case Cell::Lstm: {
            T* c = cs + b * H;
            T* m = proj ? auxp + b * H : h;
            T* cv = csave ? csave + (o + b) * (proj ? 3 * H : 2 * H) : nullptr;
            auto pre = [&](int64_t g, int64_t j, int64_t n) {
              return load(xr + g * H + j, n) + load(rr + g * H + j, n) + load(bz + g * H + j, n);
            };
            for_each_vec<T>(H, [&](int64_t j, int64_t n) {
              auto cp = load(c + j, n);
              auto st = lstm_step(pre(0, j, n), pre(1, j, n), pre(2, j, n), pre(3, j, n), cp,
                                  peep_p, H, j, n);
              store(st.c, c + j, n);
              store(st.m, m + j, n);
              if (gs) store_lstm_gates(st, gs, H, j, n);
              if (cv) {
                store(cp, cv + j, n);
                store(st.c, cv + H + j, n);
                if (proj) store(st.m, cv + 2 * H + j, n);
              }
            });
            break;
          }
          case Cell::Gru:
            for_each_vec<T>(H, [&](int64_t j, int64_t n) {
              auto r = sigmoid(load(xr + j, n) + load(rr + j, n) + load(bz + j, n));
              auto z = sigmoid(load(xr + H + j, n) + load(rr + H + j, n) + load(bz + H + j, n));
              auto hn = load(rr + 2 * H + j, n);
              if (b_hn) hn = hn + load(b_hn + j, n);
              auto nn = tanh(load(xr + 2 * H + j, n) + load(bz + 2 * H + j, n) + r * hn);
              store(gru_mix(nn, z, load(h + j, n)), h + j, n);
              if (gs) store_gate_blocks(gs, H, j, n, r, z, nn, hn);
            });
            break;
          case Cell::GruCho:
            for_each_vec<T>(H, [&](int64_t j, int64_t n) {
              auto r = load(rr + j, n);
              auto z = load(rr + H + j, n);
              auto nn = tanh(load(xr + 2 * H + j, n) + load(rr + 2 * H + j, n) +
                             load(bz + 2 * H + j, n));
              store(gru_mix(nn, z, load(h + j, n)), h + j, n);
              if (gs) {
                store(r, gs + j, n);
                store(z, gs + H + j, n);
                store(nn, gs + 2 * H + j, n);
              }
            });
            break;
        }
      }
    });

    if (proj) {
      w_proj->multiply(bs, auxp, H, T(0), hs, Hs);
    }
    std::memcpy(outp + o * Hs, hs, sizeof(T) * bs * Hs);
  }
}

// ---------------------------------------------------------------- backward ----------------

// bfloat16 inputs: dx, dW_ih and dW_hh, three quarters of the backward's FLOPs, as bf16 GEMMs
// with fp32 sums, from the gate gradients and h rounded to bf16 (torch's bf16 recurrences hold
// them in bf16 throughout). Cho GRU and projections keep the fp32 GEMMs (returns false), as
// does a torch without MKL's bf16 GEMM.
bool bf16_weight_gradients(Cell cell, bool proj, const Bf16Operands& bf, const at::Tensor& dxg,
                           const at::Tensor& drec, const at::Tensor& hprev, at::Tensor& dx,
                           at::Tensor& dw_ih, at::Tensor& dw_hh) {
  if (cell == Cell::GruCho || proj) return false;
  using bf16 = at::BFloat16;
  const int64_t N = dxg.size(0), GH = dxg.size(1), I = dx.size(1), Hs = hprev.size(1);
  // (into block-cache memory: .to() mapped its 6.5 MB result a page fault at a time, 2 ms of
  // a 17 ms bf16 LSTM training step at T = 100, B = 32, H = 256, against 0.35 into mapped pages)
  const at::Tensor g = contiguous_as(dxg, at::kBFloat16);
  const at::Tensor gr = drec.is_same(dxg) ? g : contiguous_as(drec, at::kBFloat16);
  const at::Tensor hb = contiguous_as(hprev, at::kBFloat16);
  return gemm_bf16(false, false, N, I, GH, g.data_ptr<bf16>(), GH, bf.w_ih.data_ptr<bf16>(), I,
                   dx.data_ptr<float>(), I) &&
         gemm_bf16(true, false, GH, I, N, g.data_ptr<bf16>(), GH, bf.x.data_ptr<bf16>(), I,
                   dw_ih.data_ptr<float>(), I) &&
         gemm_bf16(true, false, GH, Hs, N, gr.data_ptr<bf16>(), GH, hb.data_ptr<bf16>(), Hs,
                   dw_hh.data_ptr<float>(), Hs);
}

template <typename T>
std::vector<at::Tensor> backward_impl(
    Cell cell, const Layout& L, const at::Tensor& grad_out, const at::Tensor& grad_hn,
    const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh,
    const at::Tensor& w_peep, const at::Tensor& w_hr, const at::Tensor& h_n,
    const at::Tensor& ws_gates, const at::Tensor& ws_cells, const at::Tensor& ws_hprev,
    bool reverse, const Bf16Operands& bf) {
  const int64_t G = gate_count(cell);
  const int64_t H = w_hh.size(0) / G;
  const int64_t GH = G * H;
  const int64_t Hs = ws_hprev.size(1);
  const int64_t I = x.size(1);
  const int64_t N = L.N;
  const bool proj = w_hr.defined();
  const bool peep = w_peep.defined();
  const bool lstm = cell == Cell::Lstm;
  constexpr at::ScalarType ct = c10::CppTypeToScalarType<T>::value;
  auto opts = x.options().dtype(ct);  // x may be the bf16 input (see recurrent_backward)

  at::Tensor dh = grad_hn.defined() ? grad_hn.clone() : at::zeros({L.B, Hs}, opts);
  at::Tensor dc = lstm ? (grad_cn.defined() ? grad_cn.clone() : at::zeros({L.B, H}, opts))
                       : at::Tensor();
  // dxg: gradient of the input-side pre-activations; drec: of the recurrent-side ones. They
  // differ only for the PyTorch GRU's n block, where r multiplies W_hn·h + b_hn.
  at::Tensor dxg = empty_large({N, GH}, opts);
  at::Tensor drec = cell == Cell::Gru ? empty_large({N, GH}, opts) : dxg;
  at::Tensor dh_all = proj ? empty_large({N, Hs}, opts) : at::Tensor();
  at::Tensor dm = proj ? at::empty({L.B, H}, opts) : at::Tensor();
  at::Tensor drh = cell == Cell::GruCho ? at::empty({L.B, H}, opts) : at::Tensor();

  T* dhp = dh.data_ptr<T>();
  T* dcp = lstm ? dc.data_ptr<T>() : nullptr;
  T* dxgp = dxg.data_ptr<T>();
  T* drecp = drec.data_ptr<T>();
  const T* gout = grad_out.defined() ? grad_out.data_ptr<T>() : nullptr;
  const T* gsv = ws_gates.defined() ? ws_gates.data_ptr<T>() : nullptr;
  const T* csv = ws_cells.defined() ? ws_cells.data_ptr<T>() : nullptr;
  const T* hsv = ws_hprev.data_ptr<T>();
  const T* hnp = data_or_null<T>(h_n);  // RNN cells only (see OutputRows)
  const T* whh = data_or_null<T>(w_hh);  // null when the bf16 W_hh replaces it
  const T* peep_p = peep ? w_peep.data_ptr<T>() : nullptr;
  const int64_t gstride = cell == Cell::Gru ? 4 * H : GH;
  const int64_t cstride = proj ? 3 * H : 2 * H;
  const bool cho = cell == Cell::GruCho;
  bool fused = false;
  if constexpr (std::is_same_v<T, float>) {
    if (fused_supported(cell, proj, L, H)) {
      BackwardArgs ba{cell, &L, H, reverse, gout, whh, ptr(bf.w_hh), peep_p, gsv, csv, hsv, hnp,
                      dhp, dcp, dxgp, drecp};
      fused_backward(ba);
      fused = true;
    }
  }
  const int64_t pack_m = fused ? 0 : packed_rows(L);
  PackedWeight<T> w_rec(whh, Hs, false, Hs, cho ? 2 * H : GH, pack_m);
  std::unique_ptr<PackedWeight<T>> w_n, w_proj;
  if (cho) w_n = std::make_unique<PackedWeight<T>>(whh + 2 * H * Hs, Hs, false, H, H, pack_m);
  if (proj) w_proj = std::make_unique<PackedWeight<T>>(w_hr.data_ptr<T>(), H, false, H, Hs, pack_m);

  for (int64_t s = fused ? -1 : L.T - 1; s >= 0; --s) {
    const int64_t t = L.step(s, reverse);
    const int64_t bs = L.bs[t], o = L.off[t];
    if (gout) {
      at::vec::map2<T>([](Vec<T> a, Vec<T> b) { return a + b; }, dhp, dhp, gout + o * Hs,
                       bs * Hs);
    }
    const T* dmp = dhp;
    if (proj) {
      std::memcpy(dh_all.data_ptr<T>() + o * Hs, dhp, sizeof(T) * bs * Hs);
      w_proj->multiply(bs, dhp, Hs, T(0), dm.data_ptr<T>(), H);
      dmp = dm.data_ptr<T>();
    }
    T* dxt = dxgp + o * GH;
    T* drt = drecp + o * GH;
    const OutputRows y_rows(L, t, reverse);

    over_rows(bs, GH, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* dx_r = dxt + b * GH;
        T* dh_r = dhp + b * Hs;
        const T* gs = gsv ? gsv + (o + b) * gstride : nullptr;
        const T* hp = hsv + (o + b) * Hs;
        switch (cell) {
          case Cell::RnnTanh:
          case Cell::RnnRelu: {
            const T* y = y_rows.row(hsv, hnp, Hs, b);
            for_each_vec<T>(H, [&](int64_t j, int64_t n) {
              store(rnn_activation_backward(load(dh_r + j, n), load(y + j, n),
                                            cell == Cell::RnnRelu), dx_r + j, n);
            });
            break;
          }
          case Cell::Lstm: {
            const T* cv = csv + (o + b) * cstride;
            const T* dm_r = dmp + b * (proj ? H : Hs);
            T* dc_r = dcp + b * H;
            for_each_vec<T>(H, [&](int64_t j, int64_t n) {
              auto gr = lstm_step_backward(load(dm_r + j, n), load(dc_r + j, n), load(gs + j, n),
                                           load(gs + H + j, n), load(gs + 2 * H + j, n),
                                           load(gs + 3 * H + j, n), load(cv + j, n),
                                           load(cv + H + j, n), peep_p, H, j, n);
              store(gr.dc_prev, dc_r + j, n);
              store_lstm_grads(gr, dx_r, H, j, n);
            });
            break;
          }
          case Cell::Gru: {
            T* dr_r = drt + b * GH;
            for_each_vec<T>(H, [&](int64_t j, int64_t n) {  // the GEMM adds the W_hh path
              gru_step_backward(load(dh_r + j, n), gs, hp, dx_r, dr_r, dh_r, H, j, n);
            });
            break;
          }
          case Cell::GruCho: {
            for_each_vec<T>(H, [&](int64_t j, int64_t n) {
              auto gr = gru_mix_backward(load(dh_r + j, n), load(gs + 2 * H + j, n),
                                         load(gs + H + j, n), load(hp + j, n));
              store(gr.dn_pre, dx_r + 2 * H + j, n);
              store(gr.dz_pre, dx_r + H + j, n);
              store(gr.dh_direct, dh_r + j, n);
            });
            break;
          }
        }
      }
    });

    if (cell == Cell::GruCho) {
      // d(r⊙h) = da_n · W_hn, then r's gate gradient and the r-path into dh.
      T* drhp = drh.data_ptr<T>();
      w_n->multiply(bs, dxt + 2 * H, GH, T(0), drhp, H);
      over_rows(bs, H, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const T* gs = gsv + (o + b) * gstride;
          const T* hp = hsv + (o + b) * Hs;
          for_each_vec<T>(H, [&](int64_t j, int64_t n) {
            auto r = load(gs + j, n);
            auto d = load(drhp + b * H + j, n);
            store(d * load(hp + j, n) * r * (Vec<T>(T(1)) - r), dxt + b * GH + j, n);
            store(load(dhp + b * Hs + j, n) + d * r, dhp + b * Hs + j, n);
          });
        }
      });
      w_rec.multiply(bs, dxt, GH, T(1), dhp, Hs);
    } else {
      w_rec.multiply(bs, drt, GH, cell == Cell::Gru ? T(1) : T(0), dhp, Hs);
    }
  }

  // Everything that does not feed the recurrence: large GEMMs over all N rows.
  at::Tensor dx = empty_large({N, I}, opts);
  at::Tensor dw_ih = at::empty({GH, I}, opts);
  at::Tensor dw_hh = at::empty({GH, Hs}, opts);
  const bool done_bf16 =
      bf.x.defined() && bf16_weight_gradients(cell, proj, bf, dxg, drec, ws_hprev, dx, dw_ih, dw_hh);
  if (!done_bf16) {
    const at::Tensor xc = x.to(ct).contiguous(), w_ihc = w_ih.to(ct).contiguous();
    gemm<T>(N, I, GH, T(1), dxgp, GH, w_ihc.data_ptr<T>(), I, false, T(0), dx.data_ptr<T>(), I);
    gemm_tn<T>(GH, I, N, T(1), dxgp, GH, xc.data_ptr<T>(), I, T(0), dw_ih.data_ptr<T>(), I);
    if (cell == Cell::GruCho) {
      gemm_tn<T>(2 * H, Hs, N, T(1), dxgp, GH, hsv, Hs, T(0), dw_hh.data_ptr<T>(), Hs);
      at::Tensor rh = ws_gates.narrow(1, 0, H) * ws_hprev;
      gemm_tn<T>(H, Hs, N, T(1), dxgp + 2 * H, GH, rh.data_ptr<T>(), H, T(0),
                 dw_hh.data_ptr<T>() + 2 * H * Hs, Hs);
    } else {
      gemm_tn<T>(GH, Hs, N, T(1), drecp, GH, hsv, Hs, T(0), dw_hh.data_ptr<T>(), Hs);
    }
  }
  at::Tensor db_ih = b_ih.defined() ? dxg.sum(0) : at::Tensor();
  at::Tensor db_hh = !b_hh.defined()                      ? at::Tensor()
                     : db_ih.defined() && drec.is_same(dxg) ? db_ih.clone()  // same sum
                                                            : drec.sum(0);
  at::Tensor dw_peep;
  if (peep) {
    auto cp = ws_cells.narrow(1, 0, H), cn = ws_cells.narrow(1, H, H);
    dw_peep = at::stack({(dxg.narrow(1, 0, H) * cp).sum(0), (dxg.narrow(1, H, H) * cp).sum(0),
                         (dxg.narrow(1, 3 * H, H) * cn).sum(0)});
  }
  at::Tensor dw_hr;
  if (proj) {
    dw_hr = at::empty({Hs, H}, opts);
    gemm_tn<T>(Hs, H, N, T(1), dh_all.data_ptr<T>(), Hs, csv + 2 * H, cstride, T(0),
               dw_hr.data_ptr<T>(), H);
  }
  return {dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_peep, dw_hr};
}

// ---------------------------------------------------------------- checks & dtype glue ------

// That t, where given, has exactly the shape `want`; the error names it as (a, b).
void check_shape(const char* who, const char* name, const at::Tensor& t,
                 std::initializer_list<int64_t> want) {
  if (!t.defined() || t.sizes() == at::IntArrayRef(want)) return;
  std::string shape = "(";
  for (int64_t n : want) shape += std::to_string(n) + (want.size() == 1 ? ",)" : ", ");
  if (want.size() != 1) shape.replace(shape.size() - 2, 2, ")");
  TORCH_CHECK(false, who, ": ", name, " must be ", shape, ", got ", t.sizes());
}

void check_common(Cell cell, const at::Tensor& x, const at::Tensor& batch_sizes,
                  const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const at::Tensor& w_hr) {
  TORCH_CHECK(x.device().is_cpu(), "seqkern cpu recurrence: x must be on the CPU, got ",
              x.device());
  TORCH_CHECK(x.dim() == 2, "seqkern cpu recurrence: x must be packed (N, input_size), got ",
              x.sizes());
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong &&
                  batch_sizes.device().is_cpu(),
              "seqkern cpu recurrence: batch_sizes must be a 1-D int64 CPU tensor");
  const int64_t G = gate_count(cell);
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(1) == x.size(1) && w_ih.size(0) % G == 0,
              "seqkern cpu recurrence: weight_ih must be (", G, "*hidden_size, ", x.size(1),
              "), got ", w_ih.sizes());
  const int64_t H = w_ih.size(0) / G;
  TORCH_CHECK(!w_hr.defined() || (w_hr.dim() == 2 && w_hr.size(0) >= 1 && w_hr.size(1) == H),
              "seqkern cpu recurrence: weight_hr must be (proj_size, ", H, "), got ", w_hr.sizes());
  const int64_t Hs = w_hr.defined() ? w_hr.size(0) : H;
  // With a projection both weight_hh and weight_hr carry proj_size: name both when they disagree
  const bool hh_rank_ok = w_hh.dim() == 2 && w_hh.size(0) == G * H;
  TORCH_CHECK(!w_hr.defined() || !hh_rank_ok || w_hh.size(1) == Hs,
              "seqkern cpu recurrence: weight_hh ", w_hh.sizes(), " and weight_hr ", w_hr.sizes(),
              " disagree on proj_size: weight_hh must be (", G * H, ", ", Hs,
              ") for this weight_hr, or weight_hr (", w_hh.size(1), ", ", H,
              ") for this weight_hh");
  TORCH_CHECK(hh_rank_ok && w_hh.size(1) == Hs,
              "seqkern cpu recurrence: weight_hh must be (", G * H, ", ", Hs, "), got ",
              w_hh.sizes());
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == Hs,
              "seqkern cpu recurrence: h0 must be (batch, ", Hs, "), got ", h0.sizes());
  if (cell == Cell::Lstm) {
    TORCH_CHECK(c0.defined() && c0.dim() == 2 && c0.size(0) == h0.size(0) && c0.size(1) == H,
                "seqkern cpu recurrence: c0 must be (", h0.size(0), ", ", H, ")");
  }
  auto acc = batch_sizes.accessor<int64_t, 1>();
  TORCH_CHECK(batch_sizes.size(0) == 0 || acc[0] == h0.size(0),
              "seqkern cpu recurrence: batch_sizes[0] (the batch) must equal h0.size(0) = ",
              h0.size(0));
  int64_t total = 0, prev = h0.size(0);
  for (int64_t t = 0; t < batch_sizes.size(0); ++t) {
    TORCH_CHECK(acc[t] >= 1 && acc[t] <= prev,
                "seqkern cpu recurrence: batch_sizes must be positive, non-increasing and at "
                "most the batch size");
    prev = acc[t];
    total += acc[t];
  }
  TORCH_CHECK(total == x.size(0), "seqkern cpu recurrence: batch_sizes sum to ", total,
              " but x has ", x.size(0), " rows");
}

}  // namespace

bool recurrent_bf16_tiles() { return amx_recurrence_supported(); }

namespace {

// Row width of what a training step saves for its backward (cell_backward): LSTM i, f, g, o
// and c'; GRU r, z, n, W_hn·h + b_hn and h; RNN h'. Neither the step's outputs nor its input
// h are kept, so that a caller may change them in place (a state reset between steps, as
// torch's cells allow).
inline int64_t cell_saved_width(Cell cell, int64_t H) {
  return cell == Cell::Lstm || cell == Cell::Gru ? 5 * H : H;
}

// One cell step on units [u, u + m) of one row, from the gate pre-activations xg(g) (x·W_ihᵀ +
// b_ih) and hg(g) (h·W_hhᵀ + b_hh): h' into ho, c' into co (LSTM), and, with sv, what the
// backward needs (cell_saved_width). hp, cp: the row's previous h and c.
template <typename T, typename XG, typename HG>
SEQKERN_INLINE void cell_apply(Cell cell, XG xg, HG hg, const T* hp, const T* cp, T* ho, T* co,
                               T* sv, int64_t H, int64_t u, int64_t m) {
  switch (cell) {
    case Cell::RnnTanh:
    case Cell::RnnRelu: {
      const auto y = rnn_activation(xg(0) + hg(0), cell == Cell::RnnRelu);
      store(y, ho + u, m);
      if (sv) store(y, sv + u, m);
      break;
    }
    case Cell::Lstm: {
      const auto st = lstm_step(xg(0) + hg(0), xg(1) + hg(1), xg(2) + hg(2), xg(3) + hg(3),
                                load(cp + u, m), static_cast<const T*>(nullptr), H, u, m);
      store(st.m, ho + u, m);
      store(st.c, co + u, m);
      if (sv) {
        store_lstm_gates(st, sv, H, u, m);
        store(st.c, sv + 4 * H + u, m);
      }
      break;
    }
    default: {  // Gru
      const auto hn = hg(2);
      const auto r = sigmoid(xg(0) + hg(0)), z = sigmoid(xg(1) + hg(1));
      const auto nn = tanh(xg(2) + r * hn);
      store(gru_mix(nn, z, load(hp + u, m)), ho + u, m);
      if (sv) {
        store_gate_blocks(sv, H, u, m, r, z, nn, hn);
        store(load(hp + u, m), sv + 4 * H + u, m);
      }
    }
  }
}

// One step of a cell for B ≤ kFewRows rows. Threads split the hidden units; each computes every
// gate of its units (its rows of W_ih and W_hh: the same share on every call, so it stays in
// that core's L2 between calls) and applies the cell to them, so a step is one parallel region
// with no intermediate tensors. A general step instead runs two products over all units, then
// the gates, with tensors in between. bf16 weights (Wt) are read as they are, with float states.
// (x and h_op are the products' operands, h the state: for bf16 weights, x and h in bf16 and h
// widened.)
template <typename T, typename Wt = T>
void cell_step_kernel(Cell cell, int64_t B, int64_t I, int64_t H, const Wt* x, const Wt* h_op,
                      const T* h, const T* c, const Wt* w_ih, const Wt* w_hh, const T* b_ih,
                      const T* b_hh, T* h_out, T* c_out, T* saved) {
  constexpr int64_t U = 16;  // units per task
  const int64_t G = gate_count(cell), sw = cell_saved_width(cell, H);
  // threads only past ~32K multiply-adds per thread's share
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, B * G * U * (I + H)));
  at::parallel_for(0, (H + U - 1) / U, grain, [&](int64_t begin, int64_t end) {
    T xp[4][kFewRows][U], hp[4][kFewRows][U];  // gate × row × unit: x·W_ihᵀ, h·W_hhᵀ
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u0 = task * U, n = std::min(U, H - u0);
      for (int64_t g = 0; g < G; ++g) {
        few_row_product<T, Wt>({B, n, I, x, I, w_ih + (g * H + u0) * I, &xp[g][0][0], U});
        few_row_product<T, Wt>({B, n, H, h_op, H, w_hh + (g * H + u0) * H, &hp[g][0][0], U});
      }
      for (int64_t b = 0; b < B; ++b) {
        for_each_vec<T>(n, [&](int64_t j, int64_t m) {
          const int64_t u = u0 + j;
          auto xg = [&](int64_t g) { return load(&xp[g][b][j], m) + (b_ih ? load(b_ih + g * H + u, m) : Vec<T>(T(0))); };
          auto hg = [&](int64_t g) { return load(&hp[g][b][j], m) + (b_hh ? load(b_hh + g * H + u, m) : Vec<T>(T(0))); };
          cell_apply<T>(cell, xg, hg, h + b * H, c ? c + b * H : nullptr, h_out + b * H,
                        c_out ? c_out + b * H : nullptr, saved ? saved + b * sw : nullptr, H, u, m);
        });
      }
    }
  });
}

// The same step for more rows: gx = x·W_ihᵀ (+ bx) and gh = h·W_hhᵀ (+ bh) (G·H wide) from
// library GEMMs, then the cell over rows × vectors of units. Only GRU's n gate needs h·W_hhᵀ
// apart: the other cells may take both products summed in gx (gh null).
template <typename T>
void cell_step_rows(Cell cell, int64_t B, int64_t H, const T* gx, const T* bx, const T* gh,
                    const T* bh, const T* h, const T* c, T* h_out, T* c_out, T* saved) {
  const int64_t G = gate_count(cell), sw = cell_saved_width(cell, H);
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, G * H)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T *xr = gx + b * G * H, *hr = gh ? gh + b * G * H : nullptr;
      for_each_vec<T>(H, [&](int64_t u, int64_t m) {
        auto xg = [&](int64_t g) {
          const auto v = load(xr + g * H + u, m);
          return bx ? v + load(bx + g * H + u, m) : v;
        };
        auto hg = [&](int64_t g) {
          const auto v = hr ? load(hr + g * H + u, m) : Vec<T>(T(0));
          return bh ? v + load(bh + g * H + u, m) : v;
        };
        cell_apply<T>(cell, xg, hg, h + b * H, c ? c + b * H : nullptr, h_out + b * H,
                      c_out ? c_out + b * H : nullptr, saved ? saved + b * sw : nullptr, H, u, m);
      });
    }
  });
}

// The gate gradients of one cell step (rows × vectors of units), from dh' (and dc' for LSTM):
// dgx, the gradients of x·W_ihᵀ + b_ih (G·H wide); drec, those of h·W_hhᵀ + b_hh (the same
// for RNN and LSTM; GRU's n gate differs, see gru_step_backward); dh_direct, GRU's z ⊙ h path;
// dc_prev (LSTM).
template <typename T>
void cell_backward_rows(Cell cell, int64_t B, int64_t H, const T* dh, const T* dc,
                        const T* saved, const T* cp, T* dgx, T* drec, T* dh_direct, T* dc_prev) {
  const int64_t G = gate_count(cell), sw = cell_saved_width(cell, H);
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, G * H)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* sv = saved + b * sw;
      T* gx = dgx + b * G * H;
      for_each_vec<T>(H, [&](int64_t u, int64_t m) {
        const auto dhv = load(dh + b * H + u, m);
        switch (cell) {
          case Cell::RnnTanh:
          case Cell::RnnRelu:
            store(rnn_activation_backward(dhv, load(sv + u, m), cell == Cell::RnnRelu), gx + u, m);
            break;
          case Cell::Lstm: {
            const auto g = lstm_step_backward(
                dhv, dc ? load(dc + b * H + u, m) : Vec<T>(T(0)), load(sv + u, m),
                load(sv + H + u, m), load(sv + 2 * H + u, m), load(sv + 3 * H + u, m),
                load(cp + b * H + u, m), load(sv + 4 * H + u, m), static_cast<const T*>(nullptr), H, u, m);
            store_lstm_grads(g, gx, H, u, m);
            store(g.dc_prev, dc_prev + b * H + u, m);
            break;
          }
          default:  // Gru
            gru_step_backward(dhv, sv, sv + 4 * H, gx, drec + b * G * H, dh_direct + b * H, H, u, m);
        }
      });
    }
  });
}

}  // namespace

namespace {

// x, h (and c) and the weights of a cell call checked against each other and made contiguous
// in x's dtype (float32, float64 or bfloat16); `who` names the caller in the errors.
struct CellOperands {
  Cell cell;
  int64_t G, B, I, H;
  at::Tensor x, h, c, w_ih, w_hh, b_ih, b_hh;
};

CellOperands cell_operands(const char* who, const std::string& mode, const at::Tensor& x_,
                           const at::Tensor& h_, const c10::optional<at::Tensor>& c_,
                           const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                           const c10::optional<at::Tensor>& b_ih_,
                           const c10::optional<at::Tensor>& b_hh_) {
  CellOperands o;
  o.cell = parse_cell(mode);
  TORCH_CHECK(o.cell != Cell::GruCho, who, ": gru_cho is not supported (its n gate needs r of "
              "every unit first); use recurrent_forward");
  o.G = gate_count(o.cell);
  TORCH_CHECK(x_.dim() == 2, who, ": x must be (B, I), got ", x_.sizes());
  TORCH_CHECK(h_.dim() == 2 && h_.size(0) == x_.size(0), who, ": h must be (", x_.size(0),
              ", hidden_size), got ", h_.sizes());
  o.B = x_.size(0), o.I = x_.size(1), o.H = h_.size(1);
  const int64_t G = o.G, B = o.B, I = o.I, H = o.H;
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble ||
                  x_.scalar_type() == at::kBFloat16,
              who, ": dtype must be float32, float64 or bfloat16, got ", x_.scalar_type());
  TORCH_CHECK(w_ih_.sizes() == at::IntArrayRef({G * H, I}) && w_hh_.sizes() == at::IntArrayRef({G * H, H}),
              who, ": w_ih must be (", G * H, ", ", I, ") and w_hh (", G * H, ", ", H, "), got ",
              w_ih_.sizes(), " and ", w_hh_.sizes());
  const bool lstm = o.cell == Cell::Lstm;
  TORCH_CHECK(!lstm || (c_.has_value() && c_->sizes() == at::IntArrayRef({B, H})),
              who, ": lstm needs c of shape (", B, ", ", H, ")");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == x_.scalar_type() && t.device().is_cpu(), who, ": ", name,
                " must be a CPU tensor of x's dtype ", x_.scalar_type(), ", got ",
                t.scalar_type(), " on ", t.device());
    return contiguous_as(t, t.scalar_type());  // (materialises a negative-bit view too)
  };
  o.x = same(x_, "x"), o.h = same(h_, "h"), o.w_ih = same(w_ih_, "w_ih"), o.w_hh = same(w_hh_, "w_hh");
  if (lstm) o.c = same(*c_, "c");
  for (auto [src, dst, name] : {std::tuple{&b_ih_, &o.b_ih, "b_ih"}, std::tuple{&b_hh_, &o.b_hh, "b_hh"}}) {
    if (!src->has_value()) continue;
    TORCH_CHECK((*src)->sizes() == at::IntArrayRef({G * H}), who, ": ", name, " must be (",
                G * H, ",), got ", (*src)->sizes());
    *dst = same(**src, name);
  }
  return o;
}

// x·Wᵀ + b (b may be undefined)
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::addmm(b, x, w.t()) : at::mm(x, w.t());
}

// C (float, M × N, contiguous) = A (M × K bf16) · op(W) (bf16, fp32 accumulation), op(W) = Wᵀ
// (W stored N × K) when w_trans, else W (K × N). Both contiguous.
void product_bf16(const at::Tensor& A, const at::Tensor& W, bool w_trans, at::Tensor& C) {
  const int64_t M = A.size(0), K = A.size(1), N = C.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    C.zero_();
    return;
  }
  if (!gemm_bf16(false, w_trans, M, N, K, A.data_ptr<at::BFloat16>(), K,
                 W.data_ptr<at::BFloat16>(), w_trans ? K : N, C.data_ptr<float>(), N)) {
    const at::Tensor Wf = W.to(at::kFloat);
    at::mm_out(C, A.to(at::kFloat), w_trans ? Wf.t() : Wf);
  }
}

at::Tensor float_or_undefined(const at::Tensor& t) {
  return t.defined() ? t.to(at::kFloat) : at::Tensor();
}

// Whether a cell call's two products run as row products over the weights as stored, 4 rows
// at a time per block of weight rows, rather than as GEMMs, which pack both weights on every
// call: to `short_rows` rows, and to kBlockedRows where the rows are long enough (I, H ≥ 512)
// to pay for a reduction per output.
bool cell_rows_beat_gemm(const CellOperands& o, int64_t short_rows) {
  return o.B <= short_rows || (o.B <= kBlockedRows && std::min(o.I, o.H) >= 512);
}

// gx = x·W_ihᵀ and gh = h·W_hhᵀ of a cell call (B × G·H each) as those row products; Wt: the
// operands' and weights' type (T, or bf16 with T float).
template <typename T, typename Wt>
void cell_row_products(const CellOperands& o, T* gx, T* gh) {
  const int64_t GH = o.G * o.H;
  few_row_products<T, Wt>(
      {o.B, GH, o.I, o.x.data_ptr<Wt>(), o.I, o.w_ih.data_ptr<Wt>(), gx, GH},
      {o.B, GH, o.H, o.h.data_ptr<Wt>(), o.H, o.w_hh.data_ptr<Wt>(), gh, GH});
}

// A bf16 step: the products in fp32 (bf16 operands), the cell in fp32 on widened states, h' and
// c' rounded once; saved in fp32.
std::vector<at::Tensor> cell_step_bf16(const CellOperands& o, bool save) {
  const int64_t B = o.B, H = o.H, GH = o.G * o.H;
  const bool lstm = o.cell == Cell::Lstm;
  const auto f32 = o.x.options().dtype(at::kFloat);
  const at::Tensor bx = float_or_undefined(o.b_ih), bh = float_or_undefined(o.b_hh);
  const at::Tensor hf = o.h.to(at::kFloat), cf = lstm ? o.c.to(at::kFloat) : at::Tensor();
  at::Tensor h_out = at::empty({B, H}, f32), c_out = lstm ? at::empty({B, H}, f32) : at::Tensor();
  at::Tensor saved = save ? at::empty({B, cell_saved_width(o.cell, H)}, f32) : at::empty({0}, f32);
  float* sv = saved.numel() ? saved.data_ptr<float>() : nullptr;
  if (B > 0 && H > 0 && B <= kFewRows) {
    // A library bf16 GEMM for a few rows repacks the weights per call (0.4× of torch at H = 512)
    cell_step_kernel<float, at::BFloat16>(
        o.cell, B, o.I, H, o.x.data_ptr<at::BFloat16>(), o.h.data_ptr<at::BFloat16>(),
        hf.data_ptr<float>(), lstm ? cf.data_ptr<float>() : nullptr, o.w_ih.data_ptr<at::BFloat16>(),
        o.w_hh.data_ptr<at::BFloat16>(), data_or_null<float>(bx), data_or_null<float>(bh),
        h_out.data_ptr<float>(), lstm ? c_out.data_ptr<float>() : nullptr, sv);
  } else if (B > 0 && H > 0) {
    at::Tensor gx = at::empty({B, GH}, f32), gh = at::empty({B, GH}, f32);
    // Row products to 8 rows (see cell_rows_beat_gemm). Measured (Zen 4, 2 threads, µs,
    // GEMM → rows, torch): LSTMCell H = 1024 B = 8 1055–1216 → 642–1020 (1040), B = 32
    // 2202–2261 → 2017–2202 (~2000); GRUCell H = 1024 B = 16 915–979 → 673–697 (~900); but
    // LSTMCell H = 256 B = 32 137–153 → 176–216.
    if (cell_rows_beat_gemm(o, 8)) {
      cell_row_products<float, at::BFloat16>(o, gx.data_ptr<float>(), gh.data_ptr<float>());
    } else {
      product_bf16(o.x, o.w_ih, true, gx);
      product_bf16(o.h, o.w_hh, true, gh);
    }
    cell_step_rows<float>(o.cell, B, H, gx.data_ptr<float>(), data_or_null<float>(bx),
                          gh.data_ptr<float>(), data_or_null<float>(bh), hf.data_ptr<float>(),
                          lstm ? cf.data_ptr<float>() : nullptr, h_out.data_ptr<float>(),
                          lstm ? c_out.data_ptr<float>() : nullptr, sv);
  }
  return {h_out.to(at::kBFloat16), lstm ? c_out.to(at::kBFloat16) : at::empty({0}, o.x.options()),
          saved};
}

}  // namespace

std::vector<at::Tensor> cell_step(const std::string& mode, const at::Tensor& x_,
                                  const at::Tensor& h_, const c10::optional<at::Tensor>& c_,
                                  const at::Tensor& w_ih_, const at::Tensor& w_hh_,
                                  const c10::optional<at::Tensor>& b_ih_,
                                  const c10::optional<at::Tensor>& b_hh_, bool save) {
  const CellOperands o = cell_operands("seqkern cell_step", mode, x_, h_, c_, w_ih_, w_hh_, b_ih_, b_hh_);
  if (o.x.scalar_type() == at::kBFloat16) return cell_step_bf16(o, save);
  const int64_t B = o.B, H = o.H;
  const bool lstm = o.cell == Cell::Lstm;
  const auto opts = o.x.options();
  at::Tensor h_out = at::empty({B, H}, opts);
  at::Tensor c_out = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  at::Tensor saved = save ? at::empty({B, cell_saved_width(o.cell, H)}, opts) : at::empty({0}, opts);
  if (B == 0 || H == 0) return {h_out, c_out, saved};
  AT_DISPATCH_FLOATING_TYPES(o.x.scalar_type(), "seqkern_cell_step", [&] {
    const scalar_t* c = lstm ? o.c.data_ptr<scalar_t>() : nullptr;
    scalar_t* co = lstm ? c_out.data_ptr<scalar_t>() : nullptr;
    scalar_t* sv = saved.numel() ? saved.data_ptr<scalar_t>() : nullptr;
    if (B <= kFewRows) {
      cell_step_kernel<scalar_t>(o.cell, B, o.I, H, o.x.data_ptr<scalar_t>(), o.h.data_ptr<scalar_t>(),
                                 o.h.data_ptr<scalar_t>(), c,
                                 o.w_ih.data_ptr<scalar_t>(), o.w_hh.data_ptr<scalar_t>(),
                                 data_or_null<scalar_t>(o.b_ih), data_or_null<scalar_t>(o.b_hh),
                                 h_out.data_ptr<scalar_t>(), co, sv);
      return;
    }
    // float32 from 5 rows: row products to 16 rows (see cell_rows_beat_gemm). Measured (Zen 4, 2 threads, µs,
    // GEMM → rows, two alternated runs): I = H = 256, B = 8 LSTM 137 → 79, GRU 110 → 61, RNN
    // 46 → 27; B = 16 183 → 138, 143 → 106, 59 → 43; I = H = 1024, B = 8 3816 → 1459–1626,
    // 2722–2835 → 1018–1032, 643 → 194; B = 32 5826–5938 → 3853–3911, 4365–4494 → 2762–2962,
    // 1187 → 707–727; but at I = H = 256, B = 32 (before the weight vector was pinned to
    // registers: in_register) 283 → 309, 233 → 303, 96 → 104.
    if (std::is_same_v<scalar_t, float> && cell_rows_beat_gemm(o, 16)) {
      at::Tensor gx = at::empty({B, o.G * H}, opts), gh = at::empty({B, o.G * H}, opts);
      cell_row_products<scalar_t, scalar_t>(o, gx.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>());
      cell_step_rows<scalar_t>(o.cell, B, H, gx.data_ptr<scalar_t>(), data_or_null<scalar_t>(o.b_ih),
                               gh.data_ptr<scalar_t>(), data_or_null<scalar_t>(o.b_hh),
                               o.h.data_ptr<scalar_t>(), c, h_out.data_ptr<scalar_t>(), co, sv);
      return;
    }
    at::Tensor gx = linear(o.x, o.w_ih, o.b_ih), gh;
    if (o.cell == Cell::Gru) gh = linear(o.h, o.w_hh, o.b_hh);
    else gx.addmm_(o.h, o.w_hh.t());
    cell_step_rows<scalar_t>(o.cell, B, H, gx.data_ptr<scalar_t>(), nullptr,
                             data_or_null<scalar_t>(gh),
                             gh.defined() ? nullptr : data_or_null<scalar_t>(o.b_hh),
                             o.h.data_ptr<scalar_t>(), c, h_out.data_ptr<scalar_t>(), co, sv);
  });
  return {h_out, c_out, saved};
}

std::vector<at::Tensor> cell_backward(const std::string& mode, const at::Tensor& dh_,
                                      const c10::optional<at::Tensor>& dc_,
                                      const at::Tensor& saved, const at::Tensor& h_prev,
                                      const c10::optional<at::Tensor>& c_prev,
                                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      bool need_dx) {
  const char* who = "seqkern cell_backward";
  const Cell cell = parse_cell(mode);
  TORCH_CHECK(cell != Cell::GruCho, who, ": gru_cho is not supported");
  // (h_prev gives the step's shape and dtype; its values are not read: what the backward needs
  // of h is in `saved`)
  TORCH_CHECK(h_prev.dim() == 2, who, ": h_prev must be (B, H), got ", h_prev.sizes());
  const int64_t G = gate_count(cell), B = h_prev.size(0), H = h_prev.size(1);
  const bool lstm = cell == Cell::Lstm;
  // bf16 steps (cell_step_bf16) run their backward in fp32 too: the states and gradients are
  // widened, `saved` is fp32, and the products take the gate gradients rounded to bf16
  const auto io = h_prev.scalar_type();
  const bool bf16 = io == at::kBFloat16;
  const auto st = bf16 ? at::kFloat : io;
  auto take = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name, bool computed = false) {
    const auto want = computed ? st : io;
    TORCH_CHECK(t.sizes() == shape && t.scalar_type() == want && t.device().is_cpu(), who, ": ",
                name, " must be a CPU ", want, " tensor of shape ", shape, ", got ", t.scalar_type(),
                " ", t.sizes());
    return contiguous_as(t, st);
  };
  TORCH_CHECK(h_prev.device().is_cpu(), who, ": h_prev must be a CPU tensor, got ", h_prev.device());
  const at::Tensor dh = take(dh_, {B, H}, "dh");
  const at::Tensor sv = take(saved, {B, cell_saved_width(cell, H)}, "saved", true);
  at::Tensor dc, cp;
  if (lstm) {
    TORCH_CHECK(c_prev.has_value(), who, ": lstm needs c_prev");
    cp = take(*c_prev, {B, H}, "c_prev");
    if (dc_.has_value()) dc = take(*dc_, {B, H}, "dc");
  }
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == G * H && w_hh.size(1) == H && w_ih.dim() == 2 &&
                  w_ih.size(0) == G * H, who, ": w_ih must be (", G * H, ", I) and w_hh (", G * H,
              ", ", H, "), got ", w_ih.sizes(), " and ", w_hh.sizes());
  const auto opts = dh.options();
  at::Tensor dgx = at::empty({B, G * H}, opts);
  at::Tensor drec = cell == Cell::Gru ? at::empty({B, G * H}, opts) : dgx;
  at::Tensor dh_direct = cell == Cell::Gru ? at::empty({B, H}, opts) : at::Tensor();
  at::Tensor dc_prev = lstm ? at::empty({B, H}, opts) : at::empty({0}, opts);
  if (B > 0 && H > 0) {
    AT_DISPATCH_FLOATING_TYPES(st, "seqkern_cell_backward", [&] {
      cell_backward_rows<scalar_t>(
          cell, B, H, dh.data_ptr<scalar_t>(), dc.defined() ? dc.data_ptr<scalar_t>() : nullptr,
          sv.data_ptr<scalar_t>(), lstm ? cp.data_ptr<scalar_t>() : nullptr, dgx.data_ptr<scalar_t>(), drec.data_ptr<scalar_t>(),
          dh_direct.defined() ? dh_direct.data_ptr<scalar_t>() : nullptr,
          lstm ? dc_prev.data_ptr<scalar_t>() : nullptr);
    });
  }
  // dh = drec·W_hh (+ GRU's z ⊙ h path); dx = dgx·W_ih
  if (bf16) {
    TORCH_CHECK(w_ih.scalar_type() == io && w_hh.scalar_type() == io, who,
                ": the weights must be bfloat16 as h_prev");
    at::Tensor dh_prev = at::empty({B, H}, opts), dx = at::empty({0}, opts);
    product_bf16(drec.to(io), contiguous_as(w_hh, io), false, dh_prev);
    if (dh_direct.defined()) dh_prev.add_(dh_direct);
    if (need_dx) {
      dx = at::empty({B, w_ih.size(1)}, opts);
      product_bf16(dgx.to(io), contiguous_as(w_ih, io), false, dx);
    }
    return {dgx, drec, dx.to(io), dh_prev.to(io), dc_prev.to(io)};
  }
  const at::Tensor whh = contiguous_as(w_hh, st);
  at::Tensor dh_prev = dh_direct.defined() ? at::addmm(dh_direct, drec, whh) : at::mm(drec, whh);
  at::Tensor dx = need_dx ? at::mm(dgx, contiguous_as(w_ih, st)) : at::empty({0}, opts);
  return {dgx, drec, dx, dh_prev, dc_prev};
}

std::vector<at::Tensor> recurrent_forward(
    const std::string& mode, const at::Tensor& x_, const at::Tensor& batch_sizes,
    const at::Tensor& h0_, const c10::optional<at::Tensor>& c0_, const at::Tensor& w_ih_,
    const at::Tensor& w_hh_, const c10::optional<at::Tensor>& b_ih_,
    const c10::optional<at::Tensor>& b_hh_, const c10::optional<at::Tensor>& w_peep_,
    const c10::optional<at::Tensor>& w_hr_, bool reverse, bool save) {
  const Cell cell = parse_cell(mode);
  check_common(cell, x_, batch_sizes, h0_, opt(c0_), w_ih_, w_hh_, opt(w_hr_));
  TORCH_CHECK(cell == Cell::Lstm || (!w_peep_.has_value() && !w_hr_.has_value()),
              "seqkern: peephole and projection weights apply to LSTM only");
  const auto st = x_.scalar_type();
  {
    const int64_t G = gate_count(cell), H = w_ih_.size(0) / G;
    const char* who = "seqkern cpu recurrence";
    check_shape(who, "bias_ih", opt(b_ih_), {G * H});
    check_shape(who, "bias_hh", opt(b_hh_), {G * H});
    check_shape(who, "weight_peep", opt(w_peep_), {3, H});
    if (w_hr_.has_value()) check_shape(who, "weight_hr", *w_hr_, {w_hr_->size(0), H});
  }
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"h0", &h0_}, {"c0", &opt(c0_)},
                         {"weight_ih", &w_ih_}, {"weight_hh", &w_hh_}, {"bias_ih", &opt(b_ih_)},
                         {"bias_hh", &opt(b_hh_)}, {"weight_peep", &opt(w_peep_)},
                         {"weight_hr", &opt(w_hr_)}})
    TORCH_CHECK(!t->defined() || (t->scalar_type() == st && t->device() == x_.device()),
                "seqkern cpu recurrence: ", name, " must have x's dtype and device (", st, ", ",
                x_.device(), "), got (", t->scalar_type(), ", ", t->device(), ")");
  const auto ct = compute_type(st, "seqkern: the recurrent kernels");
  Layout L(batch_sizes);
  const int64_t G = gate_count(cell), H = w_hh_.size(0) / G;
  // bfloat16 weights and inputs: the products take bf16 operands with fp32 sums; the state and
  // the gate math stay in fp32. Where bf16 tiles run (AMX or AVX512_BF16), the fused loop
  // does both products per step on them (the input projection too, when I is even: VNNI pairs
  // rows of K); otherwise the input projection, half of the FLOPs, is one bf16 GEMM (gemm_bf16).
  Bf16Operands bf;
  const bool bf16 = st == at::kBFloat16 && w_ih_.scalar_type() == at::kBFloat16 &&
                    w_hh_.scalar_type() == at::kBFloat16;
  // One inference step of a few sequences (the layers' streaming call, T = 1) is the cells'
  // kernel: one parallel region with each thread's gates finished in it, where forward_impl
  // allocates the projection and product tensors and runs the gate pass after the products.
  // Measured, µs per call (2 threads, H = I = 128, B = 1): LSTM 14.3 → 11.2, GRU 11.8 → 9.7,
  // RNN 8.4 → 7.3; LSTM H = 64, B = 4: 16.2 → 11.5. bf16 weights are read as they are.
  const bool one_step = !save && L.T == 1 && L.B <= kFewRows && (st == ct || bf16) &&
                        cell != Cell::GruCho && !w_peep_.has_value() && !w_hr_.has_value();
  if (bf16 && L.N > 0 && !one_step) {
    const int64_t I = x_.size(1);
    const bool amx = bf16_tiles(cell, w_hr_.has_value(), L, H);
    bf.few_rows = !amx && L.B <= kFewRows && !w_hr_.has_value() && cell != Cell::GruCho;
    if (amx || bf.few_rows) bf.w_hh = contiguous_as(w_hh_, at::kBFloat16);
    if (amx && I % 2 == 0 && fuse_bf16_projection(cell, G * H * (H + I), L.B)) {
      bf.x = contiguous_as(x_, at::kBFloat16);
      bf.w_ih = contiguous_as(w_ih_, at::kBFloat16);
    } else {
      auto xb = contiguous_as(x_, at::kBFloat16), wb = contiguous_as(w_ih_, at::kBFloat16);
      at::Tensor xg = empty_large({L.N, G * H}, x_.options().dtype(ct));
      if (gemm_bf16(false, true, L.N, G * H, I, xb.data_ptr<at::BFloat16>(), I,
                       wb.data_ptr<at::BFloat16>(), I, xg.data_ptr<float>(), G * H))
        bf.xg = xg;
      else
        bf.w_hh = at::Tensor(), bf.few_rows = false;  // no bf16 GEMM at all: all in fp32
    }
  }
  // fp32 copies of what the bf16 operands do not replace (a bf16 step reads x and both
  // weights as bf16)
  const bool bf16_step = bf16 && one_step;
  auto x = bf.x.defined() ? x_ : contiguous_as(x_, bf16_step ? st : ct);
  auto w_ih = bf.w_ih.defined() || bf16_step ? contiguous_as(w_ih_, st) : contiguous_as(w_ih_, ct);
  auto w_hh = bf.w_hh.defined() || bf16_step ? contiguous_as(w_hh_, st) : contiguous_as(w_hh_, ct);
  auto h0 = contiguous_as(h0_, ct), c0 = contiguous_as(opt(c0_), ct);
  auto b_ih = contiguous_as(opt(b_ih_), ct), b_hh = contiguous_as(opt(b_hh_), ct);
  auto w_peep = contiguous_as(opt(w_peep_), ct), w_hr = contiguous_as(opt(w_hr_), ct);

  const int64_t Hs = h0.size(1);
  const bool lstm = cell == Cell::Lstm;
  auto opts = x_.options().dtype(ct);
  at::Tensor out = empty_large({L.N, Hs}, opts);
  at::Tensor h_state = one_step ? at::empty_like(h0) : h0.clone();
  at::Tensor c_state = !lstm ? at::empty({0}, opts) : one_step ? at::empty_like(c0) : c0.clone();
  at::Tensor ws_gates = empty_large({save && cell != Cell::RnnTanh && cell != Cell::RnnRelu
                                       ? L.N : 0,
                                   cell == Cell::Gru ? 4 * H : G * H}, opts);
  at::Tensor ws_cells = empty_large({save && lstm ? L.N : 0, w_hr.defined() ? 3 * H : 2 * H}, opts);
  at::Tensor ws_hprev = empty_large({save ? L.N : 0, Hs}, opts);
  if (L.N > 0 && bf16_step) {
    const at::Tensor hb = contiguous_as(h0_, st);  // the product's operand; h0 the state
    cell_step_kernel<float, at::BFloat16>(
        cell, L.B, x.size(1), H, x.data_ptr<at::BFloat16>(), hb.data_ptr<at::BFloat16>(),
        h0.data_ptr<float>(), lstm ? c0.data_ptr<float>() : nullptr, w_ih.data_ptr<at::BFloat16>(),
        w_hh.data_ptr<at::BFloat16>(), data_or_null<float>(b_ih), data_or_null<float>(b_hh),
        h_state.data_ptr<float>(), lstm ? c_state.data_ptr<float>() : nullptr, nullptr);
    out.copy_(h_state);
  } else if (L.N > 0 && one_step) {
    AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_recurrent_step", [&] {
      cell_step_kernel<scalar_t>(cell, L.B, x.size(1), H, x.data_ptr<scalar_t>(),
                                 h0.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(),
                                 lstm ? c0.data_ptr<scalar_t>() : nullptr,
                                 w_ih.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
                                 data_or_null<scalar_t>(b_ih), data_or_null<scalar_t>(b_hh),
                                 h_state.data_ptr<scalar_t>(),
                                 lstm ? c_state.data_ptr<scalar_t>() : nullptr, nullptr);
    });
    out.copy_(h_state);
  } else if (L.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_recurrent_forward", [&] {
      forward_impl<scalar_t>(cell, L, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peep, w_hr, reverse,
                             out, h_state, c_state, ws_gates, ws_cells, ws_hprev, save, bf);
    });
  }
  // h_n rows beyond batch_sizes[0] do not exist: the batch is batch_sizes[0] == h0.size(0).
  return {contiguous_as(out, st), contiguous_as(h_state, st), contiguous_as(c_state, st),
          ws_gates, ws_cells, ws_hprev};
}

// The layer loop of ops._recurrence for its commonest call, in C++: at B = 1 a streaming call's
// Python per layer (zero states, views, stacking) cost more than a short step (see the note).
std::vector<at::Tensor> recurrent_module_forward(
    const std::string& mode, const at::Tensor& input,
    const std::vector<c10::optional<at::Tensor>>& weights, int64_t num_layers, bool bidirectional,
    bool batch_first) {
  const Cell cell = parse_cell(mode);
  const int64_t D = bidirectional ? 2 : 1;
  TORCH_CHECK(num_layers >= 1 && int64_t(weights.size()) == 6 * num_layers * D,
              "seqkern recurrent_module_forward: expected 6 weights for each of ", num_layers * D,
              " layers and directions, got ", weights.size());
  TORCH_CHECK(input.dim() == 2 || input.dim() == 3,
              "seqkern recurrent_module_forward: input must be 2-D or 3-D, got ", input.sizes());
  const bool unbatched = input.dim() == 2;
  const at::Tensor seq = unbatched ? input.unsqueeze(1) : batch_first ? input.transpose(0, 1) : input;
  const int64_t T = seq.size(0), B = seq.size(1);
  TORCH_CHECK(T > 0 && B > 0, "seqkern recurrent_module_forward: empty input ", input.sizes());
  at::Tensor x = seq.reshape({T * B, seq.size(2)});
  const at::Tensor batch_sizes = at::full({T}, B, at::kLong);
  const bool lstm = cell == Cell::Lstm;
  for (int64_t i = 0; i < num_layers * D; ++i)
    TORCH_CHECK(weights[6 * i].has_value() && weights[6 * i + 1].has_value(),
                "seqkern recurrent_module_forward: layer ", i / D, " lacks weight_ih or weight_hh");
  // zero initial states, read only: one pair for every layer (all have the same H and Hs)
  const int64_t H = weights[0]->size(0) / gate_count(cell);
  const at::Tensor h0 = at::zeros({B, weights[5].has_value() ? weights[5]->size(0) : H}, x.options());
  const c10::optional<at::Tensor> c0 =
      lstm ? c10::optional<at::Tensor>(at::zeros({B, H}, x.options())) : c10::nullopt;
  std::vector<at::Tensor> hs, cs;
  for (int64_t k = 0; k < num_layers; ++k) {
    std::vector<at::Tensor> outs;
    for (int64_t d = 0; d < D; ++d) {
      const auto* w = weights.data() + 6 * (k * D + d);
      auto r = recurrent_forward(mode, x, batch_sizes, h0, c0, *w[0], *w[1], w[2], w[3], w[4],
                                 w[5], d == 1, false);
      outs.push_back(r[0]);
      hs.push_back(r[1]);
      cs.push_back(r[2]);
    }
    x = D == 1 ? outs[0] : at::cat(outs, 1);
  }
  // (resized, not viewed: torch's output is no view, and one made under no_grad could not be
  // written in place with grad enabled later)
  at::Tensor output = x.resize_({T, B, x.size(1)});
  at::Tensor h_n = at::stack(hs), c_n = lstm ? at::stack(cs) : at::Tensor();
  if (unbatched) {
    output = output.squeeze(1);
    h_n = h_n.squeeze(1);
    if (lstm) c_n = c_n.squeeze(1);
  } else if (batch_first) {
    output = output.transpose(0, 1);
  }
  return {output, h_n, c_n};
}

std::vector<at::Tensor> recurrent_backward(
    const std::string& mode, const c10::optional<at::Tensor>& grad_out,
    const c10::optional<at::Tensor>& grad_hn, const c10::optional<at::Tensor>& grad_cn,
    const at::Tensor& x_, const at::Tensor& batch_sizes, const at::Tensor& w_ih_,
    const at::Tensor& w_hh_, const c10::optional<at::Tensor>& b_ih_,
    const c10::optional<at::Tensor>& b_hh_, const c10::optional<at::Tensor>& w_peep_,
    const c10::optional<at::Tensor>& w_hr_, const at::Tensor& h_n, const at::Tensor& ws_gates,
    const at::Tensor& ws_cells, const at::Tensor& ws_hprev, bool reverse) {
  const Cell cell = parse_cell(mode);
  const auto st = x_.scalar_type();
  const auto ct = compute_type(st, "seqkern: the recurrent kernels");
  Layout L(batch_sizes);
  TORCH_CHECK(ws_hprev.dim() == 2 && ws_hprev.size(0) == L.N,
              "seqkern cpu recurrence backward: the forward did not save activations "
              "(it ran with save=False)");
  {  // what the forward returned and saved, for the weights given (a direct call may mix them)
    const int64_t G = gate_count(cell);
    TORCH_CHECK(x_.dim() == 2 && x_.size(0) == L.N && w_ih_.dim() == 2 &&
                    w_ih_.size(1) == x_.size(1) && w_ih_.size(0) % G == 0,
                "seqkern cpu recurrence backward: x (", x_.sizes(), ") and weight_ih (",
                w_ih_.sizes(), ") do not match batch_sizes and each other");
    const int64_t H = w_ih_.size(0) / G, Hs = w_hr_.has_value() ? w_hr_->size(0) : H;
    auto check = [](const char* name, const at::Tensor& t, std::initializer_list<int64_t> want) {
      check_shape("seqkern cpu recurrence backward", name, t, want);
    };
    check("weight_hh", w_hh_, {G * H, Hs});
    check("ws_hprev", ws_hprev, {L.N, Hs});
    check("grad_out", opt(grad_out), {L.N, Hs});
    if (L.T > 0) {  // (with no steps the batch is h0's, which the backward is not given)
      check("grad_hn", opt(grad_hn), {L.B, Hs});
      check("grad_cn", opt(grad_cn), {L.B, H});
      if (cell == Cell::RnnTanh || cell == Cell::RnnRelu) check("h_n", h_n, {L.B, Hs});
    }
    check("bias_ih", opt(b_ih_), {G * H});
    check("bias_hh", opt(b_hh_), {G * H});
    check("weight_peep", opt(w_peep_), {3, H});
    if (w_hr_.has_value()) check("weight_hr", *w_hr_, {Hs, H});
    if (cell != Cell::RnnTanh && cell != Cell::RnnRelu)
      check("ws_gates", ws_gates, {L.N, cell == Cell::Gru ? 4 * H : G * H});
    if (cell == Cell::Lstm) check("ws_cells", ws_cells, {L.N, w_hr_.has_value() ? 3 * H : 2 * H});
  }
  Bf16Operands bf;  // bf16 inputs: the large weight-gradient GEMMs in bf16
  if (st == at::kBFloat16 && w_ih_.scalar_type() == at::kBFloat16 && L.N > 0) {
    bf.x = contiguous_as(x_, at::kBFloat16);
    bf.w_ih = contiguous_as(w_ih_, at::kBFloat16);
    // and, as in the forward, the recurrent product on brgemm tiles
    if (w_hh_.scalar_type() == at::kBFloat16 &&
        bf16_tiles(cell, w_hr_.has_value(), L, w_ih_.size(0) / gate_count(cell)))
      bf.w_hh = contiguous_as(w_hh_, at::kBFloat16);
  }
  // fp32 copies only of what the bf16 operands do not replace (backward_impl converts x and
  // W_ih itself if the bf16 GEMMs turn out unavailable); h_n only feeds the RNN cells'
  // derivative. Measured bf16 LSTM training, T = 100, B = 32, H = I = 256: these copies were
  // ~4 % of the call.
  auto x = bf.x.defined() ? bf.x : contiguous_as(x_, ct);
  auto w_ih = bf.w_ih.defined() ? bf.w_ih : contiguous_as(w_ih_, ct);
  auto w_hh = bf.w_hh.defined() ? bf.w_hh : contiguous_as(w_hh_, ct);
  auto b_ih = contiguous_as(opt(b_ih_), ct), b_hh = contiguous_as(opt(b_hh_), ct);
  auto w_peep = contiguous_as(opt(w_peep_), ct), w_hr = contiguous_as(opt(w_hr_), ct);
  auto g_out = contiguous_as(opt(grad_out), ct), g_hn = contiguous_as(opt(grad_hn), ct);
  auto g_cn = contiguous_as(opt(grad_cn), ct);
  const bool rnn_cell = cell == Cell::RnnTanh || cell == Cell::RnnRelu;
  auto hn = rnn_cell ? contiguous_as(h_n, ct) : at::Tensor();
  std::vector<at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_recurrent_backward", [&] {
    r = backward_impl<scalar_t>(cell, L, g_out, g_hn, g_cn, x, w_ih, w_hh, b_ih, b_hh, w_peep,
                                w_hr, hn, ws_gates.contiguous(), ws_cells.contiguous(),
                                ws_hprev.contiguous(), reverse, bf);
  });
  // Gradients come back in the dtype of what they differentiate.
  auto cast = [](const at::Tensor& g, at::ScalarType s) { return contiguous_as(g, s); };
  return {cast(r[0], st), cast(r[1], st), cast(r[2], st), cast(r[3], w_ih_.scalar_type()),
          cast(r[4], w_hh_.scalar_type()), cast(r[5], st), cast(r[6], st), cast(r[7], st),
          cast(r[8], st)};
}

}  // namespace seqkern::cpu
