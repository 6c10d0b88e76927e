/* Compiles the kernel body named by KERNEL_BODY once per instruction set, each copy's symbols suffixed through
 * NAME(n): _avx512bf16 (AVX-512 plus AVX512-BF16's pair products and conversions, which the bodies use under
 * __AVX512BF16__; not where the file defines NO_AVX512_BF16_COPY), _avx512 (AVX-512 F/BW/VL/DQ) and _avx2
 * (AVX2 + FMA) where kernels.h finds them buildable, and _baseline everywhere. dispatch.c picks among them. */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#ifdef HAVE_X86
#include <immintrin.h>
#if defined(HAVE_AVX512_BF16) && !defined(NO_AVX512_BF16_COPY)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
#define NAME(n) n##_avx512bf16
#include KERNEL_BODY
#undef NAME
#pragma GCC pop_options
#endif
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define NAME(n) n##_avx512
#include KERNEL_BODY
#undef NAME
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NAME(n) n##_avx2
#include KERNEL_BODY
#undef NAME
#pragma GCC pop_options
#endif
#define NAME(n) n##_baseline
#include KERNEL_BODY
#undef NAME
