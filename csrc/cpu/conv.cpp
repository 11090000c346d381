// Causal dilated 1-D convolution (dense, grouped and depthwise) and the fused WaveNet gated
// residual block, forward and backward.
//
// Conventions. x is (B, C_in, L); the weight is nn.Conv1d's (C_out, C_in/groups, K); tap k of
// output column t reads input column t − s_k with s_k = (K−1−k)·d. P = (K−1)·d columns of
// history come from `init` (B, C_in, P) when given, else are zero. Nothing materialises the
// whole padded input: the dense forward unfolds one column tile at a time, and elsewhere every
// tap splits its column range into the part that reads x and the part that reads init, and
// the zero part is simply skipped.
//
// Dense/grouped path (and the WaveNet block's dilated conv), forward: per (batch, group,
// column tile) the input tile is unfolded (rows: channel × tap) and the output is one GEMM with
// the weight as stored; the bias and the activation run on the tile while it is still hot, so
// y goes to memory once. Backward: the weight gradient from the same unfolded tiles, in the
// weight's layout; dx per tap, K shifted GEMMs per tile with the weight transposed once.
//
// Depthwise path (groups = C_in = C_out): one row per (b, c), vectorised along time. Columns
// t ≥ P (all taps read x) accumulate every tap in a register; the head t < P, where some taps
// read init or zeros, goes tap by tap through a small L1 buffer.
//
// WaveNet block: per column tile, the dilated conv (2G rows) lands in the saved h (training)
// or a tile buffer (inference), the gate, skip and residual GEMMs consume it from cache, so the
// 2G pre-activation is written at most once. Backward recomputes the gate from h, writes dh
// once, and hands dh to the dense conv backward.
//
// Generation (wavenet_stack_step): the whole stack for one sample in one call, with the queues
// of the last (K−1)·d inputs as state.
//
// bfloat16 runs the float kernels on float copies (fp32 accumulation); saved activations
// (pre-activation, WaveNet's h) are kept in the compute dtype.
#include "isa.h"

#include "bindings.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/gemm.h"
#include "cpu/large_alloc.h"
#include "cpu/transpose.h"
#include "cpu/vec_math.h"

namespace seqkern::cpu {
namespace {

enum Act : int64_t { kNone = 0, kRelu = 1, kSilu = 2, kTanh = 3 };

// The largest (K − 1)·dilation: beyond it the index arithmetic of the taps could overflow
// (seqkern.ops.conv.MAX_LOOKBACK, checked there first).
constexpr int64_t kMaxLookback = (int64_t(1) << 31) - 1;
inline bool lookback_fits(int64_t K, int64_t dilation) {
  return K <= 1 || K - 1 <= kMaxLookback / dilation;  // (dilation ≥ 1, checked before)
}

struct Geom {
  int64_t B, Cin, Cout, L, K, d, P, groups, Cin_g, Cout_g;
  int64_t shift(int64_t k) const { return (K - 1 - k) * d; }
};

Geom make_geom(const at::Tensor& x, const at::Tensor& w, int64_t dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 3, "seqkern conv: x must be (B, C, L), got ", x.sizes());
  TORCH_CHECK(w.dim() == 3, "seqkern conv: weight must be (C_out, C_in/groups, K), got ", w.sizes());
  TORCH_CHECK(dilation >= 1 && groups >= 1, "seqkern conv: dilation and groups must be >= 1");
  Geom g;
  g.B = x.size(0);
  g.Cin = x.size(1);
  g.L = x.size(2);
  g.Cout = w.size(0);
  g.K = w.size(2);
  g.d = dilation;
  TORCH_CHECK_VALUE(lookback_fits(g.K, dilation),
                    "seqkern conv: (kernel_size - 1) * dilation exceeds ", kMaxLookback);
  g.P = (g.K - 1) * dilation;
  g.groups = groups;
  TORCH_CHECK(g.K >= 1, "seqkern conv: kernel size must be >= 1");
  TORCH_CHECK(g.Cin % groups == 0 && g.Cout % groups == 0,
              "seqkern conv: channels not divisible by groups");
  g.Cin_g = g.Cin / groups;
  g.Cout_g = g.Cout / groups;
  TORCH_CHECK(w.size(1) == g.Cin_g, "seqkern conv: weight has ", w.size(1),
              " input channels per group, expected ", g.Cin_g);
  return g;
}

const at::Tensor& opt(const c10::optional<at::Tensor>& t) {
  static const at::Tensor undefined;
  return t.has_value() ? *t : undefined;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}


// ------------------------------------------------------------- activation ----------------

template <typename T>
inline Vec<T> activate(const Vec<T>& v, int64_t act) {
  switch (act) {
    case kRelu: return relu(v);
    case kSilu: return silu(v);
    case kTanh: return tanh(v);
    default: return v;
  }
}

// dL/d(pre-activation) from dL/dy. relu and tanh use the output y; silu needs the
// pre-activation z (it cannot be recovered from y): silu'(z) = σ(z)·(1 + z·(1 − σ(z))).
template <typename T>
inline Vec<T> activation_grad(const Vec<T>& g, const Vec<T>& y, const Vec<T>& z, int64_t act) {
  const Vec<T> one(T(1)), zero(T(0));
  switch (act) {
    case kRelu: return Vec<T>::blendv(g, zero, y <= zero);  // (NaN y passes g, as torch)
    case kTanh: return g * (one - y * y);
    case kSilu: {
      Vec<T> s = sigmoid(z);
      return g * s * (one + z * (one - s));
    }
    default: return g;
  }
}

// y ← act(y + bias) over one row segment; the pre-activation goes to `pre` when given.
template <typename T>
void bias_activate_row(T* y, T* pre, int64_t n, T bias, int64_t act) {
  const Vec<T> vb(bias);
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    Vec<T> v = load(y + j, c) + vb;
    if (pre) store(v, pre + j, c);
    store(activate(v, act), y + j, c);
  });
}

// --------------------------------------------------------------- tiling -------------------

// Columns per tile for the GEMM paths: the output and input tiles together stay around
// 256 KiB (well inside the 2 MiB L2), and there are enough tiles to feed every thread.
int64_t tile_columns(int64_t rows, int64_t L, int64_t outer, size_t elem) {
  int64_t nt = (int64_t(256) << 10) / (int64_t(elem) * std::max<int64_t>(rows, 1));
  nt = std::clamp<int64_t>(nt / 64 * 64, 128, 4096);
  const int64_t threads = at::get_num_threads();
  while (nt > 128 && outer * ((L + nt - 1) / nt) < 2 * threads) nt /= 2;
  return std::min(nt, std::max<int64_t>(L, 1));
}

