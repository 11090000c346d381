#include "cpu/gemm.h"
#include "cpu/transpose.h"
#include "cpu/large_alloc.h"
#include "cpu/vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <dlfcn.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace seqkern::cpu {
namespace {

using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const double*, const double*, const int*, const double*, const int*,
                         const double*, double*, const int*);

// MKL's CBLAS enums and packed-GEMM entry points (LP64 interface: MKL_INT = int).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
using spack_size_t = size_t (*)(int, int, int, int);
using spack_t = void (*)(int, int, int, int, int, int, float, const float*, int, float*);
using scompute_t = void (*)(int, int, int, int, int, int, const float*, int, const float*, int,
                            float, float*, int);

using gemm_bf16_t = void (*)(int, int, int, int, int, int, float, const uint16_t*, int,
                            const uint16_t*, int, float, float*, int);

struct Blas {
  gemm_bf16_t gemm_bf16 = nullptr;
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  spack_size_t spack_size = nullptr;
  spack_t spack = nullptr;
  scompute_t scompute = nullptr;
  Blas() {
    gemm_bf16 = reinterpret_cast<gemm_bf16_t>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
    spack_size = reinterpret_cast<spack_size_t>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack_get_size"));
    spack = reinterpret_cast<spack_t>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack"));
    scompute = reinterpret_cast<scompute_t>(dlsym(RTLD_DEFAULT, "cblas_sgemm_compute"));
    if (!spack_size || !spack || !scompute) spack_size = nullptr, spack = nullptr, scompute = nullptr;
    // Force libtorch_cpu's symbols to be resolved first (it is already loaded by `import torch`).
    sgemm = reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "sgemm_"));
    dgemm = reinterpret_cast<dgemm_t>(dlsym(RTLD_DEFAULT, "dgemm_"));
    if (!sgemm || !dgemm) sgemm = nullptr, dgemm = nullptr;
  }
};

const Blas& blas() {
  static Blas b;
  return b;
}

bool fits_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

template <typename T>
at::Tensor view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Column-major BLAS call computing row-major C = alpha·op(A)·op(B) + beta·C, by computing
// Cᵀ = op(B)ᵀ·op(A)ᵀ in column-major order.
template <typename T, typename Fn>
void call_blas(Fn fn, bool a_trans, bool b_trans, int64_t M, int64_t N, int64_t K, T alpha,
               const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const char ta = b_trans ? 'T' : 'N';
  const char tb = a_trans ? 'T' : 'N';
  int m = (int)N, n = (int)M, k = (int)K, ilda = (int)ldb, ildb = (int)lda, ildc = (int)ldc;
  fn(&ta, &tb, &m, &n, &k, &alpha, B, &ilda, A, &ildb, &beta, C, &ildc);
}

