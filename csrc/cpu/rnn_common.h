// What the recurrent kernels share: the cell kinds, the packed-sequence layout, and the fused
// float32 time loops (rnn_fused.cpp) that rnn.cpp dispatches to.
#pragma once
#include "isa.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

namespace seqkern::cpu::rnn_detail {

enum class Cell { RnnTanh, RnnRelu, Lstm, Gru, GruCho };

inline Cell parse_cell(const std::string& mode) {
  if (mode == "rnn_tanh") return Cell::RnnTanh;
  if (mode == "rnn_relu") return Cell::RnnRelu;
  if (mode == "lstm") return Cell::Lstm;
  if (mode == "gru") return Cell::Gru;
  if (mode == "gru_cho") return Cell::GruCho;
  TORCH_CHECK(false, "seqkern: unknown recurrent mode '", mode,
              "' (expected rnn_tanh, rnn_relu, lstm, gru or gru_cho)");
}

constexpr int64_t gate_count(Cell c) {
  switch (c) {
    case Cell::Lstm: return 4;
    case Cell::Gru:
    case Cell::GruCho: return 3;
    default: return 1;
  }
}

// Runs `f(begin, end)` over rows; parallel only when the pointwise work is large enough to pay
// for waking the thread pool (at small batch the step is latency bound).
template <typename F>
inline void over_rows(int64_t rows, int64_t width, F&& f) {
  if (rows * width >= 32768) {
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), f);
  } else {
    f(0, rows);
  }
}

struct Layout {
  int64_t T, B, N;
  std::vector<int64_t> bs, off;
  Layout(const at::Tensor& batch_sizes) {
    auto acc = batch_sizes.accessor<int64_t, 1>();
    T = batch_sizes.size(0);
    bs.resize(T);
    off.resize(T);
    N = 0;
    for (int64_t t = 0; t < T; ++t) {
      bs[t] = acc[t];
      off[t] = N;
      N += bs[t];
    }
    B = T > 0 ? bs[0] : 0;
  }
  int64_t step(int64_t s, bool reverse) const { return reverse ? T - 1 - s : s; }
};

// Where the backward of an RNN cell finds y_t, which its activation's derivative needs: h_t is
// the h_prev the forward saved for the step after t (in its order), or, for the rows that step
// no longer has, the final state. The output itself is not saved: a caller may edit it in place
// before backward, as torch's RNN allows (the gated cells' backward reads only their gates).
struct OutputRows {
  int64_t off = 0, rows = 0;  // the following step's rows in the saved h_prev
  OutputRows(const Layout& L, int64_t t, bool reverse) {
    const int64_t next = reverse ? t - 1 : t + 1;
    if (next >= 0 && next < L.T) off = L.off[next], rows = L.bs[next];
  }
  template <typename T>
  const T* row(const T* hprev, const T* h_n, int64_t width, int64_t m) const {
    return m < rows ? hprev + (off + m) * width : h_n + m * width;
  }
};


// Raw views of one layer's forward, for the fused loop. xg holds x·W_ihᵀ (no bias) for all N
// rows; or the loop is to fill it first (xg_fill, see xg_in_loop); or it is null: then the loop
// computes each step's input projection itself from x and w_ih (see fuse_input_projection);
// bias the summed biases outside the recurrent matmul; b_hn GRU's b_hn (or null).
struct ForwardArgs {
  Cell cell;
  const Layout* L;
  int64_t H;
  bool reverse;
  const float* xg;
  const float* x;      // (N, I)
  const float* w_ih;   // (G·H, I)
  int64_t I;
  const float* bias;
  const float* b_hn;
  const float* w_hh;   // (G·H, H)
  // W_hh in bfloat16 (the module's own bf16 weights), or null: when set, the recurrent
  // product runs on bf16 tiles (AMX or AVX512_BF16) with h rounded to bf16, as torch's bf16 LSTM does
  const c10::BFloat16* w_hh_bf16;
  // With w_hh_bf16 and no xg: x (N, I) and W_ih (G·H, I) in bf16, I even, for the projection
  const c10::BFloat16* x_bf16;
  const c10::BFloat16* w_ih_bf16;
  const float* peep;   // (3, H) or null
  const float* h0;     // (B, H)
  float* c;            // (B, H) in: c0, out: c_n (LSTM only)
  float* out;          // (N, H)
  float* h_n;          // (B, H)
  float* save_gates;   // null unless training
  float* save_cells;
  float* save_hprev;
  // xg's row stride
  int64_t xg_ld = 0;
  // Set (to xg): the loop makes the projection itself from x and w_ih, each thread its own
  // panels' columns for all steps before the first (see xg_in_loop), in its panel order: the G
  // gates of each panel's units side by side (xg_panel_width). Otherwise xg is gate-major.
  float* xg_fill = nullptr;
};

