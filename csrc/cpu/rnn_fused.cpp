// The float32 time loops with the recurrent GEMM fused into the gate math.
//
// Per step, a library GEMM writes the (B, G·H) pre-activations to memory and a second pass
// reads them back; at the batch sizes recurrences run at (1..64 rows) the GEMM is also far from
// peak, because BLAS kernels are tuned for large M. Here W_hh is packed once per call into
// panels of one vector width of hidden units × all G gates, and each (rows × panel) tile is
// accumulated in registers and finished in place: the gates of those units are computed and
// the state is updated before the tile leaves the registers.
//
// Threads split the hidden units and stay alive for the whole sequence (one OpenMP region,
// not one per step); a step only needs every thread's slice of h before the next one starts,
// so there is exactly one barrier per step, forward and backward. h is double-buffered.
//
// Backward per step: phase 1 (own units) turns dh, dc into the gate gradients; after the
// barrier, phase 2 computes dh_prev = dgates · W_hh for the thread's own columns, which are the
// same units phase 1 of the next step reads, so no second barrier is needed.
#include "isa.h"

#include <omp.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "cpu/rnn_cells.h"
#include "cpu/rnn_common.h"
#include "cpu/vec_math.h"

namespace seqkern::cpu::rnn_detail {
namespace {

using V = Vec<float>;
constexpr int64_t kW = V::size();

// Registers available for accumulators: MR rows × NV vectors, plus NV loads and 1 broadcast.
constexpr int mr_max(int nv) {
  return kW >= 16 ? (nv >= 4 ? 6 : nv == 3 ? 7 : 12) : (nv >= 4 ? 2 : nv == 3 ? 3 : 8);
}

// acc[m·NV + j] = Σ_k A[m, k] · P[k, j·W .. (j+1)·W), P a panel of K rows of NV vectors.
// With few accumulators (B = 1 is a GEMV) the FMA latency, not throughput, would bound the
// loop, so the k range is split over S independent banks that are summed at the end: about
// 8 FMA chains are needed to keep both FMA ports busy.
template <int MR, int NV>
inline void panel_gemm(const float* A, int64_t lda, const float* P, int64_t K, V* acc) {
  constexpr int S = MR * NV >= 8 ? 1 : (8 / (MR * NV) >= 4 ? 4 : 8 / (MR * NV));
  V c[S][MR][NV];
#pragma GCC unroll 4
  for (int q = 0; q < S; ++q)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[q][m][j] = V(0.0f);
  int64_t k = 0;
  for (; k + S <= K; k += S) {
#pragma GCC unroll 4
    for (int q = 0; q < S; ++q) {
      V b[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) b[j] = V::loadu(P + ((k + q) * NV + j) * kW);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const V a(A[m * lda + k + q]);
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) c[q][m][j] = at::vec::fmadd(a, b[j], c[q][m][j]);
      }
    }
  }
  for (; k < K; ++k) {
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const V a(A[m * lda + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j)
        c[0][m][j] = at::vec::fmadd(a, V::loadu(P + (k * NV + j) * kW), c[0][m][j]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      V sum = c[0][m][j];
#pragma GCC unroll 4
      for (int q = 1; q < S; ++q) sum = sum + c[q][m][j];
      acc[m * NV + j] = sum;
    }
}

// panel_gemm with the row count chosen at run time (1..MR).
template <int NV, int MR>
inline void panel_gemm_rows(int mr, const float* A, int64_t lda, const float* P, int64_t K,
                            V* acc) {
  if constexpr (MR >= 1) {
    if (mr == MR) return panel_gemm<MR, NV>(A, lda, P, K, acc);
    panel_gemm_rows<NV, MR - 1>(mr, A, lda, P, K, acc);
  }
}

int64_t panels(int64_t H) { return (H + kW - 1) / kW; }

// Forward: W_hh (G·H, H) → [panel p][k][gate g][lane l] = W_hh[g·H + p·W + l, k] (0 past H).
std::vector<float> pack_gate_panels(const float* w, int64_t G, int64_t H) {
  const int64_t P = panels(H);
  std::vector<float> out(P * H * G * kW, 0.0f);
  // Source rows are read contiguously; the writes of one (panel, gate) stay within one panel
  // (H·G·W floats), which is cache resident.
  for (int64_t g = 0; g < G; ++g)
    for (int64_t u = 0; u < H; ++u) {
      const float* src = w + (g * H + u) * H;
      float* dst = out.data() + ((u / kW) * H * G + g) * kW + u % kW;
      for (int64_t k = 0; k < H; ++k) dst[k * G * kW] = src[k];
    }
  return out;
}

// Backward: W_hh (G·H, H) as the right operand of dgates · W_hh → [panel p][k][lane l] =
// W_hh[k, p·W + l] for k < G·H.
std::vector<float> pack_column_panels(const float* w, int64_t GH, int64_t H) {
  const int64_t P = panels(H);
  std::vector<float> out(P * GH * kW, 0.0f);
  for (int64_t k = 0; k < GH; ++k)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t n = std::min<int64_t>(kW, H - p * kW);
      std::copy(w + k * H + p * kW, w + k * H + p * kW + n, out.data() + (p * GH + k) * kW);
    }
  return out;
}

// One thread when a step is too small to pay for a barrier.
int thread_count(int64_t B, int64_t GH, int64_t H) {
  const int64_t work = B * GH * H;
  static const int64_t min_work = [] { const char* e = std::getenv("SEQKERN_RNN_MIN_WORK"); return e ? std::atoll(e) : (1 << 17); }();
  int nt = work < min_work ? 1 : at::get_num_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, panels(H))));
}

