// Row-major GEMM entry points used by every kernel.
//
// ATen's at::mm costs a few microseconds of dispatch per call, which dominates the per-step
// recurrent matmul at small batch. When torch is linked against MKL (x86 builds are), we call
// MKL's BLAS directly, resolved at run time with dlsym so that a torch without MKL still loads
// this extension and falls back to at::mm_out.
#pragma once
#include "isa.h"

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

namespace seqkern::cpu {

// C[M×N] = alpha · A[M×K] · op(B) + beta · C, all row-major with leading dimensions.
// op(B) = Bᵀ when b_trans (B stored N×K), else B (stored K×N).
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, bool b_trans, T beta, T* C, int64_t ldc);

// Same with A transposed: C[M×N] = alpha · Aᵀ · B + beta · C, A stored K×M, B stored K×N.
// Used for weight gradients (sum over the N·T rows of a sequence in one call).
template <typename T>
void gemm_tn(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
             int64_t ldb, T beta, T* C, int64_t ldc);

// A weight matrix used as the right-hand side of many GEMMs with the same shape (the
// recurrent matrix, once per time step). With MKL and max_m ≥ 2 it is packed once into MKL's
// internal panel layout (cblas_sgemm_pack), so the per-step calls skip re-packing it, a large
// cost of a small-M GEMM; with max_m ≤ 1 (or 0: the caller's choice not to pack) the calls use
// W as stored. Computes C[M×N] = A[M×K] · op(W) + beta·C, op(W) = Wᵀ (W stored N×K) when
// w_trans, else W (stored K×N). M may vary between calls up to max_m.
template <typename T>
class PackedWeight {
 public:
  PackedWeight(const T* W, int64_t ldw, bool w_trans, int64_t N, int64_t K, int64_t max_m);
  ~PackedWeight();
  PackedWeight(const PackedWeight&) = delete;
  PackedWeight& operator=(const PackedWeight&) = delete;
  void multiply(int64_t M, const T* A, int64_t lda, T beta, T* C, int64_t ldc) const;

 private:
  const T* W_;
  int64_t ldw_, N_, K_;
  bool w_trans_;
  T* packed_ = nullptr;
};

// C = A·Wᵀ for a few rows of A (M ≤ kFewRows), W (N × K) row-major: one product of a cell call
// or a streaming step. `few_row_products` runs two of them (x·W_ihᵀ and h·W_hhᵀ) in one
// parallel region split over the weights' rows, so each thread streams the same share of the
// weights on every call and finds it in its core's L2 the next time; MKL's threaded GEMV pays a
// fork/join per product and re-reads the weights from memory.
constexpr int64_t kFewRows = 4;
// few_row_products also takes up to kBlockedRows rows, 4 at a time per block of weight rows
// (bf16 cells up to 32 rows: a GEMM would pack the weights on every call).
constexpr int64_t kBlockedRows = 32;
// With Wt bfloat16 (T float) A is bf16 as well: bf16 operands, exact products, fp32 sums
// (vdpbf16ps where the CPU has it, which reads subnormal bf16 as zero, as the tile products).
template <typename T, typename Wt = T>
struct RowProduct {
  int64_t M = 0, N = 0, K = 0;
  const Wt* A = nullptr;  // M × K, rows lda apart
  int64_t lda = 0;
  const Wt* W = nullptr;  // N × K, contiguous rows
  T* C = nullptr;         // M × N, rows ldc apart
  int64_t ldc = 0;
};
template <typename T, typename Wt = T>
void few_row_products(const RowProduct<T, Wt>& p, const RowProduct<T, Wt>& q);
// One such product on the calling thread (a caller that splits the weights itself).
template <typename T, typename Wt = T>
void few_row_product(const RowProduct<T, Wt>& p);