template <typename T>
void aten_gemm(bool a_trans, bool b_trans, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
               int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  at::Tensor a = a_trans ? view(A, K, M, lda).t() : view(A, M, K, lda);
  at::Tensor b = b_trans ? view(B, N, K, ldb).t() : view(B, K, N, ldb);
  at::Tensor c = view(C, M, N, ldc);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
    if (alpha != T(1)) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

template <typename T>
void dispatch(bool a_trans, bool b_trans, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
              int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const bool small = fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) &&
                     fits_int(ldb) && fits_int(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (small && blas().sgemm) {
      return call_blas<T>(blas().sgemm, a_trans, b_trans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (small && blas().dgemm) {
      return call_blas<T>(blas().dgemm, a_trans, b_trans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
  }
  aten_gemm<T>(a_trans, b_trans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, bool b_trans, T beta, T* C, int64_t ldc) {
  dispatch<T>(false, b_trans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <typename T>
void gemm_tn(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc) {
  dispatch<T>(true, false, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

namespace {

// Rows [r0, r0 + R) of C = A·Wᵀ (fewer at the end), M rows of A: R·M accumulators, reduced once.
// The k loop runs whole vectors only and the tail once after it: with the masked tail load
// inside the loop GCC kept the accumulators on the stack, and the store-to-load round trip of
// each one per vector bounded the loop (53 µs for an LSTMCell step at B = 1, H = 256).
// bf16 operands are widened as they are read (exact products, fp32 sums).
template <typename T, typename Wt, int M, int R>
void row_block_product(const RowProduct<T, Wt>& p, int64_t r0) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t Wd = V::size();
  const int64_t nr = std::min<int64_t>(R, p.N - r0);
  V acc[R][M];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[i][m] = V(T(0));
  const Wt* w[R];
  for (int i = 0; i < R; ++i) w[i] = p.W + (r0 + std::min<int64_t>(i, nr - 1)) * p.K;
  auto ld = [](const Wt* q, int64_t n) __attribute__((always_inline)) {
    if constexpr (std::is_same_v<T, Wt>) return n == Wd ? V::loadu(q) : V::loadu(q, n);
    else return load_widened(q, n);
  };
  auto step = [&](int64_t k, int64_t n) __attribute__((always_inline)) {
    V a[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) a[m] = in_register(ld(p.A + m * p.lda + k, n));
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      V wv = ld(w[i] + k, n);
      if constexpr (M > 1) wv = in_register(wv);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[i][m] = at::vec::fmadd(wv, a[m], acc[i][m]);
    }
  };
  int64_t k = 0;
  for (; k + Wd <= p.K; k += Wd) step(k, Wd);
  if (k < p.K) step(k, p.K - k);
  for (int i = 0; i < nr; ++i)
    for (int m = 0; m < M; ++m)
      p.C[m * p.ldc + r0 + i] = reduce_sum<T>(acc[i][m]);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// The bf16 rows on vdpbf16ps: 32 products per instruction, no widening. Widened, a 4-row bf16
// LSTM step at H = 512 ran at half of torch's speed (its oneDNN kernel multiplies bf16 pairs).
template <int M, int R>
void row_block_product(const RowProduct<float, at::BFloat16>& p, int64_t r0) {
  const int64_t nr = std::min<int64_t>(R, p.N - r0);
  __m512 acc[R][M];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[i][m] = _mm512_setzero_ps();
  const at::BFloat16* w[R];
  for (int i = 0; i < R; ++i) w[i] = p.W + (r0 + std::min<int64_t>(i, nr - 1)) * p.K;
  auto step = [&](int64_t k, __mmask32 mask) __attribute__((always_inline)) {
    auto ld = [&](const at::BFloat16* q) __attribute__((always_inline)) {
      return (__m512bh)(mask == __mmask32(~0u) ? _mm512_loadu_si512(q + k)
                                                : _mm512_maskz_loadu_epi16(mask, q + k));
    };
    __m512bh a[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) a[m] = ld(p.A + m * p.lda);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512bh wv = ld(w[i]);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[i][m] = _mm512_dpbf16_ps(acc[i][m], wv, a[m]);
    }
  };
  int64_t k = 0;
  for (; k + 32 <= p.K; k += 32) step(k, __mmask32(~0u));
  if (k < p.K) step(k, __mmask32((1ull << (p.K - k)) - 1));
  for (int i = 0; i < nr; ++i)
    for (int m = 0; m < M; ++m) p.C[m * p.ldc + r0 + i] = _mm512_reduce_add_ps(acc[i][m]);
}
#endif

// Rows [r0, r0 + kRowBlock) of C = A·Wᵀ in blocks of R rows: R·M accumulators stay within the
// vector registers.
constexpr int64_t kRowBlock = 16;
template <typename T, typename Wt, int M, int R>
void row_blocks(const RowProduct<T, Wt>& p, int64_t r0) {
  const int64_t end = std::min(p.N, r0 + kRowBlock);
  for (int64_t r = r0; r < end; r += R) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    if constexpr (std::is_same_v<Wt, at::BFloat16>) {
      row_block_product<M, R>(p, r);
      continue;
    }
#endif
    row_block_product<T, Wt, M, R>(p, r);
  }
}

template <typename T, typename Wt>
void row_block(const RowProduct<T, Wt>& p, int64_t r0) {
  switch (p.M) {
    case 0: return;
    case 1: return row_blocks<T, Wt, 1, 8>(p, r0);
    case 2: return row_blocks<T, Wt, 2, 8>(p, r0);
    case 3: return row_blocks<T, Wt, 3, 4>(p, r0);
    case 4: return row_blocks<T, Wt, 4, 4>(p, r0);
  }
  // more rows: 4 at a time against the same block of weight rows, which stays in cache
  for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
    RowProduct<T, Wt> q = p;
    q.M = std::min<int64_t>(4, p.M - m0), q.A = p.A + m0 * p.lda, q.C = p.C + m0 * p.ldc;
    row_block(q, r0);
  }
}

}  // namespace

template <typename T, typename Wt>
void few_row_products(const RowProduct<T, Wt>& p, const RowProduct<T, Wt>& q) {
  TORCH_CHECK(p.M <= kBlockedRows && q.M <= kBlockedRows, "few_row_products: at most ", kBlockedRows, " rows");
  const int64_t np = p.M > 0 ? (p.N + kRowBlock - 1) / kRowBlock : 0,
                nq = q.M > 0 ? (q.N + kRowBlock - 1) / kRowBlock : 0;
  // Blocks of kRowBlock weight rows, p's then q's; threads below ~32K multiply-adds cost more
  // than they save.
  const int64_t grain = std::max<int64_t>(1, 32768 / (kRowBlock * std::max<int64_t>({p.K, q.K, 1})));
  at::parallel_for(0, np + nq, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      if (blk < np) row_block(p, blk * kRowBlock);
      else row_block(q, (blk - np) * kRowBlock);
    }
  });
}

template <typename T, typename Wt>
void few_row_product(const RowProduct<T, Wt>& p) {
  for (int64_t r0 = 0; r0 < p.N; r0 += kRowBlock) row_block(p, r0);
}

template void few_row_product<float>(const RowProduct<float>&);
template void few_row_product<float, at::BFloat16>(const RowProduct<float, at::BFloat16>&);
template void few_row_product<double>(const RowProduct<double>&);
template void few_row_products<float>(const RowProduct<float>&, const RowProduct<float>&);
template void few_row_products<float, at::BFloat16>(const RowProduct<float, at::BFloat16>&,
                                                    const RowProduct<float, at::BFloat16>&);
template void few_row_products<double>(const RowProduct<double>&, const RowProduct<double>&);

template void gemm<float>(int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                          int64_t, bool, float, float*, int64_t);
template void gemm<double>(int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, bool, double, double*, int64_t);
template void gemm_tn<float>(int64_t, int64_t, int64_t, float, const float*, int64_t,
                             const float*, int64_t, float, float*, int64_t);
template void gemm_tn<double>(int64_t, int64_t, int64_t, double, const double*, int64_t,
                              const double*, int64_t, double, double*, int64_t);

template <typename T>
PackedWeight<T>::PackedWeight(const T* W, int64_t ldw, bool w_trans, int64_t N, int64_t K,
                              int64_t max_m)
    : W_(W), ldw_(ldw), N_(N), K_(K), w_trans_(w_trans) {
  if constexpr (std::is_same_v<T, float>) {
    const auto& b = blas();
    // Packing pays off only when the weight serves several products of several rows: for
    // single rows the packed product was no faster over 50–100 steps (Cho GRU, B = 1, H = 512,
    // T = 50: 2.73 ms packed, 2.14 not), and packing a 4 MB weight takes about 1.2 ms.
    if (b.spack && max_m > 1 && fits_int(N) && fits_int(K) && fits_int(max_m) && fits_int(ldw) && N > 0 &&
        K > 0) {
      size_t bytes = b.spack_size(kBMatrix, (int)max_m, (int)N, (int)K);
      packed_ = static_cast<float*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
      b.spack(kRowMajor, kBMatrix, w_trans ? kTrans : kNoTrans, (int)max_m, (int)N, (int)K, 1.0f,
              W, (int)ldw, packed_);
    }
  }
}

template <typename T>
PackedWeight<T>::~PackedWeight() {
  std::free(packed_);
}

template <typename T>
void PackedWeight<T>::multiply(int64_t M, const T* A, int64_t lda, T beta, T* C,
                               int64_t ldc) const {
  if (M == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (packed_) {
      blas().scompute(kRowMajor, kNoTrans, kPacked, (int)M, (int)N_, (int)K_, A, (int)lda,
                      packed_, (int)ldw_, beta, C, (int)ldc);
      return;
    }
  }
  dispatch<T>(false, w_trans_, M, N_, K_, T(1), A, lda, W_, ldw_, beta, C, ldc);
}

template class PackedWeight<float>;
template class PackedWeight<double>;

namespace {
bool onednn_bf16_brgemm() {
  static const bool can_pack = at::native::cpublas::could_pack(at::kBFloat16);
  return can_pack;
}

// Whether ATen's brgemm serves now: torch.backends.mkldnn can turn oneDNN off at run time, and
// ATen's brgemm then throws.
bool aten_bf16_brgemm() {
  return onednn_bf16_brgemm() && at::globalContext().userEnabledMkldnn();
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool kDpbf16 = true;

// C[MR × NV·16] (+)= A · B over K, the last of the NV vectors masked to `tail` columns. Each
// k pair is one 32-bit word of an A row (broadcast) and one VNNI row of B; MR·NV accumulators
// (24 at NV = 4) hide vdpbf16ps's latency.
template <int MR, int NV>
void dpbf16_tile(int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                 float* C, int64_t ldc, bool add_C, __mmask16 tail) {
  // The sum over this call's K starts from zero and C is added at the end: a long product in
  // K blocks (dpbf16_gemm) then rounds as a sum of block sums, not as one chain over all of K
  // (measured at K = 4097: 7-8x torch's fp32 matmul error as one chain).
  __m512 c[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) c[m][j] = _mm512_setzero_ps();
  auto step = [&](const uint16_t* b, auto a_word) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      bv[j] = (__m512bh)(j == NV - 1 ? _mm512_maskz_loadu_epi32(tail, b + 32 * j)
                                     : _mm512_loadu_si512(b + 32 * j));
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(a_word(m));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) c[m][j] = _mm512_dpbf16_ps(c[m][j], a, bv[j]);
    }
  };
  const int64_t K2 = K / 2;
  for (int64_t kk = 0; kk < K2; ++kk)
    step(B + kk * 2 * ldb, [&](int m) {
      int32_t w;
      std::memcpy(&w, A + m * lda + 2 * kk, 4);
      return w;
    });
  // odd K: the last element pairs with a zero (B's row after it is zero, A's may be anything)
  if (K % 2) step(B + K2 * 2 * ldb, [&](int m) { return int32_t(A[m * lda + K - 1]); });
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const __mmask16 mk = j == NV - 1 ? tail : __mmask16(0xffff);
      float* cp = C + m * ldc + 16 * j;
      _mm512_mask_storeu_ps(cp, mk, add_C ? _mm512_add_ps(_mm512_maskz_loadu_ps(mk, cp), c[m][j]) : c[m][j]);
    }
}

// Rows per tile for NV vectors: MR·NV accumulators + NV B vectors + 1 broadcast ≤ 32 registers.
constexpr int dp_rows(int nv) { return nv >= 4 ? 6 : nv == 3 ? 8 : 12; }

template <int NV, int MR>
void dpbf16_rows(int mr, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                 int64_t ldb, float* C, int64_t ldc, bool add_C, __mmask16 tail) {
  if constexpr (MR >= 1) {
    if (mr == MR) return dpbf16_tile<MR, NV>(K, A, lda, B, ldb, C, ldc, add_C, tail);
    dpbf16_rows<NV, MR - 1>(mr, K, A, lda, B, ldb, C, ldc, add_C, tail);
  }
}

template <int NV>
void dpbf16_columns(int64_t M, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                    int64_t ldb, float* C, int64_t ldc, bool add_C, __mmask16 tail) {
  constexpr int MR = dp_rows(NV);
  // near-equal row blocks (8 rows at MR = 6 as 4 + 4: a 2-row tile streams B for few products)
  const int64_t nb = (M + MR - 1) / MR;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t m0 = M * b / nb, m1 = M * (b + 1) / nb;
    dpbf16_rows<NV, MR>(static_cast<int>(m1 - m0), K, A + m0 * lda, lda, B, ldb, C + m0 * ldc,
                        ldc, add_C, tail);
  }
}

