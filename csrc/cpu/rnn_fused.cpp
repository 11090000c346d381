// The float32 time loops with the recurrent GEMM fused into the gate math.
//
// Per step, a library GEMM writes the (B, G·H) pre-activations to memory and a second pass
// reads them back; at the batch sizes recurrences run at (1..64 rows) the GEMM is also far from
// peak, because BLAS kernels are tuned for large M. Here W_hh is packed once per call into
// panels of one vector width of hidden units × all G gates, and each (rows × panel) tile is
// accumulated in registers and finished in place: the gates of those units are computed and
// the state is updated before the tile leaves the registers.
//
// The input projection x_t·W_ih is accumulated into the same tiles where that measured faster
// (fuse_input_projection); otherwise each thread makes its panels' share for all steps before
// the first (project_inputs), or it is read from one GEMM done beforehand (xg_in_loop). With
// bfloat16 weights at B ≥ 8 the tile products are bf16 tile products (gemm.h:
// bf16_tile_product: seqkern's AMX loop on operands padded to whole tiles, oneDNN's brgemm, or
// vdpbf16ps register tiles) instead of the fp32 register-tile GEMM below; the gate math is the
// same.
//
// Threads split the hidden units and stay alive for the whole sequence (one OpenMP region,
// not one per step); a step only needs every thread's slice of h before the next one starts,
// so there is exactly one barrier per step (StepBarrier), forward and backward. h is
// double-buffered. Where the barrier costs more than it saves, threads split the batch rows
// instead and need none (split_by_rows).
//
// Backward per step: phase 1 (own units) turns dh, dc into the gate gradients; after the
// barrier, phase 2 computes dh_prev = dgates · W_hh for the thread's own columns, which are the
// same units phase 1 of the next step reads, so no second barrier is needed.
#include "isa.h"

#include <omp.h>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/transpose.h"
#include "cpu/rnn_cells.h"
#include "cpu/rnn_common.h"
#include "cpu/vec_math.h"

namespace seqkern::cpu::rnn_detail {
namespace {

using V = Vec<float>;
constexpr int64_t kW = V::size();

// Registers available for accumulators: MR rows × NV vectors, plus NV loads and 1 broadcast.
constexpr int mr_max(int nv) {
  return kW >= 16 ? (nv >= 4 ? 6 : nv == 3 ? 7 : 12)
                  : (nv >= 4 ? 2 : nv == 3 ? 3 : nv == 2 ? 6 : 8);
}

// acc[m·NV + j] = Σ_k A[m, k] · P[k, j·W .. (j+1)·W), P a panel of K rows of NV vectors;
// with `init`, the sum starts from init[m·NV + j] (a partial sum over earlier k).
// With few accumulators (B = 1 is a GEMV) the FMA latency, not throughput, would bound the
// loop, so the k range is split over S independent banks that are summed at the end: about
// 8 FMA chains are needed to keep both FMA ports busy.
template <int MR, int NV>
inline void panel_gemm(const float* A, int64_t lda, const float* P, int64_t K, V* acc,
                       const V* init = nullptr) {
  constexpr int S = MR * NV >= 8 ? 1 : (8 / (MR * NV) >= 4 ? 4 : 8 / (MR * NV));
  V c[S][MR][NV];
#pragma GCC unroll 4
  for (int q = 0; q < S; ++q)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[q][m][j] = q == 0 && init ? init[m * NV + j] : V(0.0f);
  int64_t k = 0;
  for (; k + S <= K; k += S) {
#pragma GCC unroll 4
    for (int q = 0; q < S; ++q) {
      V b[NV];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        // (one row: each vector is used once, and as a memory operand it costs no register)
        b[j] = V::loadu(P + ((k + q) * NV + j) * kW);
        if constexpr (MR > 1) b[j] = in_register(b[j]);
      }
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
                            V* acc, const V* init = nullptr) {
  if constexpr (MR >= 1) {
    if (mr == MR) return panel_gemm<MR, NV>(A, lda, P, K, acc, init);
    panel_gemm_rows<NV, MR - 1>(mr, A, lda, P, K, acc, init);
  }
}

// Splits `rows` into the fewest blocks of at most MR rows, of near-equal size (8 rows with
// MR = 6 become 4 + 4, not 6 + 2: a 2-row block streams the panel for few FMAs).
template <int MR, typename F>
inline void for_row_blocks(int64_t rows, F&& f) {
  const int64_t nb = (rows + MR - 1) / MR;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t m0 = rows * b / nb, m1 = rows * (b + 1) / nb;
    f(m0, static_cast<int>(m1 - m0));
  }
}

// k rows of a panel that fit in about half of L1 with the rows of A they meet.
template <int NV>
constexpr int64_t k_block() {
  return std::max<int64_t>(64, (int64_t(24) << 10) / (NV * kW * int64_t(sizeof(float))) / 8 * 8);
}

// Σ_k A[m, k] · P[k, :] for all `rows` rows of A against one panel, into acc (rows × NV
// vectors). When the panel is larger than L1 (H ≳ 100 for LSTM) the rows are swept once per
// k block, so each panel block is loaded from L2 once per step rather than once per MR rows:
// the plain loop is L2-bandwidth bound at large H.
// With `accumulate`, adds to what acc holds.
template <int NV, int MR>
inline void panel_gemm_all_rows(int64_t rows, const float* A, int64_t lda, const float* P,
                                int64_t K, V* acc, bool accumulate = false) {
  constexpr int64_t KB = k_block<NV>();
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t kb = std::min(KB, K - k0);
    for_row_blocks<MR>(rows, [&](int64_t m0, int mr) {
      V* out = acc + m0 * NV;
      panel_gemm_rows<NV, MR>(mr, A + m0 * lda + k0, lda, P + k0 * NV * kW, kb, out,
                              k0 || accumulate ? out : nullptr);
    });
  }
}

// A panel covers U vectors (U·W units) of every gate. U = 2 where there is one gate per panel
// row (RNN forward, every backward): a tile of MR rows × 1 vector needs one broadcast load per
// FMA and is load-port bound, while MR × 2 halves the loads per FMA.
int64_t panels(int64_t H, int64_t U) { return (H + U * kW - 1) / (U * kW); }

// f(j, u0, n) for the vectors j of panel p that hold units: u0 = first unit, n = units (≤ W).
template <int U, typename F>
SEQKERN_INLINE void for_panel_vectors(int64_t p, int64_t H, F&& f) {
  for (int j = 0; j < U; ++j) {
    const int64_t u0 = (p * U + j) * kW;
    if (u0 >= H) break;
    f(j, u0, std::min<int64_t>(kW, H - u0));
  }
}

constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Uninitialised storage for n T on a 64-byte boundary, for the packed weight panels, which the
// loops read in whole cache lines (vector and tile loads). new[] gave 16-byte alignment (large
// blocks come from mmap with a 16-byte header), which splits every such load over two lines.
// With this and the aligned step rows (StepBuffer), the bf16 LSTM at T = 100, B = 8,
// I = H = 256 (AMX) took 1.22-1.40 ms in each of six processes; before, 1.2-1.4 in some and
// 2.0-3.0 in others, by where malloc put them.
template <typename T>
class AlignedArray {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T[], Free> p_;

