/* A linear layer's product for a few rows, out = x·Wᵀ (+ bias), compiled once per instruction set by
 * linear_rows.c (NAME(n) gives every symbol an ISA suffix). Decoding multiplies
 * one row (or a few) by every weight of the model per token, so the product is bound by reading the weights
 * from memory: each weight is read once, four rows of W at a time against one row of x (the block stays in
 * the L1 cache for the next row of x), with float32 accumulators. */

#include "vec16.h"
#include "vec8.h"

/* out[r, j] for every row r: the sum (float32) of one row of W with each row of x, plus the bias. */
static inline __attribute__((always_inline)) void NAME(linear_rows_finish)(
    char *restrict out, const char *restrict xr, const char *restrict wq, const char *restrict bias, int64_t r,
    int64_t in, int64_t out_f, int64_t j, int64_t tail, float s, const int bf16) {
    for (int64_t t = tail; t < in; t++) s += NAME(load1)(xr, t, bf16) * NAME(load1)(wq, t, bf16);
    if (bias != NULL) s += NAME(load1)(bias, j, bf16);
    NAME(store1)(out + r * out_f * (bf16 ? 2 : 4), j, s, bf16);
}

/* Asks for the part of the next four rows of W (`next`, contiguous) that this step of the loop over four rows
 * consumes, so that it arrives while they are multiplied: the four rows read side by side are four short streams
 * (2 KB each at smollm2's width), which the hardware prefetcher keeps restarting; the whole span read in order is
 * one. A prefetch past the end of W is harmless (it never faults). */
static inline __attribute__((always_inline)) void NAME(prefetch_next)(const char *next, int64_t i, const int bf16) {
    const char *at = next + i * 4 * (bf16 ? 2 : 4);
    __builtin_prefetch(at, 0, 3);
    if (!bf16) __builtin_prefetch(at + 64, 0, 3);
}

/* out[r, j0 .. j0 + 4) for every row r: four consecutive rows of W (in elements each), two rows of x at a time
 * (eight accumulators: each load of W feeds two of them, each load of x four). The accumulators are separate
 * variables so that they stay in registers. */
static inline __attribute__((always_inline)) void NAME(linear_rows_four)(
    char *restrict out, const char *restrict x, const char *restrict W, const char *restrict bias, int64_t rows,
    int64_t in, int64_t out_f, int64_t j0, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    const char *w0 = W + j0 * in * esize, *w1 = w0 + in * esize, *w2 = w1 + in * esize, *w3 = w2 + in * esize;
    const char *next = w3 + in * esize;  /* the next four rows, contiguous after these */
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) {
        const char *xr = x + r * in * esize, *xs = xr + in * esize;
        NAME(f32x8) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) {
            NAME(prefetch_next)(next, i, bf16);
            const NAME(f32x8) xv = NAME(load8)(xr + i * esize, bf16), yv = NAME(load8)(xs + i * esize, bf16);
            NAME(f32x8) w = NAME(load8)(w0 + i * esize, bf16);
            a0 += w * xv, b0 += w * yv;
            w = NAME(load8)(w1 + i * esize, bf16);
            a1 += w * xv, b1 += w * yv;
            w = NAME(load8)(w2 + i * esize, bf16);
            a2 += w * xv, b2 += w * yv;
            w = NAME(load8)(w3 + i * esize, bf16);
            a3 += w * xv, b3 += w * yv;
        }
        NAME(linear_rows_finish)(out, xr, w0, bias, r, in, out_f, j0, i, NAME(lanes_sum8)(a0), bf16);
        NAME(linear_rows_finish)(out, xr, w1, bias, r, in, out_f, j0 + 1, i, NAME(lanes_sum8)(a1), bf16);
        NAME(linear_rows_finish)(out, xr, w2, bias, r, in, out_f, j0 + 2, i, NAME(lanes_sum8)(a2), bf16);
        NAME(linear_rows_finish)(out, xr, w3, bias, r, in, out_f, j0 + 3, i, NAME(lanes_sum8)(a3), bf16);
        NAME(linear_rows_finish)(out, xs, w0, bias, r + 1, in, out_f, j0, i, NAME(lanes_sum8)(b0), bf16);
        NAME(linear_rows_finish)(out, xs, w1, bias, r + 1, in, out_f, j0 + 1, i, NAME(lanes_sum8)(b1), bf16);
        NAME(linear_rows_finish)(out, xs, w2, bias, r + 1, in, out_f, j0 + 2, i, NAME(lanes_sum8)(b2), bf16);
        NAME(linear_rows_finish)(out, xs, w3, bias, r + 1, in, out_f, j0 + 3, i, NAME(lanes_sum8)(b3), bf16);
    }
    for (; r < rows; r++) {
        const char *xr = x + r * in * esize;
        NAME(f32x8) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) {
            NAME(prefetch_next)(next, i, bf16);
            const NAME(f32x8) xv = NAME(load8)(xr + i * esize, bf16);
            a0 += NAME(load8)(w0 + i * esize, bf16) * xv;
            a1 += NAME(load8)(w1 + i * esize, bf16) * xv;
            a2 += NAME(load8)(w2 + i * esize, bf16) * xv;
            a3 += NAME(load8)(w3 + i * esize, bf16) * xv;
        }
        NAME(linear_rows_finish)(out, xr, w0, bias, r, in, out_f, j0, i, NAME(lanes_sum8)(a0), bf16);
        NAME(linear_rows_finish)(out, xr, w1, bias, r, in, out_f, j0 + 1, i, NAME(lanes_sum8)(a1), bf16);
        NAME(linear_rows_finish)(out, xr, w2, bias, r, in, out_f, j0 + 2, i, NAME(lanes_sum8)(a2), bf16);
        NAME(linear_rows_finish)(out, xr, w3, bias, r, in, out_f, j0 + 3, i, NAME(lanes_sum8)(a3), bf16);
    }
}

/* out[r, j] for every row r: one row of W (the last rows of a span that is no multiple of four). */
static inline __attribute__((always_inline)) void NAME(linear_rows_one)(
    char *restrict out, const char *restrict x, const char *restrict W, const char *restrict bias, int64_t rows,
    int64_t in, int64_t out_f, int64_t j, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    const char *w = W + j * in * esize;
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = x + r * in * esize;
        NAME(f32x8) a = {0};
        int64_t i = 0;
        for (; i + 8 <= in; i += 8) a += NAME(load8)(w + i * esize, bf16) * NAME(load8)(xr + i * esize, bf16);
        NAME(linear_rows_finish)(out, xr, w, bias, r, in, out_f, j, i, NAME(lanes_sum8)(a), bf16);
    }
}

/* out (rows × out_f) = x (rows × in) · W (out_f × in)ᵀ + bias (out_f, or NULL), for output columns
 * [begin, end): all bf16 or all float32, contiguous; float32 sums, rounded once. */
void NAME(linear_rows)(void *out, const void *x, const void *W, const void *bias, int64_t rows, int64_t in,
                       int64_t out_f, int64_t begin, int64_t end, int bf16) {
    int64_t j = begin;
    if (bf16) {
        for (; j + 4 <= end; j += 4) NAME(linear_rows_four)(out, x, W, bias, rows, in, out_f, j, 1);
        for (; j < end; j++) NAME(linear_rows_one)(out, x, W, bias, rows, in, out_f, j, 1);
    } else {
        for (; j + 4 <= end; j += 4) NAME(linear_rows_four)(out, x, W, bias, rows, in, out_f, j, 0);
        for (; j < end; j++) NAME(linear_rows_one)(out, x, W, bias, rows, in, out_f, j, 0);
    }
}