// Per-thread accumulators for reductions over batch and time (weight and bias gradients):
// each thread owns a slice, summed at the end, so the result does not depend on a race.
template <typename T>
struct ThreadAccum {
  at::Tensor buf;
  int64_t n;
  ThreadAccum(int64_t n, at::ScalarType st) : n(n) {
    buf = at::zeros({at::get_num_threads(), std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(st));
  }
  T* mine() { return buf.data_ptr<T>() + at::get_thread_num() * buf.size(1); }
  at::Tensor sum() { return buf.narrow(1, 0, n).sum(0); }
};

// --------------------------------------------------------------- dense ---------------------

// The work items of the dense paths: (batch, group, column tile), numbered 0..count().
struct DenseTiles {
  struct Item {
    int64_t b, grp, t0, t1;
    int64_t in, init, out;  // offsets of the group's first input, history and output row
  };
  const Geom& g;
  int64_t nt, ntiles;
  // in_rows: the rows the tile width is sized on. Each thread's unfolded tile (C_in/g·K rows)
  // stays within 8 MB, narrower than tile_columns' least 128 columns where it must (C_in = 4096,
  // K = 31 would hold 65 MB).
  DenseTiles(const Geom& geom, size_t elem, int64_t in_rows)
      : g(geom),
        nt(std::min(tile_columns(std::max(in_rows, g.Cout_g), g.L, g.B * g.groups, elem),
                    std::max<int64_t>(8, (int64_t(8) << 20) /
                                             (int64_t(elem) * std::max<int64_t>(1, g.Cin_g * g.K))))),
        ntiles((g.L + nt - 1) / nt) {}
  int64_t count() const { return g.B * g.groups * ntiles; }
  Item operator[](int64_t it) const {
    const int64_t bg = it / ntiles, t0 = (it % ntiles) * nt;
    const int64_t b = bg / g.groups, grp = bg % g.groups;
    const int64_t in_row = b * g.Cin + grp * g.Cin_g;
    return {b, grp, t0, std::min(g.L, t0 + nt), in_row * g.L, in_row * g.P,
            (b * g.Cout + grp * g.Cout_g) * g.L};
  }
};

// Rows (i·K + k), i an input channel of the group and k a tap, of x_ext[i, t − s_k] for the
// columns t0..t1 (init, or zeros, where t < s_k): one column tile of the unfolded input, n =
// t1 − t0 columns apart. The tile's output is then one GEMM with the weight as stored.
template <typename T>
void unfold_tile(const Geom& g, const T* xb, const T* ib, int64_t t0, int64_t t1, T* cols) {
  const int64_t n = t1 - t0;
  for (int64_t i = 0; i < g.Cin_g; ++i) {
    for (int64_t k = 0; k < g.K; ++k) {
      T* row = cols + (i * g.K + k) * n;
      const int64_t s = g.shift(k);
      const int64_t h = std::clamp<int64_t>(s - t0, 0, n);  // columns before x begins
      if (h > 0) {
        if (ib)
          std::memcpy(row, ib + i * g.P + g.P + t0 - s, sizeof(T) * h);
        else
          std::fill(row, row + h, T(0));
      }
      if (h < n) std::memcpy(row + h, xb + i * g.L + t0 + h - s, sizeof(T) * (n - h));
    }
  }
}

// C (+= when add) A[M×K]·op(B), row-major with leading dimensions, op(B) = Bᵀ (B stored N×K)
// when b_trans: fp32/fp64 GEMMs, and bf16 operands with fp32 sums on MKL's bf16 GEMM (AMX
// where the CPU has it). Products of two bf16 numbers are exact in fp32, so the bf16 one is the
// fp32 computation on the converted operands up to summation order, without converting them.
inline void product(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, bool b_trans, bool add, float* C, int64_t ldc) {
  gemm<float>(M, N, K, 1.f, A, lda, B, ldb, b_trans, add ? 1.f : 0.f, C, ldc);
}
inline void product(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                    const double* B, int64_t ldb, bool b_trans, bool add, double* C, int64_t ldc) {
  gemm<double>(M, N, K, 1.0, A, lda, B, ldb, b_trans, add ? 1.0 : 0.0, C, ldc);
}
inline void product(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                    const at::BFloat16* B, int64_t ldb, bool b_trans, bool add, float* C,
                    int64_t ldc) {
  TORCH_INTERNAL_ASSERT(gemm_bf16(false, b_trans, M, N, K, A, lda, B, ldb, C, ldc, add));
}

// Whether gemm_bf16 serves here (MKL's bf16 GEMM, or the own AVX512_BF16 one): it returns
// false before looking at the operands when neither does.
bool bf16_gemm_available() {
  static const bool ok = gemm_bf16(false, false, 0, 0, 0, nullptr, 1, nullptr, 1, nullptr, 1);
  return ok;
}

// Whether for_tiles runs n work items on the calling thread: fewer items than threads (a few
// columns of one sequence; the GEMMs then thread themselves), or one thread.
bool tiles_on_one_thread(int64_t n) {
  const int64_t threads = at::get_num_threads();
  return n < threads || threads == 1;
}

// Runs f(i0, i1) over n work items, split between threads unless tiles_on_one_thread.
template <typename F>
void for_tiles(int64_t n, const F& f) {
  if (tiles_on_one_thread(n))
    f(0, n);
  else
    at::parallel_for(0, n, 1, f);
}

// The forward as one GEMM per (batch, group, column tile) over the unfolded input, with the
// weight as stored ((C_out/g) × (C_in/g·K)). Shifted per-tap GEMMs needed the weight repacked
// tap-major on every call, which at few columns cost several times the products (C = 1024,
// K = 5, L = 1: 5.5 ms against torch's 0.8); the unfolded tile costs C_in·K·n copies against
// 2·C_out·C_in·K·n flops. The history's zeros are multiplied, as torch's padded conv does, so a
// non-finite weight makes those columns NaN there too. S: the type of x, init and w (float,
// double, or bf16 with T = float); T: of the output, bias and pre-activation.
template <typename S, typename T>
void dense_forward(const Geom& g, const S* x, const S* init, const S* w, const T* bias, T* y,
                   T* pre, int64_t act) {
  const int64_t rows = g.Cin_g * g.K;
  // (sized on a quarter of the unfolded rows: MKL packs the weight again for every tile, and
  // such wider tiles measured 1–3 % faster than tiles sized on all of them)
  const DenseTiles tiles(g, sizeof(S), rows / 4);
  for_tiles(tiles.count(), [&](int64_t i0, int64_t i1) {
    std::unique_ptr<S[]> cols(new S[rows * tiles.nt]);
    for (int64_t it = i0; it < i1; ++it) {
      const auto tl = tiles[it];
      const int64_t n = tl.t1 - tl.t0;
      unfold_tile<S>(g, x + tl.in, init ? init + tl.init : nullptr, tl.t0, tl.t1, cols.get());
      product(g.Cout_g, n, rows, w + tl.grp * g.Cout_g * rows, rows, cols.get(), n, false, false,
              y + tl.out + tl.t0, g.L);
      for (int64_t o = 0; o < g.Cout_g; ++o) {
        const int64_t row = tl.out + o * g.L + tl.t0;
        bias_activate_row<T>(y + row, pre ? pre + row : nullptr, n,
                             bias ? bias[tl.grp * g.Cout_g + o] : T(0), act);
      }
    }
  });
}

// wt[grp][i][k·C_out/g + o] = w[grp·C_out/g + o][i][k]: per group and tap k, the transposed
// (C_in/g) × (C_out/g) matrix of the tap, K·C_out/g apart. That is the group's weight as a
// (C_out/g) × (C_in/g·K) matrix, transposed (in blocks: an element loop gathering across
// C_out took 4 ms of a 1024·1024·5 weight's 22 ms training step).
template <typename T>
void weight_by_input_rows(const Geom& g, const T* w, T* wt) {
  const int64_t cols = g.Cin_g * g.K, chunks = (cols + 63) / 64;
  at::parallel_for(0, g.groups * chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t grp = c / chunks, j = (c % chunks) * 64, n = std::min<int64_t>(64, cols - j);
      const int64_t off = grp * g.Cout_g * cols;
      transpose<T>(w + off + j, cols, wt + off + j * g.Cout_g, g.Cout_g, g.Cout_g, n);
    }
  });
}