 public:
  AlignedArray() = default;
  explicit AlignedArray(int64_t n)
      : p_(static_cast<T*>(std::aligned_alloc(64, round_up(std::max<int64_t>(n, 1) * sizeof(T), 64)))) {
    TORCH_CHECK(p_, "seqkern: out of memory for ", n * sizeof(T), " bytes of packed weights");
  }
  T* get() const { return p_.get(); }
  explicit operator bool() const { return static_cast<bool>(p_); }
};

// Packed weights. Uninitialised but for the last panel, whose lanes past H must be zero.
struct PanelBuffer {
  AlignedArray<float> buf;
  PanelBuffer() = default;  // none: the loop does not use these panels
  explicit PanelBuffer(int64_t n, int64_t panel_floats, bool partial) : buf(n) {
    if (partial) std::fill(buf.get() + n - panel_floats, buf.get() + n, 0.0f);
  }
  const float* data() const { return buf.get(); }
  float* data() { return buf.get(); }
};

// xg[n, panel p] = x_n · W_ih(panel p)ᵀ for all n < N rows and the panels [p0, p1) of packed
// W_ih (`wxp`, K = I), xg rows ld apart in the loop's panel order. Rows in chunks that stay in
// L2 while every panel meets them.
template <int NV, int MR>
void project_inputs(int64_t N, const float* x, int64_t I, const PanelBuffer& wxp, int64_t p0,
                    int64_t p1, float* xg, int64_t ld) {
  constexpr int64_t kChunk = 96;
  V acc[MR * NV];
  for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
    const int64_t rows = std::min(kChunk, N - c0);
    for (int64_t p = p0; p < p1; ++p)
      for_row_blocks<MR>(rows, [&](int64_t m0, int mr) {
        m0 += c0;
        panel_gemm_rows<NV, MR>(mr, x + m0 * I, I, wxp.data() + p * I * NV * kW, I, acc);
        for (int m = 0; m < mr; ++m)
          for (int j = 0; j < NV; ++j) acc[m * NV + j].store(xg + (m0 + m) * ld + (p * NV + j) * kW);
      });
  }
}

// The packing functions below fill panels [p0, p1) only: each thread packs the panels it will
// use, inside the parallel region, so they are packed in parallel and land in its own cache
// (measured bf16 LSTM B=8 H=512 T=100: 17.9 → 8.7 ms against packing all on one thread first).

// Forward: W (G·H, K), W_hh or W_ih → [panel p][k][gate g][vector j][lane l] =
// W[g·H + p·U·W + j·W + l, k] (0 past H). Each (panel, gate) block is a transpose of PW rows.
PanelBuffer gate_panel_buffer(int64_t G, int64_t H, int64_t K, int64_t U) {
  const int64_t PW = U * kW;
  return PanelBuffer(panels(H, U) * K * G * PW, K * G * PW, H % PW != 0);
}
void pack_gate_panels(PanelBuffer& out, const float* w, int64_t G, int64_t H, int64_t K,
                      int64_t U, int64_t p0, int64_t p1) {
  const int64_t PW = U * kW;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t g = 0; g < G; ++g) {
      const int n = static_cast<int>(std::min<int64_t>(PW, H - p * PW));
      transpose<float>(w + (g * H + p * PW) * K, K, out.data() + p * K * G * PW + g * PW, G * PW,
                       n, K);
    }
}

// Backward: W_hh (G·H, H) as the right operand of dgates · W_hh → [panel p][k][lane l] =
// W_hh[k, p·U·W + l] for k < G·H, l < U·W.
PanelBuffer column_panel_buffer(int64_t GH, int64_t H, int64_t U) {
  const int64_t PW = U * kW;
  return PanelBuffer(panels(H, U) * GH * PW, GH * PW, H % PW != 0);
}
void pack_column_panels(PanelBuffer& out, const float* w, int64_t GH, int64_t H, int64_t U,
                        int64_t p0, int64_t p1) {
  const int64_t PW = U * kW;
  for (int64_t k = 0; k < GH; ++k)
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = std::min<int64_t>(PW, H - p * PW);
      std::copy(w + k * H + p * PW, w + k * H + p * PW + n, out.data() + (p * GH + k) * PW);
    }
}

// bfloat16 weights W (G·H, Kw), W_hh, optionally stacked over W_ih (G·H, Kx) along k, as the
// right operand of [h | x]·[W_hh | W_ih]ᵀ for bf16_tile_product: per panel the K × (G·U·W)
// matrix of pack_gate_panels' layout, in bf16, then in the VNNI order tiles read (pairs of k
// rows interleaved). W_ih's rows start at Kh = Kw rounded up to even (a zero row between);
// K = Kh + Kx, Kx even, rounded up to a multiple of k_multiple with zero rows.
struct VnniPanels {
  const c10::BFloat16 *w = nullptr, *wx = nullptr;
  int64_t Kw = 0, Kx = 0, G = 0, H = 0, U = 0;
  int64_t Kh = 0, K = 0, N = 0;
  AlignedArray<c10::BFloat16> buf;  // uninitialised until pack()
  VnniPanels() = default;
  VnniPanels(const c10::BFloat16* w_, int64_t Kw_, const c10::BFloat16* wx_, int64_t Kx_,
             int64_t G_, int64_t H_, int64_t U_, int64_t k_multiple)
      : w(w_), wx(wx_), Kw(Kw_), Kx(Kx_), G(G_), H(H_), U(U_), Kh((Kw_ + 1) / 2 * 2),
        K(round_up(Kh + (wx_ ? Kx_ : 0), k_multiple)), N(G_ * U_ * kW),
        buf(panels(H_, U_) * K * N) {}