// ------------------------------------------------------------------ forward ----------------

template <Cell C>
inline void forward_tile(const ForwardArgs& a, int64_t m, int64_t o, int64_t u0, int64_t n,
                         const V* acc, const float* hp, float* hn) {
  const int64_t H = a.H, G = gate_count(C), GH = G * H;
  const float* xr = a.xg + (o + m) * GH;
  auto pre = [&](int64_t g) {
    return acc[g] + load(xr + g * H + u0, n) + load(a.bias + g * H + u0, n);
  };
  float* gs = a.save_gates ? a.save_gates + (o + m) * (C == Cell::Gru ? 4 * H : GH) : nullptr;
  V h;
  if constexpr (C == Cell::RnnTanh || C == Cell::RnnRelu) {
    h = rnn_activation(pre(0), C == Cell::RnnRelu);
  } else if constexpr (C == Cell::Lstm) {
    float* c = a.c + m * H + u0;
    auto cp = load(c, n);
    auto st = lstm_step(pre(0), pre(1), pre(2), pre(3), cp, a.peep, H, u0, n);
    h = st.m;
    store(st.c, c, n);
    if (gs) {
      store(st.i, gs + u0, n);
      store(st.f, gs + H + u0, n);
      store(st.g, gs + 2 * H + u0, n);
      store(st.o, gs + 3 * H + u0, n);
      float* cv = a.save_cells + (o + m) * 2 * H;
      store(cp, cv + u0, n);
      store(st.c, cv + H + u0, n);
    }
  } else {  // GRU, PyTorch convention
    auto r = sigmoid(pre(0));
    auto z = sigmoid(pre(1));
    auto hlin = a.b_hn ? acc[2] + load(a.b_hn + u0, n) : acc[2];
    auto nn = tanh(load(xr + 2 * H + u0, n) + load(a.bias + 2 * H + u0, n) + r * hlin);
    h = gru_mix(nn, z, load(hp + m * H + u0, n));
    if (gs) {
      store(r, gs + u0, n);
      store(z, gs + H + u0, n);
      store(nn, gs + 2 * H + u0, n);
      store(hlin, gs + 3 * H + u0, n);
    }
  }
  store(h, hn + m * H + u0, n);
  store(h, a.out + (o + m) * H + u0, n);
  if (a.save_hprev) store(load(hp + m * H + u0, n), a.save_hprev + (o + m) * H + u0, n);
}

template <Cell C>
void forward_loop(const ForwardArgs& a) {
  constexpr int NV = static_cast<int>(gate_count(C));
  constexpr int MR = mr_max(NV);
  const Layout& L = *a.L;
  const int64_t H = a.H, B = L.B, P = panels(H);
  const std::vector<float> wp = pack_gate_panels(a.w_hh, NV, H);
  std::vector<float> hbuf(2 * B * H);
  std::copy(a.h0, a.h0 + B * H, hbuf.begin());
  std::copy(a.h0, a.h0 + B * H, hbuf.begin() + B * H);
  const int nt = thread_count(B, NV * H, H);

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n_threads = omp_get_num_threads();
    const int64_t p0 = P * tid / n_threads, p1 = P * (tid + 1) / n_threads;
    V acc[MR * NV];
    for (int64_t s = 0; s < L.T; ++s) {
      const int64_t t = L.step(s, a.reverse), bs = L.bs[t], o = L.off[t];
      const float* hp = hbuf.data() + (s & 1) * B * H;
      float* hn = hbuf.data() + ((s + 1) & 1) * B * H;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t u0 = p * kW, n = std::min<int64_t>(kW, H - u0);
        const float* panel = wp.data() + p * H * NV * kW;
        for (int64_t m0 = 0; m0 < bs; m0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, bs - m0));
          panel_gemm_rows<NV, MR>(mr, hp + m0 * H, H, panel, H, acc);
          for (int mi = 0; mi < mr; ++mi) forward_tile<C>(a, m0 + mi, o, u0, n, acc + mi * NV, hp, hn);
        }
      }
#pragma omp barrier
    }
  }
  // Each sequence's final state is its output at its last step: t = length − 1 going forward,
  // t = 0 going backward.
  for (int64_t b = 0; b < B; ++b) {
    int64_t t_last = 0;
    if (!a.reverse)
      while (t_last + 1 < L.T && L.bs[t_last + 1] > b) ++t_last;
    std::copy(a.out + (L.off[t_last] + b) * H, a.out + (L.off[t_last] + b + 1) * H, a.h_n + b * H);
  }
}

// ------------------------------------------------------------------ backward ---------------