// C[M×N] (float) = op(A)·op(B), A and B bfloat16, fp32 accumulation (MKL's
// cblas_gemm_bf16bf16f32, AMX/AVX512_BF16 where the CPU has them); op(A) = Aᵀ (A stored K×M)
// when a_trans, op(B) = Bᵀ (B stored N×K) when b_trans. Products of two bf16 numbers are exact
// in fp32, so this equals converting both to fp32 first, up to summation order. Returns false
// when MKL does not provide it (the caller converts and uses gemm<float>).
bool gemm_bf16(bool a_trans, bool b_trans, int64_t M, int64_t N, int64_t K,
               const at::BFloat16* A, int64_t lda, const at::BFloat16* B, int64_t ldb, float* C,
               int64_t ldc, bool accumulate = false);  // accumulate: C += the product

// bf16 tile products: C[M×N] (+)= A[M×K] · B, A bf16 row-major (lda), B bf16 in the VNNI
// order of pack_vnni below (ldb = its Np), fp32 C (ldc); with add_C the product is added to C.
// The signature is oneDNN's brgemm (at::native::cpublas::brgemm), which serves where ATen can
// pack bf16 for it (AMX). On a CPU with AVX512_BF16 and no AMX, oneDNN's ukernel is not
// available and a register-tile kernel on vdpbf16ps runs instead (2 bf16 products per fp32
// lane and instruction: twice the fp32 FMA rate). K may be odd (B's row after it zero).
bool bf16_tiles_supported();
// Whether those are the vdpbf16ps register tiles (no AMX), which cost nothing to start.
bool bf16_register_tiles();
void bf16_tile_product(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                       bool add_C, const at::BFloat16* A, const at::BFloat16* B, float* C);
// bf16_tile_product on seqkern's own AMX tile loop, calling between(i, n) after the products
// of each of its n k-steps are issued (i = 0 .. n-1). The tile unit multiplies while the vector
// units are free, and an instruction stream that holds nothing else leaves them idle: a caller
// puts independent vector work there (the recurrent loops: the gate math of the tile before),
// in pieces small enough to sit in the out-of-order window beside the tile instructions. Returns
// false, having done nothing, where that loop does not serve (see TileMultiples).
using StepHook = c10::function_ref<void(int64_t, int64_t)>;
bool bf16_tile_product_overlapped(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                                  int64_t ldc, bool add_C, const at::BFloat16* A,
                                  const at::BFloat16* B, float* C, StepHook between);
// The multiples of M, N and K at which bf16_tile_product runs whole tiles: on a CPU with AMX,
// seqkern's own tile loop then runs (M, N in 16s, K in 32s) instead of oneDNN's brgemm. A
// caller that owns its operand buffers pads them to these (zeros along K; extra rows of A read,
// their rows of C written and ignored). {1, 1, 2} elsewhere.
struct TileMultiples {
  int64_t m, n, k;
};
TileMultiples bf16_tile_multiples();
// Whether this build holds that AMX loop (compiled for a target with AMX: -march=native on one).
bool amx_tiles_built();
// Ends a thread's run of bf16_tile_product calls (releases AMX state; nothing otherwise).
void bf16_tile_release();

// Right operands of bf16_tile_product in oneDNN's bf16 VNNI order: B (Kp × Np) stored as Kp/2 rows
// of Np column pairs, out[(k/2)·2·Np + 2·n + k%2] = B[k][n] (ldb = Np). Entries past the
// valid K × N block are zero, so a padded product adds nothing. (cpublas::pack would build a
// oneDNN transform per call, ~0.1 ms each.)
// pack_vnni: B row-major, src[k·ld + n] (K × N valid); Kp even ≥ K, Np ≥ N.
void pack_vnni(const at::BFloat16* src, int64_t ld, int64_t K, int64_t N, int64_t Kp, int64_t Np,
               at::BFloat16* out);
// pack_vnni_transposed: B = srcᵀ, src row-major (N × K valid, K even), so B[k][n] = src[n·ld + k];
// Np ≥ N. Each k pair of a column is one 32-bit word of src, so this is a transpose of words.
void pack_vnni_transposed(const at::BFloat16* src, int64_t ld, int64_t N, int64_t K, int64_t Np,
                          at::BFloat16* out);

// Name of the BLAS in use ("mkl" or "aten").
const char* blas_name();

}  // namespace seqkern::cpu