  // Packs panels [p0, p1): each thread packs the panels it will use, in parallel, into its own
  // cache.
  void pack(int64_t p0, int64_t p1) {
    const int64_t PW = U * kW;
    std::vector<c10::BFloat16> tmp(Kw % 2 == 0 ? 0 : K * N);
    // With kw even the VNNI layout is the transpose of the weight read as 32-bit words (each
    // holds the k pair of one column), written straight into place.
    auto transpose_vnni = [&](const c10::BFloat16* src, int64_t kw, int64_t k0, int64_t p, int64_t n) {
      auto* out = reinterpret_cast<float*>(buf.get() + p * K * N) + (k0 / 2) * N;
      const auto* in = reinterpret_cast<const float*>(src);
      for (int64_t g = 0; g < G; ++g)
        transpose<float>(in + (g * H + p * PW) * (kw / 2), kw / 2, out + g * PW, N, n, kw / 2);
    };
    // odd kw: rows k0.. of the row-major panel in tmp, tmp[k0 + k][g·PW + j] = src[g·H + p·PW + j][k]
    auto transpose_into = [&](const c10::BFloat16* src, int64_t kw, int64_t k0, int64_t p, int64_t n) {
      for (int64_t g = 0; g < G; ++g)
        transpose<c10::BFloat16>(src + (g * H + p * PW) * kw, kw, tmp.data() + k0 * N + g * PW, N,
                                 n, kw);
    };
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = std::min<int64_t>(PW, H - p * PW);
      if (Kw % 2 == 0) {
        const int64_t k_end = Kh + (wx ? Kx : 0);  // rows past it pad K with zeros
        if (n < PW) std::memset(buf.get() + p * K * N, 0, K * N * sizeof(c10::BFloat16));
        else std::memset(buf.get() + (p * K + k_end) * N, 0, (K - k_end) * N * sizeof(c10::BFloat16));
        transpose_vnni(w, Kw, 0, p, n);
        if (wx) transpose_vnni(wx, Kx, Kh, p, n);
        continue;
      }
      std::fill(tmp.begin(), tmp.end(), c10::BFloat16(0.0f));
      transpose_into(w, Kw, 0, p, n);
      if (wx) transpose_into(wx, Kx, Kh, p, n);
      pack_vnni(tmp.data(), N, K, N, K, N, buf.get() + p * K * N);
    }
  }
  const c10::BFloat16* panel(int64_t p) const { return buf.get() + p * K * N; }
};

// bfloat16 W_hh (G·H, H) as the right operand of dgates·W_hh, per panel of U·W columns: the
// (K × U·W) block of its rows, K = G·H rounded up to a multiple of k_multiple (even; zero
// rows), columns past H zero.
struct VnniColumnPanels {
  const c10::BFloat16* w = nullptr;
  int64_t GH = 0, H = 0, K = 0, N = 0;
  AlignedArray<c10::BFloat16> buf;  // uninitialised until pack()
  VnniColumnPanels() = default;
  VnniColumnPanels(const c10::BFloat16* w_, int64_t GH_, int64_t H_, int64_t U, int64_t k_multiple)
      : w(w_), GH(GH_), H(H_), K(round_up(GH_, k_multiple)), N(U * kW),
        buf(panels(H_, U) * K * N) {}
  void pack(int64_t p0, int64_t p1) {  // panels [p0, p1), as VnniPanels::pack
    for (int64_t p = p0; p < p1; ++p)
      pack_vnni(w + p * N, H, GH, std::min<int64_t>(N, H - p * N), K, N, buf.get() + p * K * N);
  }
  const c10::BFloat16* panel(int64_t p) const { return buf.get() + p * K * N; }
};

// Rows per tile product call: its fp32 output (64 floats a row at most) stays in L1.
constexpr int64_t kAmxRows = 64;

// Packed weights a thread may stream per step when the threads split the batch (see
// split_by_rows).
constexpr int64_t kRowSplitWeightBytes = int64_t(1) << 20;

// A row stride for the operand rows a panel GEMM walks down: rows whose stride is a multiple of
// 4 KiB map to the same L1 sets, so with more rows than L1 ways (12) they evict each other
// every k block. One extra cache line per row spreads them over the sets.
// per_line: elements per 64-byte line (16 floats, 32 bf16).
int64_t padded_stride(int64_t n, int64_t per_line = 16) {
  const int64_t lines = (n + per_line - 1) / per_line;
  return (lines % 16 == 0 ? lines + 1 : lines) * per_line;
}

// The per-step state rows the threads write in slices of hidden units (h, its bf16 copy, the
// bf16 gate gradients), zeroed and 64-byte aligned: with std::vector's 16-byte alignment a
// cache line could straddle the two threads' slices in every row.
template <typename T>
struct StepBuffer {
  AlignedArray<T> buf;
  explicit StepBuffer(int64_t n) : buf(n) { std::fill(buf.get(), buf.get() + n, T(0.0f)); }
  T* data() { return buf.get(); }
};

// One thread when a step is too small to pay for a barrier, unless W_hh is larger than about
// L1: then each step streams it from L2, which is the bound at small batch (B = 1: about 2
// bytes per FMA), and two cores stream it twice as fast, or hold half each in L1.
// Measured, T = 50, I = H, µs per call at 1 → 2 threads: B = 1: RNN H = 128 (64 KB) 159 → 135,
// GRU H = 64 (48 KB) 131 → 113, LSTM H = 64 (64 KB) 172 → 138; but RNN H = 96 (36 KB)
// 108 → 119, LSTM H = 48 (36 KB) 105 → 121; B = 4 RNN H = 96 173 → 206; B = 8 GRU H = 64
// 510 → 383.
int thread_count(int64_t B, int64_t GH, int64_t H, int64_t P) {
  const int64_t work = B * GH * H, weight_bytes = GH * H * int64_t(sizeof(float));
  int nt = work < (1 << 17) && weight_bytes < (40 << 10) ? 1 : at::get_num_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, P)));
}

// How the threads share a step: by hidden units (each holds its slice of the weights, and a
// barrier per step waits for every slice of h), or by batch rows (each holds all the weights
// and runs its own sequences start to end, with no barrier at all). Rows win where the
// barrier is a large part of a small step and the weights fit in each core's L2.
// SEQKERN_RNN_SPLIT (forward) and SEQKERN_RNN_SPLIT_BWD = units|rows force one (measurements).
bool split_by_rows(bool backward, Cell cell, int nt, int64_t B, int64_t weight_bytes) {
  const char* env = std::getenv(backward ? "SEQKERN_RNN_SPLIT_BWD" : "SEQKERN_RNN_SPLIT");
  if (env && env[0] == 'u') return false;
  if (nt < 2 || B < 2) return false;
  if (env && env[0] == 'r') return true;
  // Measured (2 threads, medians, rows against units): the backward at I = H = 128..256,
  // B = 16..32 1.06–1.33× faster, B = 8 0.98–1.04×, neutral at H = 512, 0.98–1.0× at H = 1024
  // (weights past L2); the RNN forward 1.08–1.5× at B ≥ 16, 0.90× at B = 8 (4 rows a thread:
  // a 4-row tile). The gated cells' forward was 0.69–1.0× but for one shape (GRU
  // T = 500, B = 16, I = 64, H = 128: 1.10×): their step is 3–4× longer, the barrier a smaller
  // part of it, and each thread then streams all G·H·(H + I) weights instead of half.
  const bool rnn = cell == Cell::RnnTanh || cell == Cell::RnnRelu;
  if (!backward && !rnn) return false;
  const int64_t min_rows = backward ? 4 : 8;
  return B >= int64_t(nt) * min_rows && weight_bytes <= kRowSplitWeightBytes;
}