void dpbf16_product(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                    bool add_C, const uint16_t* A, const uint16_t* B, float* C) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t n = std::min<int64_t>(64, N - n0);
    const int nv = static_cast<int>((n + 15) / 16);
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - 16 * (nv - 1))) - 1);
    const uint16_t* b = B + 2 * n0;  // column n0 of every VNNI row
    float* c = C + n0;
    switch (nv) {
      case 4: dpbf16_columns<4>(M, K, A, lda, b, ldb, c, ldc, add_C, tail); break;
      case 3: dpbf16_columns<3>(M, K, A, lda, b, ldb, c, ldc, add_C, tail); break;
      case 2: dpbf16_columns<2>(M, K, A, lda, b, ldb, c, ldc, add_C, tail); break;
      default: dpbf16_columns<1>(M, K, A, lda, b, ldb, c, ldc, add_C, tail); break;
    }
  }
}

// Large bf16 GEMMs (a recurrence's input projection and weight gradients) on the same tiles:
// MKL's bf16 GEMM has no AVX512_BF16 kernel on AMD (measured on a Zen 5: ~170 GFLOP/s, its
// fp32 speed; oneDNN's, which torch.mm calls but which has no fp32-output entry point, ~400).
// B is packed once into VNNI panels of 64 columns; each task takes 96 rows × 256 columns and
// walks K in blocks of 256, so its A block stays in L1/L2 across its four panels. With a_trans
// (A stored K × M) each A block is transposed into the task's buffer as it is reached.
constexpr int64_t kGemmPanel = 64, kGemmRows = 96, kGemmCols = 256, kGemmDepth = 256;