template <Cell C>
inline void backward_tile(const BackwardArgs& a, int64_t m, int64_t o, int64_t u0, int64_t n) {
  const int64_t H = a.H, G = gate_count(C), GH = G * H;
  float* dh = a.dh + m * H + u0;
  auto d = load(dh, n);
  if (a.grad_out) d = d + load(a.grad_out + (o + m) * H + u0, n);
  float* dx = a.dxg + (o + m) * GH;
  if constexpr (C == Cell::RnnTanh || C == Cell::RnnRelu) {
    auto y = load(a.out + (o + m) * H + u0, n);
    store(rnn_activation_backward(d, y, C == Cell::RnnRelu), dx + u0, n);
  } else if constexpr (C == Cell::Lstm) {
    const float* gs = a.gates + (o + m) * GH;
    const float* cv = a.cells + (o + m) * 2 * H;
    float* dc = a.dc + m * H + u0;
    auto gr = lstm_step_backward(d, load(dc, n), load(gs + u0, n), load(gs + H + u0, n),
                                 load(gs + 2 * H + u0, n), load(gs + 3 * H + u0, n),
                                 load(cv + u0, n), load(cv + H + u0, n), a.peep, H, u0, n);
    store(gr.dc_prev, dc, n);
    store(gr.di, dx + u0, n);
    store(gr.df, dx + H + u0, n);
    store(gr.dg, dx + 2 * H + u0, n);
    store(gr.do_, dx + 3 * H + u0, n);
  } else {  // GRU
    const float* gs = a.gates + (o + m) * 4 * H;
    auto r = load(gs + u0, n), hlin = load(gs + 3 * H + u0, n);
    auto gr = gru_mix_backward(d, load(gs + 2 * H + u0, n), load(gs + H + u0, n),
                               load(a.hprev + (o + m) * H + u0, n));
    auto dar = gr.dn_pre * hlin * r * (V(1.0f) - r);
    float* dr = a.drec + (o + m) * GH;
    store(dar, dx + u0, n);
    store(gr.dz_pre, dx + H + u0, n);
    store(gr.dn_pre, dx + 2 * H + u0, n);
    store(dar, dr + u0, n);
    store(gr.dz_pre, dr + H + u0, n);
    store(gr.dn_pre * r, dr + 2 * H + u0, n);
    store(gr.dh_direct, dh, n);  // phase 2 adds the matmul path
  }
}

template <Cell C>
void backward_loop(const BackwardArgs& a) {
  constexpr int G = static_cast<int>(gate_count(C));
  constexpr int MR = mr_max(1);
  const Layout& L = *a.L;
  const int64_t H = a.H, GH = G * H, B = L.B, P = panels(H);
  const std::vector<float> wb = pack_column_panels(a.w_hh, GH, H);
  const int nt = thread_count(B, GH, H);
  constexpr bool accumulate = C == Cell::Gru;

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n_threads = omp_get_num_threads();
    const int64_t p0 = P * tid / n_threads, p1 = P * (tid + 1) / n_threads;
    V acc[MR];
    for (int64_t s = L.T - 1; s >= 0; --s) {
      const int64_t t = L.step(s, a.reverse), bs = L.bs[t], o = L.off[t];
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t u0 = p * kW, n = std::min<int64_t>(kW, H - u0);
        for (int64_t m = 0; m < bs; ++m) backward_tile<C>(a, m, o, u0, n);
      }
#pragma omp barrier
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t u0 = p * kW, n = std::min<int64_t>(kW, H - u0);
        const float* panel = wb.data() + p * GH * kW;
        for (int64_t m0 = 0; m0 < bs; m0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, bs - m0));
          panel_gemm_rows<1, MR>(mr, a.drec + (o + m0) * GH, GH, panel, GH, acc);
          for (int mi = 0; mi < mr; ++mi) {
            float* dh = a.dh + (m0 + mi) * H + u0;
            store(accumulate ? acc[mi] + load(dh, n) : acc[mi], dh, n);
          }
        }
      }
    }
  }
}

}  // namespace

void fused_forward(const ForwardArgs& a) {
  switch (a.cell) {
    case Cell::RnnTanh: return forward_loop<Cell::RnnTanh>(a);
    case Cell::RnnRelu: return forward_loop<Cell::RnnRelu>(a);
    case Cell::Lstm: return forward_loop<Cell::Lstm>(a);
    case Cell::Gru: return forward_loop<Cell::Gru>(a);
    default: TORCH_CHECK(false, "seqkern: no fused loop for this cell");
  }
}

void fused_backward(const BackwardArgs& a) {
  switch (a.cell) {
    case Cell::RnnTanh: return backward_loop<Cell::RnnTanh>(a);
    case Cell::RnnRelu: return backward_loop<Cell::RnnRelu>(a);
    case Cell::Lstm: return backward_loop<Cell::Lstm>(a);
    case Cell::Gru: return backward_loop<Cell::Gru>(a);
    default: TORCH_CHECK(false, "seqkern: no fused loop for this cell");
  }
}

}  // namespace seqkern::cpu::rnn_detail