// Row ranges [rows[k], rows[k + 1]) of thread k with equal work: rows are sorted by length
// (longest first), and row b runs len_b = #{t : bs[t] > b} steps.
std::vector<int64_t> row_split(const Layout& L, int nt) {
  std::vector<int64_t> len(L.B, 0);
  for (int64_t t = 0; t < L.T; ++t)
    for (int64_t b = 0; b < L.bs[t]; ++b) ++len[b];
  std::vector<int64_t> rows(nt + 1, L.B);
  rows[0] = 0;
  int64_t done = 0, k = 1;
  for (int64_t b = 0; b < L.B && k < nt; ++b) {
    done += len[b];
    while (k < nt && done * nt >= L.N * k) rows[k++] = b + 1;
  }
  return rows;
}

// The per-step barrier of the units split: a counter and a generation flag on their own cache
// lines, spun on with `pause`, yielding the core after 1000 spins, or 50 when there are more
// threads than processors to run them (a thread spinning would keep the one it waits for off a
// core). It never sleeps, as libgomp's eventually does: a step is microseconds to milliseconds.
// libgomp's barrier does more per call (team and task bookkeeping): measured forward, 2
// threads, B = 1, T = 500, µs per step, omp barrier → this: RNN H = 128 1.01 → 0.88, H = 256
// 2.98 → 2.75, GRU H = 128 1.86 → 1.67, LSTM H = 128 3.05 → 2.89; unchanged (±0.5 %) at B ≥ 8.
// Release on arrival and acquire on leaving make every thread's writes of the step (its slice
// of h) visible to all after it, as the OpenMP barrier's flush did.
struct StepBarrier {
  alignas(64) std::atomic<int> count{0};
  alignas(64) std::atomic<unsigned> generation{0};
  alignas(64) int n = 1;  // (read-only during the steps)
  unsigned spin_limit = 1000;
  void set_threads(int threads) {
    // the processors this process may run on (its affinity mask), not all the machine's
    static const int procs = omp_get_num_procs();
    n = threads;
    spin_limit = threads > procs ? 50 : 1000;
  }
  void wait() {
    if (n <= 1) return;
    const unsigned gen = generation.load(std::memory_order_relaxed);
    if (count.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count.store(0, std::memory_order_relaxed);
      generation.store(gen + 1, std::memory_order_release);
      return;
    }
    for (unsigned spins = 0; generation.load(std::memory_order_acquire) == gen; ++spins) {
      _mm_pause();
      if (spins > spin_limit) std::this_thread::yield();
    }
  }
};

// ------------------------------------------------------------------ forward ----------------

// The epilogue of a tile reads xg and writes out (and, in training, the saved gates) at rows
// G·H apart that were written long ago and are no longer in cache: one DRAM miss per gate and
// row, in an order the hardware prefetcher cannot follow. So each tile requests the lines of
// the tile after it (the same rows in the next panel, or the next step's first panel), a whole
// tile's GEMM ahead of their use.
template <int Locality>
SEQKERN_INLINE void prefetch_span(const float* p, int64_t n, bool write) {
  for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(float))) {
    if (write) __builtin_prefetch(p + i, 1, Locality);
    else __builtin_prefetch(p + i, 0, Locality);
  }
}

// Rows r0 .. r0 + rows of the epilogue's operands, units u0 .. u0 + n, into L2 (Locality 2)
// or L1 (3).
template <Cell C, int Locality = 2>
void prefetch_forward_rows(const ForwardArgs& a, int64_t r0, int64_t rows, int64_t u0, int64_t n) {
  const int64_t H = a.H, G = gate_count(C), GH = G * H;
  const int64_t W = C == Cell::Gru ? 4 * H : GH;
  constexpr int64_t PW = (C == Cell::RnnTanh || C == Cell::RnnRelu ? 2 : 1) * kW;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    if (a.xg_fill)
      prefetch_span<Locality>(a.xg + r * a.xg_ld + u0 / PW * G * PW, G * PW, false);
    else if (a.xg)
      for (int64_t g = 0; g < G; ++g) prefetch_span<Locality>(a.xg + r * GH + g * H + u0, n, false);
    prefetch_span<Locality>(a.out + r * H + u0, n, true);
    if (a.save_gates)
      for (int64_t g = 0; g < W / H; ++g) prefetch_span<Locality>(a.save_gates + r * W + g * H + u0, n, true);
    if (a.save_cells)
      for (int64_t g = 0; g < 2; ++g) prefetch_span<Locality>(a.save_cells + r * 2 * H + g * H + u0, n, true);
    if (a.save_hprev) prefetch_span<Locality>(a.save_hprev + r * H + u0, n, true);
  }
}

// acc: the recurrent products of row m, gate g at acc[g·U]. The input projection is, in this
// order of precedence: xacc[g·U] (GRU with the projection fused: its n gate keeps x·W_in apart
// from W_hn·h), already summed into acc (other cells, fused), or a.xg in memory.
template <Cell C>
SEQKERN_INLINE void forward_tile(const ForwardArgs& a, int64_t m, int64_t o, int64_t u0, int64_t n,
                         const V* acc, const V* xacc, const float* hp, float* hn, int64_t ldh) {
  const int64_t H = a.H, G = gate_count(C), GH = G * H;
  constexpr int64_t U = C == Cell::RnnTanh || C == Cell::RnnRelu ? 2 : 1;
  const float* xr = a.xg ? a.xg + (o + m) * a.xg_ld : nullptr;
  constexpr int64_t PW = U * kW;  // units of a panel
  const int64_t xp = u0 / PW;
  auto xin = [&](int64_t g) __attribute__((always_inline)) {
    return xacc ? xacc[g * U]
           : xr ? load(xr + (a.xg_fill ? (xp * G + g) * PW + (u0 - xp * PW) : g * H + u0), n)
                : V(0.0f);
  };
  auto pre = [&](int64_t g) __attribute__((always_inline)) {
    return acc[g * U] + xin(g) + load(a.bias + g * H + u0, n);
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
      store_lstm_gates(st, gs, H, u0, n);
      float* cv = a.save_cells + (o + m) * 2 * H;
      store(cp, cv + u0, n);
      store(st.c, cv + H + u0, n);
    }
  } else {  // GRU, PyTorch convention
    auto r = sigmoid(pre(0));
    auto z = sigmoid(pre(1));
    auto hlin = a.b_hn ? acc[2] + load(a.b_hn + u0, n) : acc[2];
    auto nn = tanh(xin(2) + load(a.bias + 2 * H + u0, n) + r * hlin);
    h = gru_mix(nn, z, load(hp + m * ldh + u0, n));
    if (gs) store_gate_blocks(gs, H, u0, n, r, z, nn, hlin);
  }
  store(h, hn + m * ldh + u0, n);
  store(h, a.out + (o + m) * H + u0, n);
  if (a.save_hprev) store(load(hp + m * ldh + u0, n), a.save_hprev + (o + m) * H + u0, n);
}

