/* The low-rank update of an unmerged LoRA layer for a few rows, out += (x·Aᵀ)·(s·Bᵀ), compiled once per
 * instruction set by lowrank.c (NAME(n) gives every symbol here an ISA suffix; eight-float vectors, vec8.h). */

#include "vec16.h"
#include "vec8.h"

/* h[k] = x · A[k, :] for one row x (in elements) and every k < rank: four rows of A at a time, each load of x
 * feeding four accumulators (separate variables, so that they stay in registers). */
static inline __attribute__((always_inline)) void NAME(low_rank_h)(
    const char *restrict x, int64_t in, const float *restrict A, int64_t rank, float *restrict h, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    int64_t k = 0;
    for (; k + 4 <= rank; k += 4) {
        const float *a0 = A + k * in, *a1 = a0 + in, *a2 = a1 + in, *a3 = a2 + in;
        NAME(f32x8) s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) {
            const NAME(f32x8) xv = NAME(load8)(x + i * esize, bf16);
            s0 += NAME(load8)(a0 + i, 0) * xv;
            s1 += NAME(load8)(a1 + i, 0) * xv;
            s2 += NAME(load8)(a2 + i, 0) * xv;
            s3 += NAME(load8)(a3 + i, 0) * xv;
        }
        float t0 = NAME(lanes_sum8)(s0), t1 = NAME(lanes_sum8)(s1), t2 = NAME(lanes_sum8)(s2),
              t3 = NAME(lanes_sum8)(s3);
        for (; i < in; i++) {
            const float xi = NAME(load1)(x, i, bf16);
            t0 += xi * a0[i], t1 += xi * a1[i], t2 += xi * a2[i], t3 += xi * a3[i];
        }
        h[k] = t0, h[k + 1] = t1, h[k + 2] = t2, h[k + 3] = t3;
    }
    for (; k < rank; k++) {
        const float *a = A + k * in;
        NAME(f32x8) s0 = {0};
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) s0 += NAME(load8)(a + i, 0) * NAME(load8)(x + i * esize, bf16);
        float t = NAME(lanes_sum8)(s0);
        for (; i < in; i++) t += NAME(load1)(x, i, bf16) * a[i];
        h[k] = t;
    }
}

/* out[rr, j0:j1) += h[rr, :] · sBt[:, j0:j1) for NR (1 or 4) consecutive rows of out (rows of out_f elements),
 * rounded once. Eight outputs at a time: each load of sBt feeds NR accumulators. Each output is the same sum
 * over k in the same order whatever the span, so spans split over threads give the bits one call gives. */
static inline __attribute__((always_inline)) void NAME(low_rank_update)(
    char *restrict out, int64_t out_f, const float *restrict sBt, int64_t rank, const float *restrict h,
    const int NR, int64_t j0, int64_t j1, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    char *o0 = out, *o1 = out + out_f * esize, *o2 = o1 + out_f * esize, *o3 = o2 + out_f * esize;
    const float *h0 = h, *h1 = h + rank, *h2 = h1 + rank, *h3 = h2 + rank;
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
        NAME(f32x8) s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int64_t k = 0; k < rank; k++) {
            const NAME(f32x8) b = NAME(load8)(sBt + k * out_f + j, 0);
            s0 += h0[k] * b;
            if (NR == 4) s1 += h1[k] * b, s2 += h2[k] * b, s3 += h3[k] * b;
        }
        NAME(store8)(o0 + j * esize, NAME(load8)(o0 + j * esize, bf16) + s0, bf16);
        if (NR == 4) {
            NAME(store8)(o1 + j * esize, NAME(load8)(o1 + j * esize, bf16) + s1, bf16);
            NAME(store8)(o2 + j * esize, NAME(load8)(o2 + j * esize, bf16) + s2, bf16);
            NAME(store8)(o3 + j * esize, NAME(load8)(o3 + j * esize, bf16) + s3, bf16);
        }
    }
    for (; j < j1; j++) {
        for (int rr = 0; rr < NR; rr++) {
            float s = 0.f;
            for (int64_t k = 0; k < rank; k++) s += h[rr * rank + k] * sBt[k * out_f + j];
            char *row = out + rr * out_f * esize;
            NAME(store1)(row, j, NAME(load1)(row, j, bf16) + s, bf16);
        }
    }
}