void dpbf16_gemm(bool a_trans, bool b_trans, int64_t M, int64_t N, int64_t K,
                 const at::BFloat16* A, int64_t lda, const at::BFloat16* B, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate) {
  constexpr int64_t NB = kGemmPanel;
  const int64_t Kp = (K + 1) / 2 * 2, n_panels = (N + NB - 1) / NB;
  // (block-cache memory: a fresh vector of a cell's 2 MB weight zeroed and faulted its pages in
  // on every call, 2/3 of an 8-row bf16 LSTMCell step at H = 512; packing writes every entry)
  const at::Tensor Bp_mem = empty_large({n_panels * Kp * NB}, at::TensorOptions().dtype(at::kBFloat16));
  at::BFloat16* const Bp = Bp_mem.data_ptr<at::BFloat16>();
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    LineVector<at::BFloat16> tmp(b_trans && K % 2 ? Kp * NB : 0);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = std::min(NB, N - p * NB);
      at::BFloat16* out = Bp + p * Kp * NB;
      if (!b_trans) {
        pack_vnni(B + p * NB, ldb, K, n, Kp, NB, out);
      } else if (K % 2 == 0) {
        pack_vnni_transposed(B + p * NB * ldb, ldb, n, K, NB, out);
      } else {  // op(B) = Bᵀ row-major into tmp first, then paired
        std::fill(tmp.begin(), tmp.end(), at::BFloat16(0.0f));
        transpose<at::BFloat16>(B + p * NB * ldb, ldb, tmp.data(), NB, n, K);
        pack_vnni(tmp.data(), NB, K, NB, Kp, NB, out);
      }
    }
  });
  const int64_t m_blocks = (M + kGemmRows - 1) / kGemmRows;
  const int64_t n_groups = (N + kGemmCols - 1) / kGemmCols;
  at::parallel_for(0, m_blocks * n_groups, 1, [&](int64_t t0, int64_t t1) {
    LineVector<at::BFloat16> At(a_trans ? kGemmRows * kGemmDepth : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t % m_blocks) * kGemmRows, n0 = (t / m_blocks) * kGemmCols;
      const int64_t mr = std::min(kGemmRows, M - m0), nc = std::min(kGemmCols, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kGemmDepth) {
        const int64_t kb = std::min(kGemmDepth, K - k0);
        const uint16_t* a;
        int64_t la;
        if (a_trans) {
          transpose<at::BFloat16>(A + k0 * lda + m0, lda, At.data(), kGemmDepth, kb, mr);
          a = reinterpret_cast<const uint16_t*>(At.data()), la = kGemmDepth;
        } else {
          a = reinterpret_cast<const uint16_t*>(A + m0 * lda + k0), la = lda;
        }
        for (int64_t c = 0; c < nc; c += NB) {
          const int64_t p = (n0 + c) / NB;
          dpbf16_product(mr, std::min(NB, nc - c), kb, la, NB, ldc, accumulate || k0 > 0, a,
                         reinterpret_cast<const uint16_t*>(Bp + p * Kp * NB + k0 * NB),
                         C + m0 * ldc + n0 + c);
        }
      }
    }
  });
}
#else
constexpr bool kDpbf16 = false;
void dpbf16_gemm(bool, bool, int64_t, int64_t, int64_t, const at::BFloat16*, int64_t,
                 const at::BFloat16*, int64_t, float*, int64_t, bool) {}