template <Cell C>
void forward_loop(const ForwardArgs& a) {
  constexpr int G = static_cast<int>(gate_count(C));
  constexpr int U = G == 1 ? 2 : 1;  // vectors per gate in a panel
  constexpr int NV = G * U;
  constexpr int MR = mr_max(NV);
  const Layout& L = *a.L;
  const int64_t H = a.H, B = L.B, P = panels(H, U), I = a.I;
  const bool amx = a.w_hh_bf16 != nullptr;
  PanelBuffer wp = amx ? PanelBuffer() : gate_panel_buffer(G, H, H, U);
  // Input projection in the loop: x_t·W_ih is accumulated onto h·W_hh (for GRU beside it).
  const bool fuse_x = a.xg == nullptr;
  constexpr bool separate_x = C == Cell::Gru;
  // bfloat16 weights (amx): the products on AMX tiles, h rounded to bf16 for them
  // W_ih's panels: for the steps' products, or for the projection made up front (xg_fill)
  const bool x_panels = (fuse_x || a.xg_fill) && !amx;
  PanelBuffer wxp = x_panels ? gate_panel_buffer(G, H, I, U) : PanelBuffer();
  TORCH_INTERNAL_ASSERT(!a.xg_fill || (!amx && a.xg_fill == a.xg));
  const int64_t ldh = padded_stride(H);
  StepBuffer<float> hbuf(2 * B * ldh);
  for (int64_t b = 0; b < B; ++b)
    for (int i = 0; i < 2; ++i) std::copy(a.h0 + b * H, a.h0 + (b + 1) * H, hbuf.data() + (i * B + b) * ldh);
  const int64_t weight_bytes = G * H * (H + (fuse_x ? I : 0)) * int64_t(sizeof(float));
  const bool by_rows = !amx && split_by_rows(false, C, at::get_num_threads(), B, weight_bytes);
  const int nt = by_rows ? at::get_num_threads() : thread_count(B, G * H, H, P);
  TORCH_INTERNAL_ASSERT(!amx || !fuse_x || (a.x_bf16 && a.w_ih_bf16 && I % 2 == 0));
  // A rows are [h | x_t] and one product per panel covers both, except for GRU, whose n gate
  // keeps x·W_in apart: there x_t is a second product (A = x rows as given).
  const bool x_in_a = amx && fuse_x && !separate_x;
  // The [h | x] rows and W's panels are padded to whole tiles (rows of A: Bp; K: zeros).
  const TileMultiples tm = bf16_tile_multiples();
  VnniPanels wb = amx ? VnniPanels(a.w_hh_bf16, H, x_in_a ? a.w_ih_bf16 : nullptr, I, G, H, U, tm.k)
                      : VnniPanels();
  VnniPanels wxb = amx && fuse_x && separate_x ? VnniPanels(a.w_ih_bf16, I, nullptr, 0, G, H, U, 2)
                                               : VnniPanels();
  const int64_t ldhb = amx ? padded_stride(wb.K, 32) : 0, Bp = round_up(B, tm.m);
  StepBuffer<c10::BFloat16> hbbuf(amx ? 2 * Bp * ldhb : 0);
  for (int64_t b = 0; amx && b < B; ++b)
    for (int i = 0; i < 2; ++i)
      round_to_bf16(a.h0 + b * H, hbbuf.data() + (i * Bp + b) * ldhb, H);
  // x rows of step s into the A rows (ldhb apart) at column Kh, rows [r0, r1)
  auto copy_x_rows = [&](int64_t s, c10::BFloat16* dst, int64_t r0, int64_t r1) {
    const int64_t t = L.step(s, a.reverse), o = L.off[t];
    r1 = std::min(r1, L.bs[t]);
    for (int64_t r = r0; r < r1; ++r)
      std::copy(a.x_bf16 + (o + r) * I, a.x_bf16 + (o + r + 1) * I, dst + r * ldhb + wb.Kh);
  };
  if (x_in_a) copy_x_rows(0, hbbuf.data(), 0, B);
  StepBarrier step_barrier;

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n_threads = omp_get_num_threads();
#pragma omp single
    step_barrier.set_threads(n_threads);
    // this thread's panels (all of them when it owns rows) and rows [r0, r1) of each step
    int64_t p0 = P * tid / n_threads, p1 = P * (tid + 1) / n_threads;
    if (amx) {
      wb.pack(p0, p1);
      if (wxb.buf) wxb.pack(p0, p1);
    } else {
      pack_gate_panels(wp, a.w_hh, G, H, H, U, p0, p1);
      if (x_panels) pack_gate_panels(wxp, a.w_ih, G, H, I, U, p0, p1);
    }
    // (before the rows split's barrier, which then also publishes every thread's columns)
    if (a.xg_fill) project_inputs<NV, MR>(L.N, a.x, I, wxp, p0, p1, a.xg_fill, a.xg_ld);
    // (split for the team OpenMP gave, which may be smaller than asked: nested, thread limits)
    const std::vector<int64_t> rows = by_rows ? row_split(L, n_threads) : std::vector<int64_t>{0, B};
    const int64_t r0 = by_rows ? rows[tid] : 0, r1 = by_rows ? rows[tid + 1] : B;
    if (by_rows) {
      p0 = 0, p1 = P;
#pragma omp barrier
    }
    V acc[MR * NV], xacc[separate_x ? MR * NV : 1];
    const bool blocked = std::max(H, fuse_x ? I : 0) > k_block<NV>() && r1 - r0 > MR;
    // rows of accumulators kept in memory (the register path needs none)
    const int64_t acc_rows = amx ? round_up(std::min<int64_t>(B, kAmxRows), tm.m) : blocked ? B : 0;
    // On seqkern's own AMX loop (whole tiles: tm.k = 32) the gate math of each tile runs inside
    // the next tile's products, so the accumulators are double-buffered. From 16 rows (GRU: 32,
    // its forward lost 6 % at B = 16, 2.27 -> 2.40 ms at T = 500, H = 128): below,
    // a tile's products are too short to hide much, and pieces of a few rows cost more than
    // they hide (A/B, bf16 forward: B = 8 LSTM 1.05 -> 1.12 ms, GRU 1.14 -> 1.29; B = 16, I = H =
    // 256 LSTM 1.65 -> 1.49, RNN 0.77 -> 0.72, GRU 1.19 -> 1.20-1.26; B = 32 LSTM 2.94 -> 2.56;
    // B = 64, H = 512 LSTM 37.0 -> 31.3, GRU 26.7 -> 25.1).
    const bool pipelined = amx && tm.k == 32 && B >= (C == Cell::Gru ? 32 : 16);
    const int nbuf = pipelined ? 2 : 1;
    std::vector<V> accs(nbuf * acc_rows * NV), xaccs(fuse_x && separate_x ? nbuf * acc_rows * NV : 0);
    for (int64_t s = 0; s < L.T; ++s) {
      const int64_t t = L.step(s, a.reverse), bs = std::min(L.bs[t], r1), o = L.off[t];
      if (by_rows && bs <= r0) {  // this thread's sequences are all over (going forward)
        if (a.reverse) continue;
        break;
      }
      const float* hp = hbuf.data() + (s & 1) * B * ldh;
      float* hn = hbuf.data() + ((s + 1) & 1) * B * ldh;
      const c10::BFloat16* hbp = amx ? hbbuf.data() + (s & 1) * Bp * ldhb : nullptr;
      c10::BFloat16* hbn = amx ? hbbuf.data() + ((s + 1) & 1) * Bp * ldhb : nullptr;
      // The gate math of row m of a tile whose accumulators start at v (gate g, vector j at
      // v[g·U + j]; U > 1 only with one gate).
      auto finish = [&](int64_t p, int64_t m, const V* v, const V* xv) {
        for_panel_vectors<U>(p, H, [&](int j, int64_t u0, int64_t n) {
          forward_tile<C>(a, m, o, u0, n, v + j, xv ? xv + j : nullptr, hp, hn, ldh);
        });
      };
      const float* xt = fuse_x ? a.x + o * I : nullptr;
      // rows of the next step (none after the last), whose first panel the last tile prefetches
      const int64_t o_next = s + 1 < L.T ? L.off[L.step(s + 1, a.reverse)] : 0;
      const int64_t bs_next = s + 1 < L.T ? std::min(L.bs[L.step(s + 1, a.reverse)], r1) : 0;
      if (pipelined) {
        // Tiles (panel p, rows m0 .. m0 + mr) in order. Each one's products are issued with the
        // gate math of the tile before spread over their k-steps, the rest of that math after:
        // measured at T = 100, B = 32, I = H = 256 (bf16 LSTM), the products alone took 1.4 ms
        // and the gate math alone 1.4, one after the other 3.0.
        struct Tile {
          int64_t p = -1, m0 = 0, mr = 0;
          int buf = 0;
        };
        auto epilogue = [&](const Tile& t, int64_t lo, int64_t hi) {
          const V* v = accs.data() + t.buf * acc_rows * NV;
          const V* xv = fuse_x && separate_x ? xaccs.data() + t.buf * acc_rows * NV : nullptr;
          const int64_t pu0 = t.p * U * kW, pn = std::min<int64_t>(U * kW, H - pu0);
          for (int64_t m = t.m0 + lo; m < t.m0 + hi; ++m) {
            if (m + 2 < t.m0 + t.mr) prefetch_forward_rows<C, 3>(a, o + m + 2, 1, pu0, pn);
            finish(t.p, m, v + (m - t.m0) * NV, xv ? xv + (m - t.m0) * NV : nullptr);
            for_panel_vectors<U>(t.p, H, [&](int, int64_t u0, int64_t n) {
              round_to_bf16(hn + m * ldh + u0, hbn + m * ldhb + u0, n);
            });
          }
        };
        Tile prev;
        int buf = 0;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t pu0 = p * U * kW, pn = std::min<int64_t>(U * kW, H - pu0);
          for (int64_t m0 = 0; m0 < bs; m0 += kAmxRows) {
            const int64_t mr = std::min(kAmxRows, bs - m0);
            // this tile's rows, for its gate math a tile from now
            prefetch_forward_rows<C>(a, o + m0, std::min<int64_t>(mr, 2), pu0, pn);
            int64_t done = 0;
            auto between = [&](int64_t i, int64_t n) {
              if (prev.p < 0) return;
              const int64_t hi = prev.mr * (i + 1) / n;
              epilogue(prev, done, hi);
              done = hi;
            };
            const bool tiled = bf16_tile_product_overlapped(
                round_up(mr, tm.m), NV * kW, wb.K, ldhb, NV * kW, NV * kW, false, hbp + m0 * ldhb,
                wb.panel(p), reinterpret_cast<float*>(accs.data() + buf * acc_rows * NV), between);
            TORCH_INTERNAL_ASSERT(tiled, "seqkern: the AMX tile loop refused a whole-tile product");
            if (fuse_x && separate_x)
              bf16_tile_product(mr, NV * kW, I, I, NV * kW, NV * kW, false,
                                a.x_bf16 + (o + m0) * I, wxb.panel(p),
                                reinterpret_cast<float*>(xaccs.data() + buf * acc_rows * NV));
            if (prev.p >= 0) epilogue(prev, done, prev.mr);
            prev = Tile{p, m0, mr, buf};
            buf ^= 1;
          }
        }
        if (prev.p >= 0) epilogue(prev, 0, prev.mr);
      }
      for (int64_t p = p0; p < p1 && !pipelined; ++p) {
        const float* panel = wp.data() + p * H * NV * kW;
        const float* xpanel = fuse_x ? wxp.data() + p * I * NV * kW : nullptr;
        // the tile after this one: next panel, or the first panel of the next step
        const int64_t pu0 = p * U * kW, pn = std::min<int64_t>(U * kW, H - pu0);
        const bool last = p + 1 == p1;
        const int64_t np = last ? p0 : p + 1;
        const int64_t nu0 = np * U * kW, nn = std::min<int64_t>(U * kW, H - nu0);
        const int64_t no = last ? o_next : o, nbs = last ? bs_next : bs;
        auto prefetch_next = [&](int64_t m0, int64_t n_rows) {
          n_rows = std::min(n_rows, nbs - m0);
          if (n_rows > 0) prefetch_forward_rows<C>(a, no + m0, n_rows, nu0, nn);
        };
        if (amx) {
          // rows in blocks whose accumulators stay in L1; then h of this panel's units, in
          // bf16, for the next step's product
          for (int64_t m0 = 0; m0 < bs; m0 += kAmxRows) {
            const int64_t mr = std::min(kAmxRows, bs - m0);
            float* cb = reinterpret_cast<float*>(accs.data());
            bf16_tile_product(round_up(mr, tm.m), NV * kW, wb.K, ldhb, NV * kW, NV * kW, false,
                              hbp + m0 * ldhb, wb.panel(p), cb);
            if (fuse_x && separate_x)
              bf16_tile_product(mr, NV * kW, I, I, NV * kW, NV * kW, false,
                                a.x_bf16 + (o + m0) * I, wxb.panel(p),
                                reinterpret_cast<float*>(xaccs.data()));
            for (int64_t m = m0; m < m0 + mr; ++m) {
              if (m + 2 < bs) prefetch_forward_rows<C, 3>(a, o + m + 2, 1, pu0, pn);
              finish(p, m, accs.data() + (m - m0) * NV,
                     fuse_x && separate_x ? xaccs.data() + (m - m0) * NV : nullptr);
              prefetch_next(m, 1);
              for_panel_vectors<U>(p, H, [&](int, int64_t u0, int64_t n) {
                round_to_bf16(hn + m * ldh + u0, hbn + m * ldhb + u0, n);
              });
            }
          }
          if (nbs > bs) prefetch_next(bs, nbs - bs);
          continue;
        }
        if (blocked) {
          const int64_t n_rows = bs - r0;
          panel_gemm_all_rows<NV, MR>(n_rows, hp + r0 * ldh, ldh, panel, H, accs.data());
          if (fuse_x) {
            if (separate_x) panel_gemm_all_rows<NV, MR>(n_rows, xt + r0 * I, I, xpanel, I, xaccs.data());
            else panel_gemm_all_rows<NV, MR>(n_rows, xt + r0 * I, I, xpanel, I, accs.data(), true);
          }
          for (int64_t m = r0; m < bs; ++m) {
            // The rows' lines were requested into L2 a panel ago; L1 cannot hold them all (rows
            // G·H apart share sets), so each row brings in the one two rows on.
            if (m + 2 < bs) prefetch_forward_rows<C, 3>(a, o + m + 2, 1, pu0, pn);
            finish(p, m, accs.data() + (m - r0) * NV,
                   fuse_x && separate_x ? xaccs.data() + (m - r0) * NV : nullptr);
            prefetch_next(m, 1);
          }
          if (nbs > bs) prefetch_next(bs, nbs - bs);
          continue;
        }
        for_row_blocks<MR>(bs - r0, [&](int64_t m0, int mr) {
          m0 += r0;
          panel_gemm_rows<NV, MR>(mr, hp + m0 * ldh, ldh, panel, H, acc);
          if (fuse_x) {
            if (separate_x) panel_gemm_rows<NV, MR>(mr, xt + m0 * I, I, xpanel, I, xacc);
            else panel_gemm_rows<NV, MR>(mr, xt + m0 * I, I, xpanel, I, acc, acc);
          }
          for (int mi = 0; mi < mr; ++mi)
            finish(p, m0 + mi, acc + mi * NV, fuse_x && separate_x ? xacc + mi * NV : nullptr);
          prefetch_next(m0, mr);
        });
        if (nbs > bs) prefetch_next(bs, nbs - bs);
      }
      if (x_in_a && s + 1 < L.T)
        copy_x_rows(s + 1, hbn, B * tid / n_threads, B * (tid + 1) / n_threads);
      if (!by_rows) step_barrier.wait();
    }
    if (amx) bf16_tile_release();
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
SEQKERN_INLINE void backward_tile(const BackwardArgs& a, int64_t m, int64_t o, const OutputRows& y_rows,
                                  int64_t u0, int64_t n) {
  const int64_t H = a.H, G = gate_count(C), GH = G * H;
  float* dh = a.dh + m * H + u0;
  auto d = load(dh, n);
  if (a.grad_out) d = d + load(a.grad_out + (o + m) * H + u0, n);
  float* dx = a.dxg + (o + m) * GH;
  if constexpr (C == Cell::RnnTanh || C == Cell::RnnRelu) {
    auto y = load(y_rows.row(a.hprev, a.h_n, H, m) + u0, n);
    store(rnn_activation_backward(d, y, C == Cell::RnnRelu), dx + u0, n);
  } else if constexpr (C == Cell::Lstm) {
    const float* gs = a.gates + (o + m) * GH;
    const float* cv = a.cells + (o + m) * 2 * H;
    float* dc = a.dc + m * H + u0;
    auto gr = lstm_step_backward(d, load(dc, n), load(gs + u0, n), load(gs + H + u0, n),
                                 load(gs + 2 * H + u0, n), load(gs + 3 * H + u0, n),
                                 load(cv + u0, n), load(cv + H + u0, n), a.peep, H, u0, n);
    store(gr.dc_prev, dc, n);
    store_lstm_grads(gr, dx, H, u0, n);
  } else {  // GRU; phase 2 adds the matmul path to dh
    gru_step_backward(d, a.gates + (o + m) * 4 * H, a.hprev + (o + m) * H, dx,
                      a.drec + (o + m) * GH, a.dh + m * H, H, u0, n);
  }
}