// Given dz = dL/d(pre-activation) (B, C_out, L), with the weight as stored (C_out, C_in/g, K):
// dx (+= when accumulate), dinit (+=), dw (C_out, C_in/g, K; overwritten) and db (+=, when
// non-null). dw: per tile, dz times the unfolded input tile (the forward's unfold_tile)
// transposed, in the weight's own layout. dx and dinit: per tile of x_ext's columns (each
// owned by one thread), Σ_k W_kᵀ dz[:, u + s_k] over the columns where u + s_k is in 0..L−1,
// as torch's transposed conv, which multiplies nothing by padding (an inf weight then leaves
// the last columns finite). The weight's repacked tap-major copy, with its gradient's copy
// back, cost more than the products at a few columns; one transposed copy remains (wt).
// S: the operands' type (T, or bf16 with T = float, where db must be null: the caller sums the
// fp32 dz); T: of the gradients.
template <typename S, typename T>
void dense_backward(const Geom& g, const S* dz, const S* x, const S* init, const S* w, T* dx,
                    bool accumulate, T* dinit, T* dw, T* db) {
  static_assert(std::is_same_v<S, T> || std::is_same_v<S, at::BFloat16>);
  if constexpr (!std::is_same_v<S, T>) TORCH_INTERNAL_ASSERT(db == nullptr);
  const auto st = c10::CppTypeToScalarType<T>::value;
  const int64_t rows = g.Cin_g * g.K, wrow = g.K * g.Cout_g;
  const DenseTiles tiles(g, sizeof(T), rows);
  // On one thread (tiles_on_one_thread) the sums go straight to dw and db (db zeroed by the
  // caller): per-thread copies of a large weight's gradient, zeroed, summed and copied, cost
  // more than its products at a few columns.
  if (tiles.count() == 0) {  // (an empty batch)
    std::fill(dw, dw + g.Cout * rows, T(0));
    return;
  }
  const bool serial = tiles_on_one_thread(tiles.count());
  ThreadAccum<T> dw_acc(serial ? 0 : g.Cout * rows, st);
  ThreadAccum<T> db_acc(serial || !db ? 0 : g.Cout, st);
  for_tiles(tiles.count(), [&](int64_t i0, int64_t i1) {
    T* dwt = serial ? dw : dw_acc.mine();
    T* dbt = serial ? db : db_acc.mine();
    std::unique_ptr<S[]> cols(new S[rows * tiles.nt]);
    for (int64_t it = i0; it < i1; ++it) {
      const auto tl = tiles[it];
      const int64_t n = tl.t1 - tl.t0;
      unfold_tile<S>(g, x + tl.in, init ? init + tl.init : nullptr, tl.t0, tl.t1, cols.get());
      const S* dzb = dz + tl.out + tl.t0;
      const bool first = serial && tl.b == 0 && tl.t0 == 0;  // (of its group: dw unset)
      product(g.Cout_g, rows, n, dzb, g.L, cols.get(), n, true, !first,
              dwt + tl.grp * g.Cout_g * rows, rows);
      if constexpr (std::is_same_v<S, T>) {
        if (!db) continue;
        for (int64_t o = 0; o < g.Cout_g; ++o) {
          const T* r = dzb + o * g.L;
          Vec<T> acc(T(0));
          for_each_vec<T>(n, [&](int64_t j, int64_t c) {
            acc = acc + load(r + j, c);  // partial loads zero the unused lanes
          });
          dbt[tl.grp * g.Cout_g + o] += reduce_sum<T>(acc);
        }
      }
    }
  });

  // dx over x's columns 0..L−1, then dinit over the history's −P..−1 (P − s_k of them read
  // by tap k), in tiles of the same width.
  // (block-cache memory, as dw's: a fresh large allocation is mapped a page fault at a time)
  const at::Tensor wt_hold = empty_large({g.groups * g.Cin_g * wrow},
                                         at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value));
  S* const wt = wt_hold.data_ptr<S>();
  weight_by_input_rows<S>(g, w, wt);
  const int64_t nt = tiles.nt, head = dinit ? (g.P + nt - 1) / nt : 0;
  const int64_t per_group = tiles.ntiles + head;
  for_tiles(g.B * g.groups * per_group, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bg = it / per_group, j = it % per_group;
      const int64_t b = bg / g.groups, grp = bg % g.groups;
      const bool hist = j >= tiles.ntiles;
      const int64_t u0 = hist ? -g.P + (j - tiles.ntiles) * nt : j * nt;
      const int64_t u1 = hist ? std::min<int64_t>(0, u0 + nt) : std::min(g.L, u0 + nt);
      const S* dzb = dz + (b * g.Cout + grp * g.Cout_g) * g.L;
      const int64_t in_row = b * g.Cin + grp * g.Cin_g;
      T* out = hist ? dinit + in_row * g.P + g.P : dx + in_row * g.L;  // (column u at out + u)
      const int64_t ld = hist ? g.P : g.L;
      // tap K−1 (no shift) covers a tile of x's columns whole and starts it; dinit starts at 0
      for (int64_t k = g.K - 1; k >= 0; --k) {
        const int64_t s = g.shift(k);
        const int64_t a = std::max(u0, -s), e = std::min(u1, g.L - s);
        if (a < e)
          product(g.Cin_g, e - a, g.Cout_g, wt + grp * g.Cin_g * wrow + k * g.Cout_g, wrow,
                  dzb + a + s, g.L, false, hist || accumulate || k != g.K - 1, out + a, ld);
      }
    }
  });
  if (serial) return;
  at::Tensor dws = dw_acc.sum();
  std::memcpy(dw, dws.data_ptr<T>(), sizeof(T) * dws.numel());
  if (db) {
    at::Tensor dbs = db_acc.sum();
    std::memcpy(db, dbs.data_ptr<T>(), sizeof(T) * g.Cout);
  }
}

// ------------------------------------------------------------- depthwise ------------------

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  Vec<T> acc0(T(0)), acc1(T(0));
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    acc0 = at::vec::fmadd(Vec<T>::loadu(a + j), Vec<T>::loadu(b + j), acc0);
    acc1 = at::vec::fmadd(Vec<T>::loadu(a + j + W), Vec<T>::loadu(b + j + W), acc1);
  }
  for (; j < n; j += W) {
    const int64_t c = std::min(W, n - j);
    // partial loads leave the unused lanes zero
    acc0 = at::vec::fmadd(load(a + j, c), load(b + j, c), acc0);
  }
  return reduce_sum<T>(acc0 + acc1);
}

constexpr int64_t kRowChunk = 512;  // columns of the L1 accumulator in the head region

// One depthwise row: y[t] = act(bias + Σ_k w_k x_ext[t − s_k]).
// S: the storage type of x and y (bf16 is read and written as stored, computed in fp32).
template <typename T, typename S = T>
void depthwise_row_forward(const Geom& g, const S* xr, const T* ir, const T* w, T bias, S* yr,
                           T* pr, int64_t act) {
  constexpr bool same = std::is_same_v<S, T>;
  const int64_t head = std::min(g.P, g.L);
  alignas(64) T acc[kRowChunk];
  for (int64_t t0 = 0; t0 < head; t0 += kRowChunk) {
    const int64_t t1 = std::min(head, t0 + kRowChunk);
    std::fill(acc, acc + (t1 - t0), T(0));
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t s = g.shift(k);
      const int64_t a = std::max(t0, s);
      if (a < t1) {
        if constexpr (same) {
          axpy<T>(acc + (a - t0), xr + (a - s), t1 - a, w[k]);
        } else {
          for (int64_t t = a; t < t1; ++t) acc[t - t0] += w[k] * static_cast<T>(xr[t - s]);
        }
      }
      const int64_t e = std::min(t1, s);
      if (ir && t0 < e) axpy<T>(acc, ir + (g.P + t0 - s), e - t0, w[k]);
    }
    if constexpr (!same) bias_activate_row<T>(acc, pr ? pr + t0 : nullptr, t1 - t0, bias, act);
    std::copy(acc, acc + (t1 - t0), yr + t0);
  }
  if constexpr (same) bias_activate_row<T>(yr, pr, head, bias, act);
  // Interior: every tap reads x, so the whole sum, the bias and the activation stay in a
  // register and y is written once.
  const Vec<T> vb(bias);
  const int64_t n = g.L - head;
  const S* xs = xr + head;
  S* ys = yr + head;
  T* ps = pr ? pr + head : nullptr;
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    Vec<T> v = vb;
    for (int64_t k = 0; k < g.K; ++k)
      v = at::vec::fmadd(Vec<T>(w[k]), load(xs + j - g.shift(k), c), v);
    if (ps) store(v, ps + j, c);
    store(activate(v, act), ys + j, c);
  });
}

template <typename T, typename S = T>
void depthwise_forward(const Geom& g, const S* x, const T* init, const T* w, const T* bias, S* y,
                       T* pre, int64_t act) {
  const int64_t rows = g.B * g.Cin;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(g.L, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % g.Cin;
      depthwise_row_forward<T, S>(g, x + r * g.L, init ? init + r * g.P : nullptr, w + c * g.K,
                               bias ? bias[c] : T(0), y + r * g.L, pre ? pre + r * g.L : nullptr,
                               act);
    }
  });
}