#endif

// MKL's bf16 GEMM is the one to use where it has AMX (or where this build has no dpbf16 path).
bool dpbf16_gemm_preferred() { return kDpbf16 && !onednn_bf16_brgemm(); }
}  // namespace

namespace {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
constexpr bool kAmxBuilt = true;
// ---- seqkern's own AMX tiles, for products of whole tiles ----
// oneDNN's brgemm (through ATen) reached 0.65-1.3 TFLOP/s on the recurrent panel products
// (64 x 64 x 512..1024, 2 threads), this loop 1.8: ATen looks its kernel up per call, and the
// kernel walks a 64-row A that no longer fits L1 (measured with /tmp/amxb, not committed).
// Linux grants a process the AMX tile state only on request (oneDNN requests it too).
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

// (Permission implies a CPU with AMX; the loop also needs no oneDNN, so it serves with mkldnn
// disabled too.)
bool own_amx() {
  static const bool on = [] {
    const char* env = std::getenv("SEQKERN_AMX_OWN");  // "0": oneDNN's brgemm for every shape
    return amx_permitted() && !(env && env[0] == '0');
  }();
  return on;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

const TileConfig& own_tile_config() {
  static const TileConfig c = [] {
    TileConfig t;
    for (int i = 0; i < 8; ++i) t.colsb[i] = 64, t.rows[i] = 16;
    return t;
  }();
  return c;
}

// The tile registers are shared with every other AMX user on the thread (oneDNN through ATen,
// MKL, torch's own kernels), none of which tells the others what it loaded or released: the
// configuration in force is read back (sttilecfg) and ours loaded when it differs. ATen caches
// which configuration it loaded last, per thread; releasing through it first makes its next
// brgemm load its own again.
void load_own_tiles() {
  TileConfig now;
  _tile_storeconfig(&now);
  if (std::memcmp(&now, &own_tile_config(), sizeof(TileConfig)) == 0) return;
  if (onednn_bf16_brgemm()) at::native::cpublas::brgemm_release(true);
  _tile_loadconfig(&own_tile_config());
}

void release_own_tiles() {
  if (own_amx()) _tile_release();
}

// C[16·MT × 16·NT] (+)= A · B over K (a multiple of 32): C in tiles 0-3 ([m][n] = 2m + n),
// A in 4-5, B in 6-7. Tile numbers are instruction immediates, hence the unrolled cases.
// With `between`, it is called after each k-step's products are issued (see
// bf16_tile_product_overlapped), counting `step` up to `steps`.
template <int MT, int NT>
inline void amx_block(int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
                      int64_t ldb, float* C, int64_t ldc, bool add_C,
                      const StepHook* between = nullptr, int64_t* step = nullptr,
                      int64_t steps = 0) {
  const int64_t sa = lda * 2, sb = ldb * 4, sc = ldc * 4;
  if (add_C) {
    _tile_loadd(0, C, sc);
    if constexpr (NT > 1) _tile_loadd(1, C + 16, sc);
    if constexpr (MT > 1) _tile_loadd(2, C + 16 * ldc, sc);
    if constexpr (MT > 1 && NT > 1) _tile_loadd(3, C + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (MT > 1) _tile_zero(2);
    if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += 32) {
    const at::BFloat16* b = B + k * ldb;  // VNNI row pair k / 2
    _tile_loadd(6, b, sb);
    if constexpr (NT > 1) _tile_loadd(7, b + 32, sb);
    _tile_loadd(4, A + k, sa);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT > 1) {
      _tile_loadd(5, A + 16 * lda + k, sa);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
    if (between) (*between)((*step)++, steps);
  }
  _tile_stored(0, C, sc);
  if constexpr (NT > 1) _tile_stored(1, C + 16, sc);
  if constexpr (MT > 1) _tile_stored(2, C + 16 * ldc, sc);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, C + 16 * ldc + 16, sc);
}

void amx_product(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                 bool add_C, const at::BFloat16* A, const at::BFloat16* B, float* C,
                 const StepHook* between = nullptr) {
  load_own_tiles();
  int64_t step = 0;
  const int64_t steps = (M + 31) / 32 * ((N + 31) / 32) * (K / 32);
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const bool two_m = M - m0 >= 32;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const bool two_n = N - n0 >= 32;
      const at::BFloat16* a = A + m0 * lda;
      const at::BFloat16* b = B + 2 * n0;
      float* c = C + m0 * ldc + n0;
      if (two_m && two_n) amx_block<2, 2>(K, a, lda, b, ldb, c, ldc, add_C, between, &step, steps);
      else if (two_m) amx_block<2, 1>(K, a, lda, b, ldb, c, ldc, add_C, between, &step, steps);
      else if (two_n) amx_block<1, 2>(K, a, lda, b, ldb, c, ldc, add_C, between, &step, steps);
      else amx_block<1, 1>(K, a, lda, b, ldb, c, ldc, add_C, between, &step, steps);
    }
  }
}