template <Cell C>
void backward_loop(const BackwardArgs& a) {
  constexpr int G = static_cast<int>(gate_count(C));
  constexpr int U = 2;
  constexpr int MR = mr_max(U);
  const Layout& L = *a.L;
  const int64_t H = a.H, GH = G * H, B = L.B, P = panels(H, U);
  const bool amx = a.w_hh_bf16 != nullptr;
  PanelBuffer wb = amx ? PanelBuffer() : column_panel_buffer(GH, H, U);
  const bool by_rows = !amx && split_by_rows(true, C, at::get_num_threads(), B, GH * H * int64_t(sizeof(float)));
  const int nt = by_rows ? at::get_num_threads() : thread_count(B, GH, H, P);
  constexpr bool accumulate = C == Cell::Gru;
  // bf16: the gate gradients of each step in bf16 (double-buffered: a thread writes step s − 1's
  // while the other may still read step s's) as the A operand of the tile products
  const TileMultiples tm = bf16_tile_multiples();
  VnniColumnPanels wbb = amx ? VnniColumnPanels(a.w_hh_bf16, GH, H, U, tm.k) : VnniColumnPanels();
  const int64_t ldg = amx ? padded_stride(wbb.K, 32) : 0, Bp = round_up(B, tm.m);
  StepBuffer<c10::BFloat16> gbuf(amx ? 2 * Bp * ldg : 0);
  StepBarrier step_barrier;

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n_threads = omp_get_num_threads();
#pragma omp single
    step_barrier.set_threads(n_threads);
    // panels and rows as in forward_loop
    int64_t p0 = P * tid / n_threads, p1 = P * (tid + 1) / n_threads;
    if (amx) wbb.pack(p0, p1);
    else pack_column_panels(wb, a.w_hh, GH, H, U, p0, p1);
    // (split for the team OpenMP gave, which may be smaller than asked: nested, thread limits)
    const std::vector<int64_t> rows = by_rows ? row_split(L, n_threads) : std::vector<int64_t>{0, B};
    const int64_t r0 = by_rows ? rows[tid] : 0, r1 = by_rows ? rows[tid + 1] : B;
    if (by_rows) {
      p0 = 0, p1 = P;
#pragma omp barrier
    }
    V acc[MR * U];
    const bool blocked = GH > k_block<U>() && r1 - r0 > MR;
    std::vector<V> accs(amx ? round_up(std::min<int64_t>(B, kAmxRows), tm.m) * U : blocked ? B * U : 0);
    // dh_prev of row m for the units of panel p, from its accumulators v
    auto finish = [&](int64_t p, int64_t m, const V* v) {
      for_panel_vectors<U>(p, H, [&](int j, int64_t u0, int64_t n) {
        float* dh = a.dh + m * H + u0;
        store(accumulate ? v[j] + load(dh, n) : v[j], dh, n);
      });
    };
    for (int64_t s = L.T - 1; s >= 0; --s) {
      const int64_t t = L.step(s, a.reverse), bs = std::min(L.bs[t], r1), o = L.off[t];
      if (by_rows && bs <= r0) continue;  // none of this thread's sequences reach step t
      c10::BFloat16* gb = amx ? gbuf.data() + (s & 1) * Bp * ldg : nullptr;
      const OutputRows y_rows(L, t, a.reverse);
      for (int64_t p = p0; p < p1; ++p)
        for_panel_vectors<U>(p, H, [&](int, int64_t u0, int64_t n) {
          for (int64_t m = r0; m < bs; ++m) {
            backward_tile<C>(a, m, o, y_rows, u0, n);
            if (amx)
              for (int64_t g = 0; g < G; ++g)
                round_to_bf16(a.drec + (o + m) * GH + g * H + u0, gb + m * ldg + g * H + u0, n);
          }
        });
      if (!by_rows) step_barrier.wait();
      for (int64_t p = p0; p < p1; ++p) {
        if (amx) {
          for (int64_t m0 = 0; m0 < bs; m0 += kAmxRows) {
            const int64_t mr = std::min(kAmxRows, bs - m0);
            bf16_tile_product(round_up(mr, tm.m), U * kW, wbb.K, ldg, U * kW, U * kW, false,
                              gb + m0 * ldg, wbb.panel(p),
                              reinterpret_cast<float*>(accs.data()));
            for (int64_t m = m0; m < m0 + mr; ++m) finish(p, m, accs.data() + (m - m0) * U);
          }
          continue;
        }
        const float* panel = wb.data() + p * GH * U * kW;
        if (blocked) {
          panel_gemm_all_rows<U, MR>(bs - r0, a.drec + (o + r0) * GH, GH, panel, GH, accs.data());
          for (int64_t m = r0; m < bs; ++m) finish(p, m, accs.data() + (m - r0) * U);
          continue;
        }
        for_row_blocks<MR>(bs - r0, [&](int64_t m0, int mr) {
          m0 += r0;
          panel_gemm_rows<U, MR>(mr, a.drec + (o + m0) * GH, GH, panel, GH, acc);
          for (int mi = 0; mi < mr; ++mi) finish(p, m0 + mi, acc + mi * U);
        });
      }
    }
    if (amx) bf16_tile_release();
  }
}

}  // namespace