// dz for a whole tensor: dL/d(pre-activation) = grad · act'(...)
template <typename T>
void activation_backward(const T* gy, const T* y, const T* pre, T* dz, int64_t n, int64_t act) {
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
    const Vec<T> zero(T(0));
    for_each_vec<T>(i1 - i0, [&](int64_t j, int64_t c) {
      const int64_t i = i0 + j;
      Vec<T> yv = y ? load(y + i, c) : zero;
      Vec<T> zv = pre ? load(pre + i, c) : zero;
      store(activation_grad(load(gy + i, c), yv, zv, act), dz + i, c);
    });
  });
}

constexpr int64_t kMaxFusedTaps = 8;

// Depthwise backward over the interior j < n (= L − P) of one row: dx[j] = Σ_k w_k dz[j + s_k],
// dw_k += Σ_j dz[j + s_k] x[j], db += Σ_j dz[j]. Each dz vector loaded for dx also feeds dw, so
// the row is read once; the K accumulators live in registers (K ≤ kMaxFusedTaps).
template <typename T>
void depthwise_backward_interior(const Geom& g, const T* dz, const T* x, const T* w, T* dx,
                                 int64_t n, T* dw, T* db) {
  Vec<T> acc[kMaxFusedTaps], wv[kMaxFusedTaps];
  int64_t sh[kMaxFusedTaps];
  for (int64_t k = 0; k < g.K; ++k) {
    acc[k] = Vec<T>(T(0));
    wv[k] = Vec<T>(w[k]);
    sh[k] = g.shift(k);
  }
  Vec<T> dbv(T(0));
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const Vec<T> xv = load(x + j, c);
    Vec<T> v(T(0));
    for (int64_t k = 0; k < g.K; ++k) {
      const Vec<T> d = load(dz + j + sh[k], c);
      v = at::vec::fmadd(wv[k], d, v);
      acc[k] = at::vec::fmadd(d, xv, acc[k]);
    }
    dbv = dbv + load(dz + j, c);
    store(v, dx + j, c);
  });
  for (int64_t k = 0; k < g.K; ++k) dw[k] += reduce_sum<T>(acc[k]);
  if (db) *db += reduce_sum<T>(dbv);
}

// Per channel (so the weight and bias gradients need no reduction across threads), over the
// batch: dx[t] = Σ_k w_k dz[t + s_k], dw_k = Σ_t dz[t] x_ext[t − s_k], db = Σ_t dz[t], and
// dinit[P − s_k + t] += w_k dz[t] for t < s_k.
//
// dz may be strided (ds = its strides): a row whose time stride is not 1 (typically the
// expanded gradient of y.sum(), stride 0) is gathered into an L-column scratch row, which is
// cheaper than materialising the whole tensor first.
template <typename T>
void depthwise_backward(const Geom& g, const T* dz, const int64_t* ds, const T* x,
                        const T* init, const T* w, T* dx, T* dinit, T* dw, T* db) {
  at::parallel_for(0, g.Cin, 1, [&](int64_t c0, int64_t c1) {
    alignas(64) T acc[kRowChunk];
    std::vector<T> row(ds[2] == 1 ? 0 : g.L);
    for (int64_t c = c0; c < c1; ++c) {
      const T* wc = w + c * g.K;
      std::vector<T> dwc(g.K, T(0));
      T dbc = T(0);
      for (int64_t b = 0; b < g.B; ++b) {
        const int64_t r = b * g.Cin + c;
        const T* dzr = dz + b * ds[0] + c * ds[1];
        if (ds[2] != 1) {
          if (ds[2] == 0) std::fill(row.begin(), row.end(), *dzr);
          else for (int64_t t = 0; t < g.L; ++t) row[t] = dzr[t * ds[2]];
          dzr = row.data();
        }
        const T* xr = x + r * g.L;
        const T* ir = init ? init + r * g.P : nullptr;
        T* dxr = dx + r * g.L;
        // Interior t < L − P: every tap is inside the row; dx, dw and db in one pass.
        const int64_t interior = std::max<int64_t>(0, g.L - g.P);
        const bool fused = g.K <= kMaxFusedTaps;
        if (fused) {
          depthwise_backward_interior<T>(g, dzr, xr, wc, dxr, interior, dwc.data(),
                                         db ? &dbc : nullptr);
        } else {
          for_each_vec<T>(interior, [&](int64_t j, int64_t n) {
            Vec<T> v(T(0));
            for (int64_t k = 0; k < g.K; ++k)
              v = at::vec::fmadd(Vec<T>(wc[k]), load(dzr + j + g.shift(k), n), v);
            store(v, dxr + j, n);
          });
        }
        // What the interior pass did not cover: db and dw over j ≥ L − P (everything when not
        // fused) and the taps that read the initial state.
        const int64_t from = fused ? interior : 0;
        if (db) {
          Vec<T> s(T(0));
          for_each_vec<T>(g.L - from, [&](int64_t j, int64_t n) { s = s + load(dzr + from + j, n); });
          dbc += reduce_sum<T>(s);
        }
        for (int64_t k = 0; k < g.K; ++k) {
          const int64_t s = g.shift(k);
          // dw_k += Σ_j dz[j + s] x[j] over j in [from, L − s)
          if (from < g.L - s) dwc[k] += dot<T>(dzr + from + s, xr + from, g.L - s - from);
          if (ir) dwc[k] += dot<T>(dzr, ir + (g.P - s), std::min(s, g.L));
        }
        for (int64_t t0 = interior; t0 < g.L; t0 += kRowChunk) {
          const int64_t t1 = std::min(g.L, t0 + kRowChunk);
          std::fill(acc, acc + (t1 - t0), T(0));
          for (int64_t k = 0; k < g.K; ++k) {
            const int64_t e = std::min(t1, g.L - g.shift(k));
            if (t0 < e) axpy<T>(acc, dzr + t0 + g.shift(k), e - t0, wc[k]);
          }
          std::copy(acc, acc + (t1 - t0), dxr + t0);
        }
        if (dinit) {
          T* dir = dinit + r * g.P;
          std::fill(dir, dir + g.P, T(0));
          for (int64_t k = 0; k < g.K - 1; ++k) {
            const int64_t s = g.shift(k);
            axpy<T>(dir + (g.P - s), dzr, std::min(s, g.L), wc[k]);
          }
        }
      }
      for (int64_t k = 0; k < g.K; ++k) dw[c * g.K + k] = dwc[k];
      if (db) db[c] = dbc;
    }
  });
}

bool is_depthwise(const Geom& g) { return g.groups == g.Cin && g.Cout == g.Cin; }

// Whether a dense conv of this dtype takes bf16 operands (x, the history, w and, backward, dz)
// into bf16 GEMMs with fp32 sums (product), rather than fp32 copies of them.
bool bf16_products(const Geom& g, at::ScalarType st) {
  return st == at::kBFloat16 && !is_depthwise(g) && bf16_gemm_available();
}

// torch's padded conv multiplies every tap by the zero history, so a NaN or inf weight makes
// the first (K−1)·d output columns NaN there; the depthwise kernels skip a history of zeros
// (it adds nothing finite). Where a weight is not finite they get it as explicit zeros
// instead, so outputs and gradients follow torch's. (The dense kernels multiply the zeros of
// their unfolded tiles.) w: contiguous, in the compute type.
at::Tensor zero_history_if_weights_nonfinite(const at::Tensor& init, const at::Tensor& w,
                                             const Geom& g) {
  if (init.defined() || g.P == 0 || g.B == 0 || g.Cin == 0 || w.numel() == 0) return init;
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "seqkern_conv_weights_finite", [&] {
    finite = all_finite(w.data_ptr<scalar_t>(), w.numel());
  });
  return finite ? init : at::zeros({g.B, g.Cin, g.P}, w.options());
}

// ------------------------------------------------------------- entry points ---------------

