// Row-major GEMM entry points used by every kernel.
//
// ATen's at::mm costs a few microseconds of dispatch per call, which dominates the per-step
// recurrent matmul at small batch. When torch is linked against MKL (x86 builds are), we call
// MKL's BLAS directly, resolved at run time with dlsym so that a torch without MKL still loads
// this extension and falls back to at::mm_out.
#pragma once
#include "isa.h"

#include <ATen/ATen.h>

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

// Name of the BLAS in use ("mkl" or "aten").
const char* blas_name();

}  // namespace seqkern::cpu