// Fusing saves writing and re-reading G·H floats of xg per row, but each step then streams
// [W_hh | W_ih], each thread its slice, instead of W_hh alone. At one row the step is bound by
// that stream; from 4 rows the tiles win wherever the weights stay in L3, and past that (a
// thread's slice over 11 MB) only from 32 rows on, where each weight serves enough FMAs to
// hide the memory stream. The one-gate RNN's step is short and its tiles 2 vectors wide: from
// 64 rows the projection made up front wins there.
// Measured (forward, 2 threads, median of 3 alternated runs, ms), Zen 4 after in_register,
// against an MKL GEMM beforehand (apart → fused): LSTM T = 100, I = H = 256, B = 1 0.99 → 1.26,
// B = 2 1.90 → 1.62, B = 4 3.45 → 2.72; I = H = 512 B = 8 20.6 → 17.8, B = 32 80.5 → 69.9; T =
// 200, B = 64, I = H = 512 296 → 275; I = H = 1024 (16 MB a thread) B = 8 76.6 → 87.2, B = 16
// 145 → 161, T = 64, B = 64 364 → 353. GRU I = H = 1024 (12 MB) B = 16 102 → 108, B = 64 274 →
// 266. Against the projection made up front (xg_in_loop), up front → fused: T = 100, I = H =
// 256, B = 2 LSTM 1.54 → 1.63, GRU 1.25 → 1.22, RNN 0.51 → 0.48; B = 4 LSTM 2.15 → 2.16, GRU
// 2.07 → 2.22, RNN 0.85 → 0.80; B = 8 4.32 → 4.26, 4.18 → 3.93, 1.56 → 1.53; B = 32 17.2 →
// 16.7, 16.2 → 15.6, 6.57 → 6.13; T = 500, B = 16, I = 64, H = 128 14.1 → 13.4, 10.8 → 9.95,
// 4.54 → 3.94; T = 200, B = 64, I = H = 512 256 → 258, 213 → 212, RNN 71.6 → 78.6.
// SEQKERN_RNN_FUSE = 0|1 forces one (measurements).
bool fuse_input_projection(Cell cell, const Layout& L, int64_t I, int64_t H) {
  if (const char* env = std::getenv("SEQKERN_RNN_FUSE")) return env[0] == '1';
  if (L.B < 4) return false;
  if (cell == Cell::RnnTanh || cell == Cell::RnnRelu) return L.B < 64;
  const int64_t per_thread = gate_count(cell) * H * (H + I) * int64_t(sizeof(float)) /
                             std::max(1, at::get_num_threads());
  return per_thread <= (int64_t(11) << 20) || L.B >= 32;
}

