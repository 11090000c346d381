// Matrix transposes for operand packing: attention's Qᵀ/dOᵀ blocks, the recurrent loops' weight
// panels, the bf16 VNNI packs (pairs of bf16 moved as one 32-bit word).
//
// at::vec::transpose_mxn<float> runs each 16×16 block through a stack buffer that it zeroes and
// spills to; at L = 128 it was 11 % of the fp32 attention forward, and packing W_hh with it
// streamed at about 3 GB/s. Here a full block stays in registers: 64 shuffles, 16 loads and 16
// stores; edge blocks use masked loads and stores.
#pragma once
#include "isa.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace seqkern::cpu {

#if defined(CPU_CAPABILITY_AVX512)
namespace transpose_detail {

// The m × n (≤ 16 × 16) block at src into dst, transposed. Rows past m read as zero; only the
// n × m result is written.
inline void block_16x16(const float* src, int64_t lds, float* dst, int64_t ldd, int m, int n) {
  const __mmask16 in_mask = static_cast<__mmask16>((1u << n) - 1);
  const __mmask16 out_mask = static_cast<__mmask16>((1u << m) - 1);
  const bool full = m == 16 && n == 16;
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i)
    r[i] = full ? _mm512_loadu_ps(src + i * lds)
           : i < m ? _mm512_maskz_loadu_ps(in_mask, src + i * lds)
                   : _mm512_setzero_ps();
  // pairs of rows interleaved within each 128-bit lane
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // then pairs of pairs: u[4g + c], lane block b, holds column 4b + c of rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // output row 4b + c gathers lane block b of u[c], u[4 + c], u[8 + c], u[12 + c]
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
  for (int j = 0; j < n; ++j) {
    if (full) _mm512_storeu_ps(dst + j * ldd, t[j]);
    else _mm512_mask_storeu_ps(dst + j * ldd, out_mask, t[j]);
  }
}

}  // namespace transpose_detail
#endif

// dst[j·ldd + i] = src[i·lds + j] for i < M, j < N: the M × N matrix at src, transposed
// (at::vec::transpose_mxn's contract).
template <typename T>
inline void transpose(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t M, int64_t N) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < M; i += 16)
      for (int64_t j = 0; j < N; j += 16)
        transpose_detail::block_16x16(src + i * lds + j, lds, dst + j * ldd + i, ldd,
                                      static_cast<int>(std::min<int64_t>(16, M - i)),
                                      static_cast<int>(std::min<int64_t>(16, N - j)));
    return;
  }
#endif
  // at::vec's 16-bit specialisations take blocks of at most 32 × 32
  for (int64_t i = 0; i < M; i += 32)
    for (int64_t j = 0; j < N; j += 32)
      at::vec::transpose_mxn<T>(src + i * lds + j, lds, dst + j * ldd + i, ldd,
                                static_cast<int>(std::min<int64_t>(32, M - i)),
                                static_cast<int>(std::min<int64_t>(32, N - j)));
}

}  // namespace seqkern::cpu