/* The (offset, n) rows of A and sBt that row r uses: all rank of them without blocks (see add_low_rank). */
#define LOW_RANK_BLOCK(r, offset, n)                                                                                  \
    const int64_t offset = blocks != NULL ? blocks[2 * ((r) / rows_per_block)] : 0;                                   \
    const int64_t n = blocks != NULL ? blocks[2 * ((r) / rows_per_block) + 1] : rank

/* h[r·rank + k] = x[r, :] · A[offset + k, :] for every row r and k < n (its block, LOW_RANK_BLOCK). */
static inline __attribute__((always_inline)) void NAME(low_rank_h_rows)(
    const void *restrict x, const float *restrict A, int64_t rows, int64_t in, int64_t rank,
    const int64_t *restrict blocks, int64_t rows_per_block, float *restrict h, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++) {
        LOW_RANK_BLOCK(r, offset, n);
        if (n > 0) NAME(low_rank_h)((const char *)x + r * in * esize, in, A + offset * in, n, h + r * rank, bf16);
    }
}

/* out[r, j0:j1) += h[r·rank, …] · sBt[offset…, j0:j1) for every row r (h from low_rank_h_rows): rows four at a
 * time where they share one block, else one by one. */
static inline __attribute__((always_inline)) void NAME(low_rank_add_span)(
    void *restrict out, const float *restrict sBt, const float *restrict h, int64_t rows, int64_t rank,
    int64_t out_f, const int64_t *restrict blocks, int64_t rows_per_block, int64_t j0, int64_t j1, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    int64_t r = 0;
    if (blocks == NULL) {
        for (; r + 4 <= rows; r += 4)
            NAME(low_rank_update)((char *)out + r * out_f * esize, out_f, sBt, rank, h + r * rank, 4, j0, j1, bf16);
    }
    for (; r < rows; r++) {
        LOW_RANK_BLOCK(r, offset, n);
        if (n > 0)
            NAME(low_rank_update)((char *)out + r * out_f * esize, out_f, sBt + offset * out_f, n, h + r * rank, 1,
                                  j0, j1, bf16);
    }
}

/* out[r, :] += (x[r, :] · Aᵀ) · sBt for every row r, all arithmetic in float32.
 * x: rows × in, out: rows × out_f (both bf16 or both float32, contiguous); A: rank × in, sBt: rank × out_f
 * (float32, contiguous). Rows go four at a time (h of each, then one update), the rest one by one.
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
            NAME(low_rank_h)((const char *)x + r * in * esize, in, A + offset * in, n, h, bf16);
            NAME(low_rank_update)((char *)out + r * out_f * esize, out_f, sBt + offset * out_f, n, h, 1, 0, out_f,
                                  bf16);
        }
        return;
    }
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const char *xr = (const char *)x + r * in * esize;
        for (int rr = 0; rr < 4; rr++) NAME(low_rank_h)(xr + rr * in * esize, in, A, rank, h + rr * rank, bf16);
        NAME(low_rank_update)((char *)out + r * out_f * esize, out_f, sBt, rank, h, 4, 0, out_f, bf16);
    }
    for (; r < rows; r++) {
        NAME(low_rank_h)((const char *)x + r * in * esize, in, A, rank, h, bf16);
        NAME(low_rank_update)((char *)out + r * out_f * esize, out_f, sBt, rank, h, 1, 0, out_f, bf16);
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

/* The update in two parts, for an update spread over threads (module.c's lora_rows): h of every row on one
 * thread (h: rows × rank floats), then each thread adds its span of output columns; the same bits as
 * add_low_rank. */
void NAME(low_rank_h_all)(const void *x, const float *A, int64_t rows, int64_t in, int64_t rank,
                          const int64_t *blocks, int64_t rows_per_block, float *h, int bf16) {
    if (bf16) NAME(low_rank_h_rows)(x, A, rows, in, rank, blocks, rows_per_block, h, 1);
    else NAME(low_rank_h_rows)(x, A, rows, in, rank, blocks, rows_per_block, h, 0);
}

void NAME(low_rank_add_cols)(void *out, const float *sBt, const float *h, int64_t rows, int64_t rank, int64_t out_f,
                             const int64_t *blocks, int64_t rows_per_block, int64_t j0, int64_t j1, int bf16) {
    if (bf16) NAME(low_rank_add_span)(out, sBt, h, rows, rank, out_f, blocks, rows_per_block, j0, j1, 1);
    else NAME(low_rank_add_span)(out, sBt, h, rows, rank, out_f, blocks, rows_per_block, j0, j1, 0);
}

#undef LOW_RANK_BLOCK
