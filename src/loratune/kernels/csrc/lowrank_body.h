/* The low-rank update of an unmerged LoRA layer for a few rows, out += (x·Aᵀ)·(s·Bᵀ), compiled once per
 * instruction set by lowrank.c (NAME(n) gives every symbol here an ISA suffix; the vector width is fixed at 16
 * floats, which the compiler lowers to one AVX-512 register, two AVX2 registers or four SSE registers). */

#include "vec16.h"

/* h[rr, k] = x[rr, :] · A[k, :] for NR consecutive rows of x (rows of in elements) and every k < rank. Eight
 * components at a time: each load of a row of x feeds eight accumulators, each load of A feeds NR of them. */
static inline __attribute__((always_inline)) void NAME(low_rank_h)(
    const char *restrict x, int64_t in, const float *restrict A, int64_t rank, float *restrict h, const int NR,
    const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    for (int64_t k0 = 0; k0 < rank; k0 += 8) {
        const int64_t nk = rank - k0 < 8 ? rank - k0 : 8;
        NAME(f32x16) acc[NR][8];
        for (int rr = 0; rr < NR; rr++)
            for (int k = 0; k < 8; k++) acc[rr][k] = (NAME(f32x16)){0};
        int64_t i = 0;
        for (; i + 16 <= in; i += 16) {
            NAME(f32x16) xv[NR];
            for (int rr = 0; rr < NR; rr++) xv[rr] = NAME(load16)(x + (rr * in + i) * esize, bf16);
            for (int64_t k = 0; k < nk; k++) {
                NAME(f32x16) a;
                memcpy(&a, A + (k0 + k) * in + i, 64);
                for (int rr = 0; rr < NR; rr++) acc[rr][k] += xv[rr] * a;
            }
        }
        for (int rr = 0; rr < NR; rr++) {
            for (int64_t k = 0; k < nk; k++) {
                float s = 0.f;
                for (int l = 0; l < 16; l++) s += acc[rr][k][l];
                for (int64_t t = i; t < in; t++) s += NAME(load1)(x + rr * in * esize, t, bf16) * A[(k0 + k) * in + t];
                h[rr * rank + k0 + k] = s;
            }
        }
    }
}

/* out[rr, :] += h[rr, :] · sBt for NR consecutive rows of out (rows of out_f elements), rounded once. Sixteen
 * outputs at a time: each load of sBt feeds NR accumulators. */
static inline __attribute__((always_inline)) void NAME(low_rank_update)(
    char *restrict out, int64_t out_f, const float *restrict sBt, int64_t rank, const float *restrict h,
    const int NR, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    int64_t j = 0;
    for (; j + 16 <= out_f; j += 16) {
        NAME(f32x16) s[NR];
        for (int rr = 0; rr < NR; rr++) s[rr] = (NAME(f32x16)){0};
        for (int64_t k = 0; k < rank; k++) {
            NAME(f32x16) b;
            memcpy(&b, sBt + k * out_f + j, 64);
            for (int rr = 0; rr < NR; rr++) s[rr] += h[rr * rank + k] * b;
        }
        for (int rr = 0; rr < NR; rr++) {
            char *p = out + (rr * out_f + j) * esize;
            NAME(store16)(p, NAME(load16)(p, bf16) + s[rr], bf16);
        }
    }
    for (; j < out_f; j++) {
        for (int rr = 0; rr < NR; rr++) {
            float s = 0.f;
            for (int64_t k = 0; k < rank; k++) s += h[rr * rank + k] * sBt[k * out_f + j];
            char *row = out + rr * out_f * esize;
            NAME(store1)(row, j, NAME(load1)(row, j, bf16) + s, bf16);
        }
    }
}

/* out[r, :] += (x[r, :] · Aᵀ) · sBt for every row r, all arithmetic in float32.
 * x: rows × in, out: rows × out_f (both bf16 or both float32, contiguous); A: rank × in, sBt: rank × out_f
 * (float32, contiguous). Rows go four at a time (two pairs for h, then one update), the rest one by one.
 * With ``blocks`` (a mixed-adapter batch), row r uses only rows [offset, offset + n) of A and sBt, where
 * (offset, n) = blocks[2b], blocks[2b + 1] for b = r / rows_per_block; n = 0 adds nothing. */
static inline __attribute__((always_inline)) void NAME(add_low_rank)(
    void *restrict out, const void *restrict x, const float *restrict A, const float *restrict sBt,
    int64_t rows, int64_t in, int64_t rank, int64_t out_f, const int64_t *restrict blocks, int64_t rows_per_block,
    const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    float h[4 * MAX_RANK];
    if (blocks != NULL) {
        for (int64_t r = 0; r < rows; r++) {
            const int64_t offset = blocks[2 * (r / rows_per_block)], n = blocks[2 * (r / rows_per_block) + 1];
            if (n == 0) continue;
            NAME(low_rank_h)((const char *)x + r * in * esize, in, A + offset * in, n, h, 1, bf16);
            NAME(low_rank_update)((char *)out + r * out_f * esize, out_f, sBt + offset * out_f, n, h, 1, bf16);
        }
        return;
    }
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const char *xr = (const char *)x + r * in * esize;
        NAME(low_rank_h)(xr, in, A, rank, h, 2, bf16);
        NAME(low_rank_h)(xr + 2 * in * esize, in, A, rank, h + 2 * rank, 2, bf16);
        NAME(low_rank_update)((char *)out + r * out_f * esize, out_f, sBt, rank, h, 4, bf16);
    }
    for (; r < rows; r++) {
        NAME(low_rank_h)((const char *)x + r * in * esize, in, A, rank, h, 1, bf16);
        NAME(low_rank_update)((char *)out + r * out_f * esize, out_f, sBt, rank, h, 1, bf16);
    }
}

void NAME(add_low_rank_bf16)(void *out, const void *x, const float *A, const float *sBt, int64_t rows, int64_t in,
                             int64_t rank, int64_t out_f, const int64_t *blocks, int64_t rows_per_block) {
    NAME(add_low_rank)(out, x, A, sBt, rows, in, rank, out_f, blocks, rows_per_block, 1);
}

void NAME(add_low_rank_f32)(void *out, const void *x, const float *A, const float *sBt, int64_t rows, int64_t in,
                            int64_t rank, int64_t out_f, const int64_t *blocks, int64_t rows_per_block) {
    NAME(add_low_rank)(out, x, A, sBt, rows, in, rank, out_f, blocks, rows_per_block, 0);
}