#else
constexpr bool kAmxBuilt = false;
bool own_amx() { return false; }
void release_own_tiles() {}
void amx_product(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const at::BFloat16*,
                 const at::BFloat16*, float*, const StepHook* = nullptr) {
  TORCH_CHECK(false, "seqkern: this build has no AMX tile loop");
}
#endif
}  // namespace

bool bf16_tiles_supported() { return aten_bf16_brgemm() || kDpbf16; }

bool bf16_register_tiles() { return kDpbf16 && !aten_bf16_brgemm() && !own_amx(); }

bool amx_tiles_built() { return kAmxBuilt; }

TileMultiples bf16_tile_multiples() {
  return own_amx() ? TileMultiples{16, 16, 32} : TileMultiples{1, 1, 2};
}

namespace {
// Whether seqkern's own AMX loop takes an M × N × K product: whole tiles only.
bool own_tiles_take(int64_t M, int64_t N, int64_t K) {
  return own_amx() && M > 0 && N > 0 && K > 0 && M % 16 == 0 && N % 16 == 0 && K % 32 == 0;
}
}  // namespace

bool bf16_tile_product_overlapped(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                                  int64_t ldc, bool add_C, const at::BFloat16* A,
                                  const at::BFloat16* B, float* C, StepHook between) {
  if (!own_tiles_take(M, N, K)) return false;
  amx_product(M, N, K, lda, ldb, ldc, add_C, A, B, C, &between);
  return true;
}