std::vector<at::Tensor> conv_forward(const at::Tensor& x_in, const at::Tensor& w_in,
                                     const c10::optional<at::Tensor>& bias_in,
                                     const c10::optional<at::Tensor>& init_in, int64_t dilation,
                                     int64_t groups, int64_t act, bool save_preact) {
  const Geom g = make_geom(x_in, w_in, dilation, groups);
  TORCH_CHECK(act >= kNone && act <= kTanh, "seqkern conv: unknown activation code ", act);
  const auto st = x_in.scalar_type();
  const auto ct = compute_type(x_in.scalar_type(), "seqkern conv");
  // Depthwise is memory bound: bf16/fp16 x and y are read and written as stored, not converted.
  const bool narrow_rows = at::isReducedFloatingType(st) && is_depthwise(g) && g.L > 0;
  const bool bf16 = bf16_products(g, st);
  at::Tensor x = contiguous_as(x_in, narrow_rows || bf16 ? st : ct);
  at::Tensor w = contiguous_as(w_in, bf16 ? st : ct);
  at::Tensor bias = contiguous_as(opt(bias_in), ct);
  at::Tensor init = contiguous_as(opt(init_in), bf16 ? st : ct);
  if (init.defined())
    TORCH_CHECK(init.dim() == 3 && init.size(0) == g.B && init.size(1) == g.Cin &&
                    init.size(2) == g.P,
                "seqkern conv: initial_state must be (B, C_in, (K-1)*dilation)");
  if (is_depthwise(g)) init = zero_history_if_weights_nonfinite(init, w, g);
  at::Tensor y = empty_large({g.B, g.Cout, g.L}, x.options().dtype(narrow_rows ? st : ct));
  const bool keep = save_preact && act == kSilu;
  at::Tensor pre = keep ? empty_large({g.B, g.Cout, g.L}, x.options().dtype(ct))
                        : at::empty({0}, x.options().dtype(ct));
  if (bf16) {
    using B16 = at::BFloat16;
    if (g.L > 0)
      dense_forward<B16, float>(g, x.data_ptr<B16>(), ptr_or_null<B16>(init), w.data_ptr<B16>(),
                                ptr_or_null<float>(bias), y.data_ptr<float>(),
                                keep ? pre.data_ptr<float>() : nullptr, act);
    return {contiguous_as(y, st), pre};
  }
  if (narrow_rows) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "seqkern_depthwise_forward_16bit", [&] {
      depthwise_forward<float, scalar_t>(
          g, x.data_ptr<scalar_t>(), ptr_or_null<float>(init), w.data_ptr<float>(),
          ptr_or_null<float>(bias), y.data_ptr<scalar_t>(), keep ? pre.data_ptr<float>() : nullptr, act);
    });
    return {y, pre};
  }
  AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_conv_forward", [&] {
    const scalar_t* ip = ptr_or_null<scalar_t>(init);
    const scalar_t* bp = ptr_or_null<scalar_t>(bias);
    scalar_t* pp = keep ? pre.data_ptr<scalar_t>() : nullptr;
    if (g.L == 0) return;
    if (is_depthwise(g)) {
      depthwise_forward<scalar_t>(g, x.data_ptr<scalar_t>(), ip, w.data_ptr<scalar_t>(), bp,
                                  y.data_ptr<scalar_t>(), pp, act);
    } else {
      dense_forward<scalar_t, scalar_t>(g, x.data_ptr<scalar_t>(), ip, w.data_ptr<scalar_t>(), bp,
                                        y.data_ptr<scalar_t>(), pp, act);
    }
  });
  return {contiguous_as(y, st), pre};
}

// Returns {dx, dweight, dbias (empty unless has_bias), dinit (empty unless init given)}.
std::vector<at::Tensor> conv_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                      const at::Tensor& w_in,
                                      const c10::optional<at::Tensor>& init_in,
                                      const at::Tensor& y_in, const at::Tensor& pre_in,
                                      int64_t dilation, int64_t groups, int64_t act,
                                      bool has_bias) {
  const Geom g = make_geom(x_in, w_in, dilation, groups);
  const auto st = x_in.scalar_type();
  const auto ct = compute_type(x_in.scalar_type(), "seqkern conv");
  // (bf16 products: dz rounded to bf16 as torch's bf16 backward holds it; the gradients are
  // summed in fp32)
  const bool bf16 = bf16_products(g, st);
  const auto operand_type = bf16 ? st : ct;
  at::Tensor x = contiguous_as(x_in, operand_type), w = contiguous_as(w_in, operand_type);
  const bool init_given = opt(init_in).defined();
  at::Tensor init = contiguous_as(opt(init_in), operand_type);
  if (is_depthwise(g)) init = zero_history_if_weights_nonfinite(init, w, g);
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({g.B, g.Cout, g.L}),
              "seqkern conv: grad_output has shape ", grad_in.sizes());
  // The depthwise kernel reads a strided gradient directly (see depthwise_backward).
  const bool strided_ok = is_depthwise(g) && act == kNone && grad_in.scalar_type() == ct;
  at::Tensor gy = strided_ok || (bf16 && act == kNone) ? grad_in : contiguous_as(grad_in, ct);
  at::Tensor dz = gy;
  if (act != kNone) {
    at::Tensor y = act == kSilu ? at::Tensor() : contiguous_as(y_in, ct);
    at::Tensor pre = act == kSilu ? contiguous_as(pre_in, ct) : at::Tensor();
    TORCH_CHECK(act != kSilu || pre.numel() == gy.numel(),
                "seqkern conv: silu backward needs the saved pre-activation");
    dz = empty_large(gy.sizes(), gy.options());
    AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_conv_act_backward", [&] {
      activation_backward<scalar_t>(gy.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(y),
                                    ptr_or_null<scalar_t>(pre), dz.data_ptr<scalar_t>(),
                                    gy.numel(), act);
    });
  }
  const auto o = x.options().dtype(ct);
  at::Tensor dx = empty_large({g.B, g.Cin, g.L}, o);
  // (the dense path makes its own)
  at::Tensor dw = is_depthwise(g) || g.L == 0 ? at::zeros(w.sizes(), o) : at::Tensor();
  at::Tensor db = has_bias ? at::zeros({g.Cout}, o) : at::empty({0}, o);
  at::Tensor dinit = init_given ? at::zeros(init.sizes(), o) : at::empty({0}, o);
  if (bf16) {
    using B16 = at::BFloat16;
    if (g.L > 0) {
      if (has_bias) db = dz.sum({0, 2}, false, ct);
      const at::Tensor dzb = contiguous_as(dz, st);
      dw = empty_large(w.sizes(), o);
      dense_backward<B16, float>(g, dzb.data_ptr<B16>(), x.data_ptr<B16>(),
                                 ptr_or_null<B16>(init), w.data_ptr<B16>(),
                                 dx.data_ptr<float>(), false,
                                 init_given && init.numel() > 0 ? dinit.data_ptr<float>() : nullptr,
                                 dw.data_ptr<float>(), nullptr);
    }
    return {contiguous_as(dx, st), contiguous_as(dw, st), contiguous_as(db, st),
            contiguous_as(dinit, st)};
  }
  AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_conv_backward", [&] {
    const scalar_t* ip = ptr_or_null<scalar_t>(init);
    scalar_t* dip = init_given && init.numel() > 0 ? dinit.data_ptr<scalar_t>() : nullptr;
    scalar_t* dbp = has_bias ? db.data_ptr<scalar_t>() : nullptr;
    if (g.L == 0) return;
    if (is_depthwise(g)) {
      depthwise_backward<scalar_t>(g, dz.data_ptr<scalar_t>(), dz.strides().data(),
                                   x.data_ptr<scalar_t>(), ip,
                                   w.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dip,
                                   dw.data_ptr<scalar_t>(), dbp);
    } else {
      dw = empty_large(w.sizes(), o);
      dense_backward<scalar_t, scalar_t>(g, dz.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ip,
                                         w.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), false,
                                         dip, dw.data_ptr<scalar_t>(), dbp);
    }
  });
  return {contiguous_as(dx, st), contiguous_as(dw, st), contiguous_as(db, st),
          contiguous_as(dinit, st)};
}

// ------------------------------------------------------------- WaveNet block --------------

struct Block {
  Geom g;       // the dilated conv: R → 2G
  int64_t R, G, S;
};

Block make_block(const at::Tensor& x, const at::Tensor& conv_w, const at::Tensor& skip_w,
                 const at::Tensor& res_w, int64_t dilation) {
  Block blk;
  blk.g = make_geom(x, conv_w, dilation, 1);
  blk.R = blk.g.Cin;
  TORCH_CHECK(blk.g.Cout % 2 == 0, "seqkern wavenet: conv weight must have 2G output channels");
  blk.G = blk.g.Cout / 2;
  TORCH_CHECK(skip_w.dim() == 2 && skip_w.size(1) == blk.G, "seqkern wavenet: skip weight must be (S, G)");
  TORCH_CHECK(res_w.dim() == 2 && res_w.size(0) == blk.R && res_w.size(1) == blk.G,
              "seqkern wavenet: residual weight must be (R, G)");
  blk.S = skip_w.size(0);
  return blk;
}