// Units of a fused-loop panel: one vector per gate, two for the one-gate RNN cells.
constexpr int64_t panel_units(Cell c) {
  return (c == Cell::RnnTanh || c == Cell::RnnRelu ? 2 : 1) * kW;
}

// Made by the loop's threads, the projection runs on the panel tiles at up to ~190 GFLOP/s
// without a second parallel region (MKL's GEMM: 114 GFLOP/s on 50 × 512 × 128, 57 µs), each
// thread reading its own panels' columns, and needs no reordered copy of W_ih for the panel
// order. Measured (forward, 2 threads, median of 5 alternated runs, MKL → loop, µs): T = 50,
// B = 1, I = H = 128 LSTM 168 → 147, GRU 129 → 114, RNN 62 → 54; T = 100, B = 1, I = H = 512
// LSTM 4780 → 4614, GRU 3151 → 2948; T = 20, B = 1, I = H = 1024 LSTM 10202 → 7197; ms: GRU
// T = 100, I = H = 1024, B = 8 66.6 → 52.8, B = 16 121 → 105; LSTM B = 8 74.1 → 75.6, 76.9 →
// 79.8 (the one loss, within the VM's drift), I = 512 57.0 → 51.7; RNN T = 200, B = 64,
// I = H = 512 73.5 → 66.3, T = 50, B = 128 35.6 → 32.8, T = 100, B = 32, I = 256 6.57 → 6.36.
// Not where a partial last panel would pad the projection by more than an eighth (H = 17:
// 32 columns a gate for 17).
bool xg_in_loop(Cell cell, int64_t H) {
  if (const char* env = std::getenv("SEQKERN_RNN_XG_LOOP")) return env[0] == '1';
  return 8 * round_up(H, panel_units(cell)) <= 9 * H;
}

int64_t xg_panel_width(Cell cell, int64_t H) {
  const int64_t pw = panel_units(cell);
  return (H + pw - 1) / pw * gate_count(cell) * pw;
}

// Only in AVX-512 builds: with 8-lane vectors a GRU panel would be 24 columns wide, not a
// whole number of tiles.
bool amx_recurrence_supported() {
  const char* env = std::getenv("SEQKERN_RNN_AMX");  // "0": the float32 loop
  return kW == 16 && bf16_tiles_supported() && !(env && env[0] == '0');
}

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