void bf16_tile_product(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                       bool add_C, const at::BFloat16* A, const at::BFloat16* B, float* C) {
  if (own_tiles_take(M, N, K)) {
    amx_product(M, N, K, lda, ldb, ldc, add_C, A, B, C);
    return;
  }
  if (aten_bf16_brgemm()) {
    if (M <= 0 || N <= 0) return;
    // AMX multiplies k pairs only: oneDNN's kernel for an odd K executes an illegal instruction
    // (measured: SIGILL on a Xeon with AMX), so the last k is a rank-1 update here.
    const int64_t Ke = K & ~int64_t(1);
    if (Ke > 0) at::native::cpublas::brgemm(M, N, Ke, lda, ldb, ldc, add_C, A, B, C, true);
    if (K % 2) {
      const at::BFloat16* b_last = B + Ke * ldb;  // VNNI row pair Ke/2; its first of each pair
      for (int64_t m = 0; m < M; ++m) {
        const float a = static_cast<float>(A[m * lda + Ke]);
        float* c = C + m * ldc;
        const bool acc = add_C || Ke > 0;
        for (int64_t n = 0; n < N; ++n) {
          const float t = a * static_cast<float>(b_last[2 * n]);
          c[n] = acc ? c[n] + t : t;
        }
      }
    } else if (Ke == 0 && !add_C) {
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    }
    return;
  }
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if (M > 0 && N > 0)
    dpbf16_product(M, N, K, lda, ldb, ldc, add_C, reinterpret_cast<const uint16_t*>(A),
                   reinterpret_cast<const uint16_t*>(B), C);
#else
  TORCH_CHECK(false, "seqkern: bf16_tile_product needs AMX or AVX512_BF16");
#endif
}

void bf16_tile_release() {
  release_own_tiles();
  if (onednn_bf16_brgemm()) at::native::cpublas::brgemm_release(true);
}