// Gate of one tile: z = tanh(a + b_a) ⊙ σ(b + b_b) for the G rows; h is the raw conv output
// (2G rows, leading dimension ldh) and stays unbiased so it is written exactly once.
template <typename T>
void gate_tile(const Block& k, const T* h, int64_t ldh, const T* cb, int64_t n, T* z,
               int64_t ldz) {
  for (int64_t r = 0; r < k.G; ++r) {
    const T* a = h + r * ldh;
    const T* bb = h + (k.G + r) * ldh;
    const Vec<T> ba(cb ? cb[r] : T(0)), bg(cb ? cb[k.G + r] : T(0));
    T* zr = z + r * ldz;
    for_each_vec<T>(n, [&](int64_t j, int64_t c) {
      store(tanh(load(a + j, c) + ba) * sigmoid(load(bb + j, c) + bg), zr + j, c);
    });
  }
}

template <typename T>
void wavenet_forward_impl(const Block& k, const T* x, const T* init, const T* w, const T* cb,
                          const T* ws, const T* sb, const T* wr, const T* rb, T* res, T* skip,
                          T* hsave) {
  const Geom& g = k.g;
  const int64_t rows = k.R * g.K;
  const int64_t nt = tile_columns(std::max({2 * k.G, rows, k.S}), g.L, g.B, sizeof(T));
  const int64_t ntiles = (g.L + nt - 1) / nt;
  at::parallel_for(0, g.B * ntiles, 1, [&](int64_t i0, int64_t i1) {
    LineVector<T> hbuf(hsave ? 0 : 2 * k.G * nt), zbuf(k.G * nt), cols(rows * nt);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / ntiles, t0 = (it % ntiles) * nt, t1 = std::min(g.L, t0 + nt);
      const int64_t n = t1 - t0;
      const T* xb = x + b * k.R * g.L;
      const T* ib = init ? init + b * k.R * g.P : nullptr;
      T* h = hsave ? hsave + b * 2 * k.G * g.L + t0 : hbuf.data();
      const int64_t ldh = hsave ? g.L : nt;
      unfold_tile<T>(g, xb, ib, t0, t1, cols.data());
      product(2 * k.G, n, rows, w, rows, cols.data(), n, false, false, h, ldh);
      gate_tile<T>(k, h, ldh, cb, n, zbuf.data(), nt);
      T* sk = skip + b * k.S * g.L + t0;
      gemm<T>(k.S, n, k.G, T(1), ws, k.G, zbuf.data(), nt, false, T(0), sk, g.L);
      for (int64_t r = 0; r < k.S; ++r) {
        const Vec<T> vb(sb ? sb[r] : T(0));
        T* row = sk + r * g.L;
        for_each_vec<T>(n, [&](int64_t j, int64_t c) { store(load(row + j, c) + vb, row + j, c); });
      }
      T* rs = res + b * k.R * g.L + t0;
      gemm<T>(k.R, n, k.G, T(1), wr, k.G, zbuf.data(), nt, false, T(0), rs, g.L);
      for (int64_t r = 0; r < k.R; ++r) {
        const Vec<T> vb(rb ? rb[r] : T(0));
        T* row = rs + r * g.L;
        const T* xr = xb + r * g.L + t0;
        for_each_vec<T>(n, [&](int64_t j, int64_t c) {
          store(load(row + j, c) + load(xr + j, c) + vb, row + j, c);
        });
      }
    }
  });
}

// Pass 1 over tiles: recompute the gate from the saved h, dz = W_skipᵀ g_skip + W_resᵀ g_res,
// the 1×1 weight/bias gradients, and dh (2G rows) written once. Pass 2 is the dense conv
// backward of dh, with dx starting from the residual path's g_res.
template <typename T>
void wavenet_backward_impl(const Block& k, const T* gres, const T* gskip, const T* x,
                           const T* init, const T* w, const T* cb, const T* ws, const T* wr,
                           const T* h, T* dh, T* dx, T* dinit, T* dw, T* dcb, T* dws, T* dsb,
                           T* dwr, T* drb) {
  const Geom& g = k.g;
  const auto st = c10::CppTypeToScalarType<T>::value;
  const int64_t nt = tile_columns(std::max({2 * k.G, k.R, k.S}), g.L, g.B, sizeof(T));
  const int64_t ntiles = (g.L + nt - 1) / nt;
  ThreadAccum<T> acc(k.S * k.G + k.S + k.R * k.G + k.R, st);
  at::parallel_for(0, g.B * ntiles, 1, [&](int64_t i0, int64_t i1) {
    LineVector<T> z(k.G * nt), dz(k.G * nt);
    T* a = acc.mine();
    T* a_ws = a;
    T* a_sb = a_ws + k.S * k.G;
    T* a_wr = a_sb + k.S;
    T* a_rb = a_wr + k.R * k.G;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / ntiles, t0 = (it % ntiles) * nt, t1 = std::min(g.L, t0 + nt);
      const int64_t n = t1 - t0;
      const T* hb = h + b * 2 * k.G * g.L + t0;
      const T* gs = gskip + b * k.S * g.L + t0;
      const T* gr = gres + b * k.R * g.L + t0;
      gate_tile<T>(k, hb, g.L, cb, n, z.data(), nt);
      gemm_tn<T>(k.G, n, k.S, T(1), ws, k.G, gs, g.L, T(0), dz.data(), nt);
      gemm_tn<T>(k.G, n, k.R, T(1), wr, k.G, gr, g.L, T(1), dz.data(), nt);
      gemm<T>(k.S, k.G, n, T(1), gs, g.L, z.data(), nt, true, T(1), a_ws, k.G);
      gemm<T>(k.R, k.G, n, T(1), gr, g.L, z.data(), nt, true, T(1), a_wr, k.G);
      auto rowsum = [&](const T* r) {
        Vec<T> s(T(0));
        for_each_vec<T>(n, [&](int64_t j, int64_t c) { s = s + load(r + j, c); });
        return reduce_sum<T>(s);
      };
      for (int64_t r = 0; r < k.S; ++r) a_sb[r] += rowsum(gs + r * g.L);
      for (int64_t r = 0; r < k.R; ++r) a_rb[r] += rowsum(gr + r * g.L);
      // d tanh(a) = 1 − tanh², d σ(b) = σ(1 − σ)
      T* dhb = dh + b * 2 * k.G * g.L + t0;
      const Vec<T> one(T(1));
      for (int64_t r = 0; r < k.G; ++r) {
        const T* ha = hb + r * g.L;
        const T* hg = hb + (k.G + r) * g.L;
        const Vec<T> ba(cb ? cb[r] : T(0)), bg(cb ? cb[k.G + r] : T(0));
        const T* dzr = dz.data() + r * nt;
        T* da = dhb + r * g.L;
        T* dg = dhb + (k.G + r) * g.L;
        for_each_vec<T>(n, [&](int64_t j, int64_t c) {
          Vec<T> ta = tanh(load(ha + j, c) + ba);
          Vec<T> sg = sigmoid(load(hg + j, c) + bg);
          Vec<T> d = load(dzr + j, c);
          store(d * sg * (one - ta * ta), da + j, c);
          store(d * ta * sg * (one - sg), dg + j, c);
        });
      }
    }
  });
  at::Tensor s = acc.sum();
  const T* sp = s.data_ptr<T>();
  std::copy(sp, sp + k.S * k.G, dws);
  if (dsb) std::copy(sp + k.S * k.G, sp + k.S * k.G + k.S, dsb);
  std::copy(sp + k.S * k.G + k.S, sp + k.S * k.G + k.S + k.R * k.G, dwr);
  if (drb) std::copy(sp + k.S * k.G + k.S + k.R * k.G, sp + k.S * k.G + k.S + k.R * k.G + k.R, drb);
  dense_backward<T, T>(g, dh, x, init, w, dx, true, dinit, dw, dcb);
}

