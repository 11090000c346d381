// Maps the compiler's target ISA (set by setup.py: -march=native by default) onto ATen's
// CPU_CAPABILITY macros, so that at::vec::Vectorized uses the widest registers this build may
// emit. Must be included before any ATen header in every translation unit.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#ifndef CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY_AVX512 1
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX512
#endif
#define SEQKERN_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#ifndef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY_AVX2 1
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX2
#endif
#define SEQKERN_ISA "avx2"
#else
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define SEQKERN_ISA "generic"
#endif

namespace seqkern {

// CPU feature flags (as spelled in /proc/cpuinfo) that the compiler was allowed to use for this
// build. The Python loader refuses the extension when the running CPU lacks any of them.
inline const char* required_cpu_flags() {
  return ""
#if defined(__POPCNT__)
         "popcnt "
#endif
#if defined(__BMI__)
         "bmi1 "
#endif
#if defined(__BMI2__)
         "bmi2 "
#endif
#if defined(__LZCNT__)
         "abm "
#endif
#if defined(__MOVBE__)
         "movbe "
#endif
#if defined(__AVX__)
         "avx "
#endif
#if defined(__AVX2__)
         "avx2 "
#endif
#if defined(__FMA__)
         "fma "
#endif
#if defined(__F16C__)
         "f16c "
#endif
#if defined(__AVX512F__)
         "avx512f "
#endif
#if defined(__AVX512BW__)
         "avx512bw "
#endif
#if defined(__AVX512DQ__)
         "avx512dq "
#endif
#if defined(__AVX512VL__)
         "avx512vl "
#endif
#if defined(__AVX512BF16__)
         "avx512_bf16 "
#endif
#if defined(__AVX512FP16__)
         "avx512_fp16 "
#endif
#if defined(__AVX512VNNI__)
         "avx512_vnni "
#endif
#if defined(__AMX_TILE__)
         "amx_tile "
#endif
#if defined(__AMX_BF16__)
         "amx_bf16 "
#endif
      ;
}

}  // namespace seqkern
