/* Compiles the kernel body named by KERNEL_BODY once per instruction set, each copy's symbols suffixed through
 * NAME(n): _avx512 (AVX-512 F/BW/VL/DQ), _avx2 (AVX2 + FMA) on x86 with GCC or Clang, and _baseline everywhere;
 * with PER_ISA_AVX512_BF16 defined, also _avx512bf16 (the same plus AVX512-BF16's pair products, which the body
 * uses under __AVX512BF16__). X86_DISPATCH says whether the x86 ones exist; the module picks the best one the
 * CPU has at import. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define X86_DISPATCH 1
#ifdef PER_ISA_AVX512_BF16
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