std::vector<at::Tensor> wavenet_forward(const at::Tensor& x_in, const at::Tensor& conv_w,
                                        const c10::optional<at::Tensor>& conv_b,
                                        const at::Tensor& skip_w,
                                        const c10::optional<at::Tensor>& skip_b,
                                        const at::Tensor& res_w,
                                        const c10::optional<at::Tensor>& res_b,
                                        const c10::optional<at::Tensor>& init_in,
                                        int64_t dilation, bool save) {
  const Block k = make_block(x_in, conv_w, skip_w, res_w, dilation);
  const auto st = x_in.scalar_type();
  const auto ct = compute_type(x_in.scalar_type(), "seqkern conv");
  at::Tensor x = contiguous_as(x_in, ct);
  at::Tensor w = contiguous_as(conv_w, ct);
  at::Tensor cb = contiguous_as(opt(conv_b), ct), sb = contiguous_as(opt(skip_b), ct),
             rb = contiguous_as(opt(res_b), ct), init = contiguous_as(opt(init_in), ct);
  at::Tensor ws = contiguous_as(skip_w, ct), wr = contiguous_as(res_w, ct);
  if (init.defined())
    TORCH_CHECK(init.sizes() == at::IntArrayRef({k.g.B, k.R, k.g.P}),
                "seqkern wavenet: initial_state must be (B, R, (K-1)*dilation)");
  at::Tensor res = empty_large({k.g.B, k.R, k.g.L}, x.options());
  at::Tensor skip = empty_large({k.g.B, k.S, k.g.L}, x.options());
  at::Tensor h = save ? empty_large({k.g.B, 2 * k.G, k.g.L}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_wavenet_forward", [&] {
    if (k.g.L == 0) return;
    wavenet_forward_impl<scalar_t>(
        k, x.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(init), w.data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(cb), ws.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(sb),
        wr.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(rb), res.data_ptr<scalar_t>(),
        skip.data_ptr<scalar_t>(), save ? h.data_ptr<scalar_t>() : nullptr);
  });
  return {contiguous_as(res, st), contiguous_as(skip, st), h};
}

// Returns {dx, dconv_w, dconv_b, dskip_w, dskip_b, dres_w, dres_b, dinit}; bias gradients are
// empty when the bias is absent, dinit when there is no initial state.
std::vector<at::Tensor> wavenet_backward(
    const at::Tensor& grad_res, const at::Tensor& grad_skip, const at::Tensor& x_in,
    const at::Tensor& conv_w, const c10::optional<at::Tensor>& conv_b, const at::Tensor& skip_w,
    const at::Tensor& res_w, const c10::optional<at::Tensor>& init_in, const at::Tensor& h_in,
    int64_t dilation, bool has_skip_bias, bool has_res_bias) {
  const Block k = make_block(x_in, conv_w, skip_w, res_w, dilation);
  const Geom& g = k.g;
  const auto st = x_in.scalar_type();
  const auto ct = compute_type(x_in.scalar_type(), "seqkern conv");
  at::Tensor x = contiguous_as(x_in, ct);
  at::Tensor w = contiguous_as(conv_w, ct);
  const bool init_given = opt(init_in).defined();
  at::Tensor cb = contiguous_as(opt(conv_b), ct);
  const at::Tensor init = contiguous_as(opt(init_in), ct);
  at::Tensor ws = contiguous_as(skip_w, ct), wr = contiguous_as(res_w, ct);
  at::Tensor h = contiguous_as(h_in, ct);
  TORCH_CHECK(h.sizes() == at::IntArrayRef({g.B, 2 * k.G, g.L}),
              "seqkern wavenet: backward needs the saved conv output h");
  at::Tensor gres = contiguous_as(grad_res, ct), gskip = contiguous_as(grad_skip, ct);
  auto o = x.options();
  at::Tensor dx = empty_large(gres.sizes(), o);
  dx.copy_(gres);
  at::Tensor dh = empty_large({g.B, 2 * k.G, g.L}, o);
  at::Tensor dcw = g.L == 0 ? at::zeros_like(w) : at::empty_like(w);
  at::Tensor dcb = cb.defined() ? at::zeros({2 * k.G}, o) : at::empty({0}, o);
  at::Tensor dws = at::zeros({k.S, k.G}, o), dwr = at::zeros({k.R, k.G}, o);
  at::Tensor dsb = has_skip_bias ? at::zeros({k.S}, o) : at::empty({0}, o);
  at::Tensor drb = has_res_bias ? at::zeros({k.R}, o) : at::empty({0}, o);
  at::Tensor dinit = init_given ? at::zeros_like(init) : at::empty({0}, o);
  AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_wavenet_backward", [&] {
    if (g.L == 0) return;
    auto p = [](at::Tensor& t, bool on) { return on && t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    wavenet_backward_impl<scalar_t>(
        k, gres.data_ptr<scalar_t>(), gskip.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(init), w.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(cb),
        ws.data_ptr<scalar_t>(), wr.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
        dh.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), p(dinit, true),
        dcw.data_ptr<scalar_t>(), p(dcb, true), dws.data_ptr<scalar_t>(), p(dsb, true),
        dwr.data_ptr<scalar_t>(), p(drb, true));
  });
  return {contiguous_as(dx, st), contiguous_as(dcw, st), contiguous_as(dcb, st),
          contiguous_as(dws, st), contiguous_as(dsb, st), contiguous_as(dwr, st),
          contiguous_as(drb, st), contiguous_as(dinit, st)};
}

// ------------------------------------------------------------- WaveNet generation -------

// One time step through a whole stack of WaveNet blocks (inference). Per layer: gather the K
// taps from the queue (columns k·d of [state | x_t]), three small GEMMs and the gate; the new
// queue is the old one shifted by one column. Doing the whole stack in one call keeps a sample
// at O(layers) small GEMMs with no per-layer dispatch. Returns {Σ skip (B, S), x after the last
// block (B, R), new queue of every layer...}.
// C[B×N] (+)= A[B×K] · W[N×K]ᵀ for the few rows of one generation step, as plain dot products
// on this thread. At one sample per call a layer is ~20 µs of weight streaming; handing such
// a GEMV to the threaded BLAS made every call a fork/join, and on a machine whose cores are
// shared each join waited for a descheduled thread (measured: 0.5 s per sample instead of 1 ms).
template <typename T>
void gemm_rows(int64_t B, int64_t N, int64_t K, const T* A, const T* W, T beta, T* C) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      const T v = dot<T>(W + n * K, A + b * K, K);
      C[b * N + n] = beta == T(0) ? v : C[b * N + n] + v;
    }
}

