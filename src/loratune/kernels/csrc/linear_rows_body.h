/* A linear layer's product for a few rows, out = x·Wᵀ (+ bias), compiled once per instruction set by
 * linear_rows.c (NAME(n) gives every symbol an ISA suffix). Decoding multiplies
 * one row (or a few) by every weight of the model per token, so the product is bound by reading the weights
 * from memory: each weight is read once, four rows of W at a time against one row of x (the block stays in
 * the L1 cache for the next row of x), with float32 accumulators. */

#include "vec16.h"
#include "vec8.h"

/* The products' vectors, one register each: 16 floats in the copies built for AVX-512 (twice the products per
 * instruction of eight, which counts where a prompt's many rows make the product bound by arithmetic rather than
 * by memory), else 8. LANES is the width, the multiple the loops step by. */
#ifdef __AVX512F__
#define LANES 16
typedef NAME(f32x16) NAME(wide);
static inline __attribute__((always_inline)) NAME(wide) NAME(load_wide)(const void *p, int bf16) {
    return NAME(load16)(p, bf16);
}
static inline __attribute__((always_inline)) NAME(wide) NAME(wide_in_register)(NAME(wide) v) {
    __asm__("" : "+v"(v));
    return v;
}
static inline __attribute__((always_inline)) NAME(f32x8) NAME(fold8)(NAME(wide) v) {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
#else
#define LANES 8
typedef NAME(f32x8) NAME(wide);
static inline __attribute__((always_inline)) NAME(wide) NAME(load_wide)(const void *p, int bf16) {
    return NAME(load8)(p, bf16);
}
static inline __attribute__((always_inline)) NAME(wide) NAME(wide_in_register)(NAME(wide) v) {
    return NAME(in_register)(v);
}
static inline __attribute__((always_inline)) NAME(f32x8) NAME(fold8)(NAME(wide) v) { return v; }
#endif

/* lanes_sum8x4 of four accumulators (folded to eight lanes first) */
static inline __attribute__((always_inline)) NAME(f32x4)
    NAME(wide_sum4)(NAME(wide) a, NAME(wide) b, NAME(wide) c, NAME(wide) d) {
    return NAME(lanes_sum8x4)(NAME(fold8)(a), NAME(fold8)(b), NAME(fold8)(c), NAME(fold8)(d));
}

/* out[r, j] for every row r: the sum (float32) of one row of W with each row of x, plus the bias. */
static inline __attribute__((always_inline)) void NAME(linear_rows_finish)(
    char *restrict out, const char *restrict xr, const char *restrict wq, const char *restrict bias, int64_t r,
    int64_t in, int64_t out_f, int64_t j, int64_t tail, float s, const int bf16) {
    for (int64_t t = tail; t < in; t++) s += NAME(load1)(xr, t, bf16) * NAME(load1)(wq, t, bf16);
    if (bias != NULL) s += NAME(load1)(bias, j, bf16);
    NAME(store1)(out + r * out_f * (bf16 ? 2 : 4), j, s, bf16);
}

/* linear_rows_finish for four consecutive rows of W (from wq, `in` elements each) and their four sums. */
static inline __attribute__((always_inline)) void NAME(linear_rows_finish_four)(
    char *restrict out, const char *restrict xr, const char *restrict wq, int64_t in, const char *restrict bias,
    int64_t r, int64_t out_f, int64_t j, int64_t tail, NAME(f32x4) s, const int bf16) {
    const int64_t stride = in * (bf16 ? 2 : 4);
    for (int k = 0; k < 4; k++) NAME(linear_rows_finish)(out, xr, wq + k * stride, bias, r, in, out_f, j + k, tail, s[k], bf16);
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

/* Two rows of x (xr, xs) against four consecutive rows of W (w0 and the next three, `stride` bytes apart) over
 * elements [i0, i1) (multiples of LANES), added to the eight accumulators in acc (row xr's four, then xs's):
 * each load of W feeds two products, each load of x four. The accumulators live in registers during the loop. */
static inline __attribute__((always_inline)) void NAME(linear_rows_pair_widened)(
    const char *restrict xr, const char *restrict xs, const char *restrict w0, int64_t stride, const char *next,
    int64_t i0, int64_t i1, NAME(wide) *restrict acc, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    const char *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;
    NAME(wide) a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    NAME(wide) b0 = acc[4], b1 = acc[5], b2 = acc[6], b3 = acc[7];
    for (int64_t i = i0; i < i1; i += LANES) {
        NAME(prefetch_next)(next, i, bf16);
        if (LANES == 16) NAME(prefetch_next)(next, i + 8, bf16);
        const NAME(wide) xv = NAME(load_wide)(xr + i * esize, bf16), yv = NAME(load_wide)(xs + i * esize, bf16);
        NAME(wide) w = NAME(wide_in_register)(NAME(load_wide)(w0 + i * esize, bf16));
        a0 += w * xv, b0 += w * yv;
        w = NAME(wide_in_register)(NAME(load_wide)(w1 + i * esize, bf16));
        a1 += w * xv, b1 += w * yv;
        w = NAME(wide_in_register)(NAME(load_wide)(w2 + i * esize, bf16));
        a2 += w * xv, b2 += w * yv;
        w = NAME(wide_in_register)(NAME(load_wide)(w3 + i * esize, bf16));
        a3 += w * xv, b3 += w * yv;
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = b0, acc[5] = b1, acc[6] = b2, acc[7] = b3;
}

/* One row of x against four rows of W over [i0, i1), added to acc[0..4). */
static inline __attribute__((always_inline)) void NAME(linear_rows_single_widened)(
    const char *restrict xr, const char *restrict w0, int64_t stride, const char *next, int64_t i0, int64_t i1,
    NAME(wide) *restrict acc, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4;
    const char *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;
    NAME(wide) a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    for (int64_t i = i0; i < i1; i += LANES) {
        NAME(prefetch_next)(next, i, bf16);
        if (LANES == 16) NAME(prefetch_next)(next, i + 8, bf16);
        const NAME(wide) xv = NAME(load_wide)(xr + i * esize, bf16);
        a0 += NAME(load_wide)(w0 + i * esize, bf16) * xv;
        a1 += NAME(load_wide)(w1 + i * esize, bf16) * xv;
        a2 += NAME(load_wide)(w2 + i * esize, bf16) * xv;
        a3 += NAME(load_wide)(w3 + i * esize, bf16) * xv;
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

#ifdef __AVX512BF16__
/* linear_rows_pair and linear_rows_single for bf16 x and W with AVX512-BF16's pair products: each instruction
 * multiplies 32 bf16 pairs exactly and adds them, two by two, into 16 float32 sums (32 elements a step, no
 * widening of the loads), twice the products per instruction of widening to float32 first. */
#define BF16_STEP 32
static inline __attribute__((always_inline)) __m512bh NAME(load_pairs)(const char *p) {
    return (__m512bh)_mm512_loadu_si512(p);
}

static inline __attribute__((always_inline)) __m512bh NAME(pairs_in_register)(__m512bh v) {
    __asm__("" : "+v"(v));
    return v;
}

static inline __attribute__((always_inline)) void NAME(prefetch_next_pairs)(const char *next, int64_t i) {
    for (int k = 0; k < BF16_STEP; k += 8) NAME(prefetch_next)(next, i + k, 1);
}

static inline __attribute__((always_inline)) void NAME(linear_rows_pair_bf16)(
    const char *restrict xr, const char *restrict xs, const char *restrict w0, int64_t stride, const char *next,
    int64_t i0, int64_t i1, NAME(wide) *restrict acc) {
    const char *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;
    __m512 a0 = (__m512)acc[0], a1 = (__m512)acc[1], a2 = (__m512)acc[2], a3 = (__m512)acc[3];
    __m512 b0 = (__m512)acc[4], b1 = (__m512)acc[5], b2 = (__m512)acc[6], b3 = (__m512)acc[7];
    for (int64_t i = i0; i < i1; i += BF16_STEP) {
        NAME(prefetch_next_pairs)(next, i);
        const __m512bh xv = NAME(load_pairs)(xr + 2 * i), yv = NAME(load_pairs)(xs + 2 * i);
        __m512bh w = NAME(pairs_in_register)(NAME(load_pairs)(w0 + 2 * i));
        a0 = _mm512_dpbf16_ps(a0, w, xv), b0 = _mm512_dpbf16_ps(b0, w, yv);
        w = NAME(pairs_in_register)(NAME(load_pairs)(w1 + 2 * i));
        a1 = _mm512_dpbf16_ps(a1, w, xv), b1 = _mm512_dpbf16_ps(b1, w, yv);
        w = NAME(pairs_in_register)(NAME(load_pairs)(w2 + 2 * i));
        a2 = _mm512_dpbf16_ps(a2, w, xv), b2 = _mm512_dpbf16_ps(b2, w, yv);
        w = NAME(pairs_in_register)(NAME(load_pairs)(w3 + 2 * i));
        a3 = _mm512_dpbf16_ps(a3, w, xv), b3 = _mm512_dpbf16_ps(b3, w, yv);
    }
    acc[0] = (NAME(wide))a0, acc[1] = (NAME(wide))a1, acc[2] = (NAME(wide))a2, acc[3] = (NAME(wide))a3;
    acc[4] = (NAME(wide))b0, acc[5] = (NAME(wide))b1, acc[6] = (NAME(wide))b2, acc[7] = (NAME(wide))b3;
}

static inline __attribute__((always_inline)) void NAME(linear_rows_single_bf16)(
    const char *restrict xr, const char *restrict w0, int64_t stride, const char *next, int64_t i0, int64_t i1,
    NAME(wide) *restrict acc) {
    const char *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;
    __m512 a0 = (__m512)acc[0], a1 = (__m512)acc[1], a2 = (__m512)acc[2], a3 = (__m512)acc[3];
    for (int64_t i = i0; i < i1; i += BF16_STEP) {
        NAME(prefetch_next_pairs)(next, i);
        const __m512bh xv = NAME(load_pairs)(xr + 2 * i);
        a0 = _mm512_dpbf16_ps(a0, NAME(load_pairs)(w0 + 2 * i), xv);
        a1 = _mm512_dpbf16_ps(a1, NAME(load_pairs)(w1 + 2 * i), xv);
        a2 = _mm512_dpbf16_ps(a2, NAME(load_pairs)(w2 + 2 * i), xv);
        a3 = _mm512_dpbf16_ps(a3, NAME(load_pairs)(w3 + 2 * i), xv);
    }
    acc[0] = (NAME(wide))a0, acc[1] = (NAME(wide))a1, acc[2] = (NAME(wide))a2, acc[3] = (NAME(wide))a3;
}
#endif

/* The elements each step of the loops below takes: the pair products' 32 for bf16 where the CPU has them, else
 * one vector's LANES. */
static inline __attribute__((always_inline)) int64_t NAME(step_of)(const int bf16) {
#ifdef __AVX512BF16__
    if (bf16) return BF16_STEP;
#endif
    (void)bf16;
    return LANES;
}

/* Two rows of x against four rows of W over [i0, i1) (multiples of step_of), added to acc (see above). */
static inline __attribute__((always_inline)) void NAME(linear_rows_pair)(
    const char *restrict xr, const char *restrict xs, const char *restrict w0, int64_t stride, const char *next,
    int64_t i0, int64_t i1, NAME(wide) *restrict acc, const int bf16) {
#ifdef __AVX512BF16__
    if (bf16) {
        NAME(linear_rows_pair_bf16)(xr, xs, w0, stride, next, i0, i1, acc);
        return;
    }
#endif
    NAME(linear_rows_pair_widened)(xr, xs, w0, stride, next, i0, i1, acc, bf16);
}

/* One row of x against four rows of W over [i0, i1) (multiples of step_of), added to acc[0..4). */
static inline __attribute__((always_inline)) void NAME(linear_rows_single)(
    const char *restrict xr, const char *restrict w0, int64_t stride, const char *next, int64_t i0, int64_t i1,
    NAME(wide) *restrict acc, const int bf16) {
#ifdef __AVX512BF16__
    if (bf16) {
        NAME(linear_rows_single_bf16)(xr, w0, stride, next, i0, i1, acc);
        return;
    }
#endif
    NAME(linear_rows_single_widened)(xr, w0, stride, next, i0, i1, acc, bf16);
}

/* Rows of x that a wide input is split for (below) and the span of each part. */
#define LINEAR_ROWS_SPLIT_ROWS 64
#define LINEAR_ROWS_SPAN 256

/* out[r, j0 .. j0 + 4) for every row r: four consecutive rows of W (in elements each), two rows of x at a time.
 * For a few rows of a wide input (more than 640 elements: smollm2's down projection, 1536) the rows of x and
 * the block of W no longer fit the L1 cache together, and the block would come from L2 for every pair of rows:
 * there the input is taken in spans of 256 elements, every row of x over one span before the next, each row's
 * sums kept between spans (summed in the same order, so the same bits). */
static inline __attribute__((always_inline)) void NAME(linear_rows_four)(
    char *restrict out, const char *restrict x, const char *restrict W, const char *restrict bias, int64_t rows,
    int64_t in, int64_t out_f, int64_t j0, const int bf16) {
    const int64_t esize = bf16 ? 2 : 4, stride = in * esize, whole = in & ~(NAME(step_of)(bf16) - 1);
    const char *w0 = W + j0 * stride;
    const char *next = w0 + 4 * stride; /* the next four rows, contiguous after these */
    if (rows >= 2 && rows <= LINEAR_ROWS_SPLIT_ROWS && in > 640) {
        NAME(wide) acc[LINEAR_ROWS_SPLIT_ROWS * 4];
        memset(acc, 0, sizeof(NAME(wide)) * 4 * rows);
        for (int64_t i0 = 0; i0 < whole; i0 += LINEAR_ROWS_SPAN) {
            const int64_t i1 = i0 + LINEAR_ROWS_SPAN < whole ? i0 + LINEAR_ROWS_SPAN : whole;
            int64_t r = 0;
            for (; r + 2 <= rows; r += 2)
                NAME(linear_rows_pair)(x + r * stride, x + (r + 1) * stride, w0, stride, next, i0, i1, acc + 4 * r, bf16);
            if (r < rows) NAME(linear_rows_single)(x + r * stride, w0, stride, next, i0, i1, acc + 4 * r, bf16);
        }
        for (int64_t r = 0; r < rows; r++) {
            const NAME(wide) *a = acc + 4 * r;
            NAME(linear_rows_finish_four)(out, x + r * stride, w0, in, bias, r, out_f, j0, whole,
                                          NAME(wide_sum4)(a[0], a[1], a[2], a[3]), bf16);
        }
        return;
    }
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) {
        NAME(wide) acc[8] = {{0}};
        const char *xr = x + r * stride, *xs = xr + stride;
        NAME(linear_rows_pair)(xr, xs, w0, stride, next, 0, whole, acc, bf16);
        NAME(linear_rows_finish_four)(out, xr, w0, in, bias, r, out_f, j0, whole,
                                      NAME(wide_sum4)(acc[0], acc[1], acc[2], acc[3]), bf16);
        NAME(linear_rows_finish_four)(out, xs, w0, in, bias, r + 1, out_f, j0, whole,
                                      NAME(wide_sum4)(acc[4], acc[5], acc[6], acc[7]), bf16);
    }
    for (; r < rows; r++) {
        NAME(wide) acc[4] = {{0}};
        const char *xr = x + r * stride;
        NAME(linear_rows_single)(xr, w0, stride, next, 0, whole, acc, bf16);
        NAME(linear_rows_finish_four)(out, xr, w0, in, bias, r, out_f, j0, whole,
                                      NAME(wide_sum4)(acc[0], acc[1], acc[2], acc[3]), bf16);
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

#undef LANES
#ifdef BF16_STEP
#undef BF16_STEP
#endif