struct BackwardArgs {
  Cell cell;
  const Layout* L;
  int64_t H;
  bool reverse;
  const float* grad_out;  // (N, H) or null
  const float* w_hh;      // (G·H, H)
  // W_hh in bfloat16, or null: when set, dgates·W_hh runs on brgemm tiles with the gate
  // gradients rounded to bf16 for it
  const c10::BFloat16* w_hh_bf16;
  const float* peep;
  const float* gates;     // saved
  const float* cells;
  const float* hprev;
  const float* h_n;       // (B, H) the final states (RNN cells: see OutputRows)
  float* dh;              // (B, H) in: grad of h_n, out: grad of h0
  float* dc;              // (B, H) LSTM
  float* dxg;             // (N, G·H)
  float* drec;            // (N, G·H); == dxg except for GRU
};

// The fused loops handle float32 RNN/LSTM(peephole)/GRU without projection; everything else
// takes the MKL-per-step loop in rnn.cpp.
// Packing W_hh costs about as much as T·B = 8 rows of recurrent GEMM, and reads and writes all
// of W_hh once more: cells and streaming steps (T < 4) and very short sequences go to the
// per-step loop, which calls the BLAS without packing (measured: an LSTMCell at B = 32,
// H = 1024 spent a third of its time packing a 16 MB W_hh it then used once). A single
// sequence whose W_hh fits in 256 KB is the exception: there each per-step BLAS call (a
// threaded GEMV) costs a fork and join, more than packing. Measured, 2 threads, µs per call,
// per-step → fused, B = 1, T = 4 / 8 / 15: LSTM H = 64 21.7 → 18.9 / 32.2 → 23.7 / 49.0 →
// 28.3, H = 128 29.1 → 28.5 / 51.4 → 40.4 / 84.3 → 56.1; GRU H = 128 28.3 → 25.0 / 43.5 →
// 31.4 / 69.2 → 43.0; RNN H = 256 27.4 → 27.1 / 45.5 → 36.5 / 81.7 → 54.4; but LSTM
// H = 256 (1 MB) 65.6 → 119 / 119 → 142 / 224 → 221, and B = 2 mixed (LSTM H = 128, T = 6:
// 46.4 → 52.9; GRU 37.9 → 35.4).
inline bool fused_supported(Cell c, bool proj, const Layout& L, int64_t H) {
  if (proj || c == Cell::GruCho || L.T < 4) return false;
  return L.N >= 16 || (L.B == 1 && gate_count(c) * H * H * int64_t(sizeof(float)) <= (256 << 10));
}
// Whether the fused loop should accumulate the input projection into each step's products,
// instead of having it made for all steps before the first (xg_in_loop).
bool fuse_input_projection(Cell cell, const Layout& L, int64_t I, int64_t H);
// Whether an input projection that the fused loop does not take into its steps is made by the
// loop's threads before the first step (each its own panels, on the panel tiles, in the loop's
// panel order) rather than by one MKL GEMM beforehand (gate-major). SEQKERN_RNN_XG_LOOP = 0|1
// forces.
bool xg_in_loop(Cell cell, int64_t H);
// The width of a projection in the loop's panel order: row n holds, per panel, the G gates of
// its pw units side by side (pw = the units of a panel; zeros past H), panels(H)·G·pw in all.
int64_t xg_panel_width(Cell cell, int64_t H);
// Whether the bfloat16 recurrent product can run on brgemm tiles here (oneDNN packs bf16 for
// this CPU, and SEQKERN_RNN_AMX is not "0").
bool amx_recurrence_supported();
void fused_forward(const ForwardArgs& a);
void fused_backward(const BackwardArgs& a);

}  // namespace seqkern::cpu::rnn_detail