std::vector<at::Tensor> wavenet_stack_step(
    const at::Tensor& x_in, const std::vector<at::Tensor>& states,
    const std::vector<at::Tensor>& conv_w, const std::vector<c10::optional<at::Tensor>>& conv_b,
    const std::vector<at::Tensor>& skip_w, const std::vector<c10::optional<at::Tensor>>& skip_b,
    const std::vector<at::Tensor>& res_w, const std::vector<c10::optional<at::Tensor>>& res_b,
    const std::vector<int64_t>& dilations) {
  const size_t n = states.size();
  TORCH_CHECK(conv_w.size() == n && conv_b.size() == n && skip_w.size() == n &&
                  skip_b.size() == n && res_w.size() == n && res_b.size() == n &&
                  dilations.size() == n && n > 0,
              "seqkern wavenet step: one state, weight set and dilation per layer");
  TORCH_CHECK(x_in.dim() == 2, "seqkern wavenet step: x_t must be (B, R)");
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK(dilations[i] >= 1, "seqkern wavenet step: dilations[", i, "] must be >= 1, got ",
                dilations[i]);
  const auto st = x_in.scalar_type();
  const auto ct = compute_type(x_in.scalar_type(), "seqkern conv");
  const int64_t B = x_in.size(0), R = x_in.size(1);
  for (size_t l = 0; l < n; ++l)
    TORCH_CHECK_VALUE(conv_w[l].dim() == 3 && skip_w[l].dim() >= 2 && skip_w[l].dim() <= 3 &&
                          res_w[l].dim() >= 2 && res_w[l].dim() <= 3,
                      "seqkern wavenet step: layer ", l, " has conv weight ", conv_w[l].sizes(),
                      ", skip weight ", skip_w[l].sizes(), " and res weight ", res_w[l].sizes(),
                      "; expected (2G, R, K), (S, G[, 1]) and (R, G[, 1])");
  const int64_t S = skip_w[0].size(0);
  auto o = x_in.options().dtype(ct);
  at::Tensor x = x_in.to(ct, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor skip_sum = at::zeros({B, S}, o);
  std::vector<at::Tensor> out{skip_sum, x};
  AT_DISPATCH_FLOATING_TYPES(ct, "seqkern_wavenet_stack_step", [&] {
    using T = scalar_t;
    std::vector<T> taps, h, z;
    for (size_t l = 0; l < n; ++l) {
      for (const auto& [t, what] :
           {std::pair<const at::Tensor*, const char*>{&conv_w[l], "conv weight"},
            {&skip_w[l], "skip weight"}, {&res_w[l], "res weight"}, {&states[l], "state"},
            {conv_b[l] ? &*conv_b[l] : nullptr, "conv bias"},
            {skip_b[l] ? &*skip_b[l] : nullptr, "skip bias"},
            {res_b[l] ? &*res_b[l] : nullptr, "res bias"}})
        TORCH_CHECK(!t || !t->defined() || (t->scalar_type() == st && t->device() == x_in.device()),
                    "seqkern wavenet step: ", what, " of layer ", l, " is ", t->scalar_type(),
                    " on ", t->device(), ", expected x_t's ", st, " on ", x_in.device());
      at::Tensor w = contiguous_as(conv_w[l], ct), ws = contiguous_as(skip_w[l], ct),
                 wr = contiguous_as(res_w[l], ct), q = contiguous_as(states[l], ct);
      at::Tensor cb = contiguous_as(opt(conv_b[l]), ct), sb = contiguous_as(opt(skip_b[l]), ct),
                 rb = contiguous_as(opt(res_b[l]), ct);
      const int64_t G2 = w.size(0), G = G2 / 2, K = w.size(2), d = dilations[l];
      TORCH_CHECK_VALUE(lookback_fits(K, d), "seqkern wavenet step: (K - 1) * ",
                        "dilation of layer ", l, " exceeds ", kMaxLookback);
      const int64_t P = (K - 1) * d;
      TORCH_CHECK(w.size(1) == R, "seqkern wavenet step: conv weight of layer ", l, " is ",
                  w.sizes(), ", expected (2G, ", R, ", K)");
      TORCH_CHECK(q.sizes() == at::IntArrayRef({B, R, P}), "seqkern wavenet step: state of layer ",
                  l, " is ", q.sizes(), ", expected (", B, ", ", R, ", ", P, ")");
      // 1×1 weights may come as (out, G) or nn.Conv1d's (out, G, 1)
      TORCH_CHECK(ws.size(0) == S && ws.size(1) == G && (ws.dim() == 2 || ws.size(2) == 1) &&
                      wr.size(0) == R && wr.size(1) == G && (wr.dim() == 2 || wr.size(2) == 1),
                  "seqkern wavenet step: skip/res weights of layer ", l, " are ", ws.sizes(),
                  " and ", wr.sizes(), ", expected (", S, ", ", G, "[, 1]) and (", R, ", ", G,
                  "[, 1])");
      TORCH_CHECK(G2 % 2 == 0, "seqkern wavenet step: conv weight of layer ", l, " has ", G2,
                  " output channels, expected an even number (filter and gate halves)");
      for (const auto& [bias, want, what] :
           {std::tuple<const at::Tensor&, int64_t, const char*>{cb, G2, "conv"},
            {sb, S, "skip"}, {rb, R, "res"}})
        TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == want),
                    "seqkern wavenet step: ", what, " bias of layer ", l, " is ", bias.sizes(),
                    ", expected (", want, ")");
      const T* qp = q.data_ptr<T>();
      T* xp = x.data_ptr<T>();
      taps.resize(B * R * K);
      h.resize(B * G2);
      z.resize(B * G);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < R; ++r) {
          const T* row = qp + (b * R + r) * P;
          for (int64_t k = 0; k < K; ++k)
            taps[(b * R + r) * K + k] = k == K - 1 ? xp[b * R + r] : row[k * d];
        }
      // h = taps · W ᵀ, W viewed as (2G, R·K)
      gemm_rows<T>(B, G2, R * K, taps.data(), w.data_ptr<T>(), T(0), h.data());
      const T* cbp = ptr_or_null<T>(cb);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < G; ++g) {
          const T a = h[b * G2 + g] + (cbp ? cbp[g] : T(0));
          const T s = h[b * G2 + G + g] + (cbp ? cbp[G + g] : T(0));
          z[b * G + g] = std::tanh(a) / (T(1) + std::exp(-s));
        }
      // new queue: drop the oldest column, append x_t
      at::Tensor nq = at::empty({B, R, P}, o);
      if (P > 0) {
        T* np = nq.data_ptr<T>();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t r = 0; r < R; ++r) {
            const T* src = qp + (b * R + r) * P;
            T* dst = np + (b * R + r) * P;
            std::copy(src + 1, src + P, dst);
            dst[P - 1] = xp[b * R + r];
          }
      }
      out.push_back(nq);
      T* sp = skip_sum.data_ptr<T>();
      gemm_rows<T>(B, S, G, z.data(), ws.data_ptr<T>(), T(1), sp);
      if (const T* sbp = ptr_or_null<T>(sb))
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i < S; ++i) sp[b * S + i] += sbp[i];
      // x ← x + z · W_resᵀ + b_res (the queue above already took the old x)
      gemm_rows<T>(B, R, G, z.data(), wr.data_ptr<T>(), T(1), xp);
      if (const T* rbp = ptr_or_null<T>(rb))
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i < R; ++i) xp[b * R + i] += rbp[i];
    }
  });
  if (st != ct)
    for (auto& t : out) t = contiguous_as(t, st);
  return out;
}

}  // namespace
}  // namespace seqkern::cpu

namespace seqkern {
void register_conv(pybind11::module_& m) {
  using namespace pybind11::literals;
  m.def("conv_forward", &cpu::conv_forward, kReleaseGil, "x"_a, "weight"_a, "bias"_a,
        "initial_state"_a, "dilation"_a, "groups"_a, "activation"_a, "save_preact"_a,
        "Causal dilated conv1d; returns (y, pre-activation or empty)");
  m.def("conv_backward", &cpu::conv_backward, kReleaseGil, "grad_y"_a, "x"_a, "weight"_a,
        "initial_state"_a, "y"_a, "preact"_a, "dilation"_a, "groups"_a, "activation"_a,
        "has_bias"_a, "Returns (dx, dweight, dbias, dinitial_state)");
  m.def("wavenet_forward", &cpu::wavenet_forward, kReleaseGil, "x"_a, "conv_weight"_a,
        "conv_bias"_a, "skip_weight"_a, "skip_bias"_a, "res_weight"_a, "res_bias"_a,
        "initial_state"_a, "dilation"_a, "save"_a,
        "WaveNet gated residual block; returns (res, skip, h or empty)");
  m.def("wavenet_stack_step", &cpu::wavenet_stack_step, kReleaseGil, "x_t"_a, "states"_a,
        "conv_weights"_a, "conv_biases"_a, "skip_weights"_a, "skip_biases"_a, "res_weights"_a,
        "res_biases"_a, "dilations"_a,
        "One generation step through a WaveNet stack; returns [skip sum, x, new states...]");
  m.def("wavenet_backward", &cpu::wavenet_backward, kReleaseGil, "grad_res"_a, "grad_skip"_a,
        "x"_a, "conv_weight"_a, "conv_bias"_a, "skip_weight"_a, "res_weight"_a,
        "initial_state"_a, "h"_a, "dilation"_a, "has_skip_bias"_a, "has_res_bias"_a,
        "Returns (dx, dconv_w, dconv_b, dskip_w, dskip_b, dres_w, dres_b, dinitial_state)");
}
}  // namespace seqkern
