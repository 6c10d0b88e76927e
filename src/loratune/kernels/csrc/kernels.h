/* Every compiled kernel of loratune.kernels._cpu with its signature, and the instruction sets they are built for.
 *
 * Each kernel is compiled once per instruction set (ISA) by its family's file (lowrank.c, linear_rows.c, norm.c,
 * rope.c, silu_mul.c, dropout.c, attention.c, decode_attention.c, cross_entropy.c, fastfood.c through per_isa.h), the copies named name_baseline, name_avx2,
 * name_avx512 and name_avx512bf16. dispatch.c keeps one function pointer per kernel, name_impl, and points all
 * of them at one ISA's copies at a time (select_isa): a call through it is a plain indirect call. AMX is no copy
 * of its own but a refinement of AVX512-BF16: its copies, and attention's products in AMX tiles (attention.c),
 * where the CPU has AMX and Linux grants it. */
#ifndef LORATUNE_KERNELS_H
#define LORATUNE_KERNELS_H

#include <stdint.h>

/* shared between this module's files only (direct addressing, nothing exported from the library) */
#define HIDDEN __attribute__((visibility("hidden")))

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_X86 1
/* AVX512-BF16 and AMX need GCC 11 / Clang 12 intrinsics; AMX also Linux's permission call */
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define HAVE_AVX512_BF16 1
#if defined(__linux__)
#define HAVE_AMX 1
#endif
#endif
#endif

/* The order runnable_isas() lists them in: each runs on a subset of the CPUs the one before runs on. */
enum isa { ISA_BASELINE, ISA_AVX2, ISA_AVX512, ISA_AVX512BF16, ISA_AMX, ISA_COUNT };

/* the largest rank the low-rank update takes (its scratch on the stack: rank floats for each of four rows) */
#define MAX_RANK 1024

/* X(name, the copy AVX512-BF16 CPUs run, parameters) for every kernel. The low-rank update has no AVX512-BF16
 * copy (lowrank.c): its AVX-512 one keeps rounding float32 denormals exactly when it stores bf16, which the
 * AVX512-BF16 conversion would flush to zero. */
#define KERNELS(X)                                                                                                     \
    X(add_low_rank_bf16, avx512,                                                                                       \
      (void *, const void *, const float *, const float *, int64_t, int64_t, int64_t, int64_t, const int64_t *,       \
       int64_t))                                                                                                       \
    X(add_low_rank_f32, avx512,                                                                                        \
      (void *, const void *, const float *, const float *, int64_t, int64_t, int64_t, int64_t, const int64_t *,       \
       int64_t))                                                                                                       \
    X(low_rank_h_all, avx512,                                                                                         \
      (const void *, const float *, int64_t, int64_t, int64_t, const int64_t *, int64_t, float *, int))               \
    X(low_rank_add_cols, avx512,                                                                                      \
      (void *, const float *, const float *, int64_t, int64_t, int64_t, const int64_t *, int64_t, int64_t, int64_t,  \
       int))                                                                                                           \
    X(linear_rows, avx512bf16,                                                                                         \
      (void *, const void *, const void *, const void *, int64_t, int64_t, int64_t, int64_t, int64_t, int))           \
    X(rope, avx512bf16,                                                                                                \
      (void *, const void *, int64_t, void *, const void *, int64_t, const void *, const void *, int64_t, int64_t,   \
       int64_t, int))                                                                                                  \
    X(decode_attention, avx512bf16,                                                                                    \
      (void *, const void *, void *, void *, const void *, const void *, const int64_t *, int64_t, int64_t, int64_t,   \
       int64_t, int64_t, float, float *, int64_t, int64_t, int))                                                       \
    X(rows_attention, avx512bf16,                                                                                      \
      (void *, const void *, const void *, const void *, const uint8_t *, int64_t, int64_t, int64_t, int64_t, int64_t, \
       int64_t, int64_t, float, float *, int64_t, int64_t, int))                                                       \
    X(silu_mul, avx512bf16, (void *, const void *, const void *, int64_t, int))                                       \
    X(silu_mul_backward, avx512bf16, (void *, void *, const void *, const void *, const void *, int64_t, int))        \
    X(rms_norm, avx512bf16, (void *, float *, const void *, const void *, int64_t, int64_t, float, int))              \
    X(rms_norm_apply, avx512bf16, (void *, const float *, const void *, const void *, int64_t, int64_t, int))         \
    X(rms_norm_backward, avx512bf16,                                                                                   \
      (void *, const void *, const void *, const void *, const float *, int64_t, int64_t, int))                       \
    X(dropout, avx512bf16, (void *, const void *, int64_t, int64_t, uint64_t, uint32_t, float, int))                  \
    X(attention_backward_scores, avx512bf16,                                                                           \
      (void *, void *, const void *, const void *, const void *, const void *, const void *, const float *,           \
       const float *, const int64_t *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, float, int, int))  \
    X(cross_entropy_rows, avx512bf16, (void *, float *, const int64_t *, int64_t, int64_t, int, float *, int))     \
    X(fastfood_blocks, avx512,                                                                                         \
      (float *, const float *, const int8_t *, const int32_t *, const float *, int64_t, int64_t, int64_t, int64_t,    \
       int64_t, float *, float *, int))

/* name_fn, the pointer name_impl calls go through, and the copies (declared for every ISA; only the built ones
 * are defined and referenced). */
#define DECLARE_KERNEL(name, bf16, params)                                                                             \
    typedef void(*name##_fn) params;                                                                                   \
    HIDDEN extern name##_fn name##_impl;                                                                               \
    HIDDEN void name##_baseline params;                                                                                \
    HIDDEN void name##_avx2 params;                                                                                    \
    HIDDEN void name##_avx512 params;                                                                                  \
    HIDDEN void name##_avx512bf16 params;
KERNELS(DECLARE_KERNEL)
#undef DECLARE_KERNEL

#ifdef HAVE_AMX
/* attention_backward_scores in AMX tiles, for the calls amx_fits takes (attention.c) */
HIDDEN void attention_backward_scores_amx(void *probs, void *grad_scores, const void *q, const void *go, const void *o,
                                          const void *kt, const void *vt, const float *lse, const float *mask,
                                          const int64_t *mask_row, int64_t first_tile, int64_t tiles,
                                          int64_t rows_per_batch, int64_t q_len, int64_t k_len, int64_t head_dim,
                                          int causal, float scale);
#endif

/* dispatch.c: the ISA names, which ones this CPU runs, and the choice among them */
HIDDEN extern const char *const isa_names[ISA_COUNT];
HIDDEN extern int use_amx;        /* attention takes AMX tiles where amx_fits */
HIDDEN void detect_isas(void);    /* once, before the others */
HIDDEN int isa_built(int isa);    /* compiled in, whatever the CPU */
HIDDEN int isa_runnable(int isa); /* built, and this CPU (and OS) runs it */
HIDDEN int select_isa(int isa);   /* points every kernel at isa's copies; 0 (nothing changed) unless runnable */
HIDDEN int current_isa(void);

#endif