bool gemm_bf16(bool a_trans, bool b_trans, int64_t M, int64_t N, int64_t K,
               const at::BFloat16* A, int64_t lda, const at::BFloat16* B, int64_t ldb, float* C,
               int64_t ldc, bool accumulate) {
  const bool own = dpbf16_gemm_preferred();
  const auto& b = blas();
  if (!own && (!b.gemm_bf16 || !fits_int(M) || !fits_int(N) || !fits_int(K) || !fits_int(lda) ||
               !fits_int(ldb) || !fits_int(ldc)))
    return false;
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    for (int64_t i = 0; i < M && !accumulate; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return true;
  }
  if (own) {
    dpbf16_gemm(a_trans, b_trans, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return true;
  }
  b.gemm_bf16(kRowMajor, a_trans ? kTrans : kNoTrans, b_trans ? kTrans : kNoTrans, (int)M, (int)N,
              (int)K, 1.0f, reinterpret_cast<const uint16_t*>(A), (int)lda,
              reinterpret_cast<const uint16_t*>(B), (int)ldb, accumulate ? 1.0f : 0.0f, C, (int)ldc);
  return true;
}

namespace {
// o[2n] = r0[n], o[2n + 1] = r1[n] for n < N: as 32-bit words, o[n] = r0[n] | r1[n] << 16,
// widened 16 (AVX-512) or 8 (AVX2) at a time. Measured: the element loop packed V for a
// 16-head, 4096-key bf16 attention call at ~2 GB/s, 40 % of a few-query forward.
void interleave_rows(const uint16_t* r0, const uint16_t* r1, int64_t N, at::BFloat16* o) {
  int64_t n = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; n + 16 <= N; n += 16) {
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + n)));
    const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + n)));
    _mm512_storeu_si512(o + 2 * n, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
  }
#elif defined(__AVX2__)
  for (; n + 8 <= N; n += 8) {
    const __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + n)));
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + n)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 2 * n), _mm256_or_si256(a, _mm256_slli_epi32(b, 16)));
  }
#endif
  for (; n < N; ++n) {
    o[2 * n] = at::BFloat16(r0[n], at::BFloat16::from_bits());
    o[2 * n + 1] = at::BFloat16(r1[n], at::BFloat16::from_bits());
  }
}
}  // namespace

void pack_vnni(const at::BFloat16* src, int64_t ld, int64_t K, int64_t N, int64_t Kp, int64_t Np,
               at::BFloat16* out) {
  const at::BFloat16 zero(0.0f);
  std::vector<uint16_t> zeros(K % 2 ? N : 0, 0);  // the row after an odd last one
  for (int64_t k = 0; k < Kp; k += 2) {
    at::BFloat16* o = out + k * Np;
    if (k < K) {
      const auto* r0 = reinterpret_cast<const uint16_t*>(src + k * ld);
      const auto* r1 = k + 1 < K ? reinterpret_cast<const uint16_t*>(src + (k + 1) * ld) : zeros.data();
      interleave_rows(r0, r1, N, o);
    } else {
      std::fill(o, o + 2 * N, zero);
    }
    std::fill(o + 2 * N, o + 2 * Np, zero);
  }
}

void pack_vnni_transposed(const at::BFloat16* src, int64_t ld, int64_t N, int64_t K, int64_t Np,
                          at::BFloat16* out) {
  TORCH_CHECK(K % 2 == 0, "pack_vnni_transposed: K must be even, got ", K);
  const int64_t P = K / 2;  // words per row of src
  if (ld % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0) {
    // out as (P × Np) words is the transpose of src as (N × ld/2) words
    const auto* in = reinterpret_cast<const float*>(src);
    auto* o = reinterpret_cast<float*>(out);
    transpose<float>(in, ld / 2, o, Np, N, P);
  } else {
    for (int64_t p = 0; p < P; ++p)
      for (int64_t n = 0; n < N; ++n) {
        out[p * 2 * Np + 2 * n] = src[n * ld + 2 * p];
        out[p * 2 * Np + 2 * n + 1] = src[n * ld + 2 * p + 1];
      }
  }
  if (Np > N)
    for (int64_t p = 0; p < P; ++p) std::fill(out + p * 2 * Np + 2 * N, out + (p + 1) * 2 * Np, at::BFloat16(0.0f));
}

const char* blas_name() { return blas().sgemm ? "mkl" : "aten"; }

}  // namespace seqkern::cpu
