/* Llama's RMSNorm forward, its output again for a known rstd, and its input gradient, one pass over each row,
 * compiled once per instruction set by norm.c (NAME(n) gives the ISA suffix). bf16 or float32 tensors (``bf16``
 * says which), float32 arithmetic, rounded where the PyTorch code it replaces rounds
 * (loratune/train/fused_ops.py), so results agree with it up to the order of float32 sums. */

#include "vec16.h"

/* Σ a[i]·b[i] over one row, in float32 (sixteen partial sums, then the tail). */
static inline __attribute__((always_inline)) float NAME(row_dot)(const char *a, const char *b, int64_t h,
                                                               int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    NAME(f32x16) acc = (NAME(f32x16)){0};
    int64_t i = 0;
    for (; i + 16 <= h; i += 16) acc += NAME(load16)(a + i * es, bf16) * NAME(load16)(b + i * es, bf16);
    float s = 0.f;
    for (int l = 0; l < 16; l++) s += acc[l];
    for (; i < h; i++) s += NAME(load1)(a, i, bf16) * NAME(load1)(b, i, bf16);
    return s;
}

/* One row of RMSNorm's output for its rstd: out = weight · (x·rstd rounded to the dtype). */
static inline __attribute__((always_inline)) void NAME(rms_norm_row)(char *outr, const char *xr, const void *weight,
                                                                    float rs, int64_t h, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    int64_t i = 0;
    for (; i + 16 <= h; i += 16) {
        NAME(f32x16) v = NAME(load16)(xr + i * es, bf16) * rs;
        if (bf16) v = NAME(round_bf16_16)(v);
        NAME(store16)(outr + i * es, NAME(load16)((const char *)weight + i * es, bf16) * v, bf16);
    }
    for (; i < h; i++) {
        float v = NAME(load1)(xr, i, bf16) * rs;
        if (bf16) v = NAME(round_bf16_1)(v);
        NAME(store1)(outr, i, NAME(load1)(weight, i, bf16) * v, bf16);
    }
}

/* RMSNorm, as Hugging Face's Llama: rstd = 1/sqrt(mean(x²) + eps) per row (float32, written to rstd),
 * out = weight · (x·rstd rounded to the dtype). x, out: rows × h; weight: h. */
void NAME(rms_norm)(void *restrict out, float *restrict rstd, const void *restrict x,
                    const void *restrict weight, int64_t rows, int64_t h, float eps, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * h * es;
        rstd[r] = 1.0f / sqrtf(NAME(row_dot)(xr, xr, h, bf16) / (float)h + eps);
        NAME(rms_norm_row)((char *)out + r * h * es, xr, weight, rstd[r], h, bf16);
    }
}

/* rms_norm's output again for the rstd it wrote (the same bits: what backward rebuilds instead of keeping). */
void NAME(rms_norm_apply)(void *restrict out, const float *restrict rstd, const void *restrict x,
                          const void *restrict weight, int64_t rows, int64_t h, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++)
        NAME(rms_norm_row)((char *)out + r * h * es, (const char *)x + r * h * es, weight, rstd[r], h, bf16);
}

/* The input gradient of rms_norm for output gradient grad: with x̂ = x·rstd and ĝ = grad·weight (rounded to
 * the dtype), grad_x = rstd · (ĝ − x̂ · mean(ĝ·x̂)) per row. */
void NAME(rms_norm_backward)(void *restrict grad_x, const void *restrict grad, const void *restrict x,
                             const void *restrict weight, const float *restrict rstd, int64_t rows,
                             int64_t h, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * h * es, *gr = (const char *)grad + r * h * es;
        char *outr = (char *)grad_x + r * h * es;
        const float rs = rstd[r];
        NAME(f32x16) acc = (NAME(f32x16)){0};
        int64_t i = 0;
        for (; i + 16 <= h; i += 16) {
            NAME(f32x16) gh = NAME(load16)(gr + i * es, bf16) * NAME(load16)((const char *)weight + i * es, bf16);
            if (bf16) gh = NAME(round_bf16_16)(gh);
            acc += gh * (NAME(load16)(xr + i * es, bf16) * rs);
        }
        float dot = 0.f;
        for (int l = 0; l < 16; l++) dot += acc[l];
        for (int64_t t = i; t < h; t++) {
            float gh = NAME(load1)(gr, t, bf16) * NAME(load1)(weight, t, bf16);
            if (bf16) gh = NAME(round_bf16_1)(gh);
            dot += gh * (NAME(load1)(xr, t, bf16) * rs);
        }
        const float mean = dot / (float)h;
        for (i = 0; i + 16 <= h; i += 16) {
            NAME(f32x16) gh = NAME(load16)(gr + i * es, bf16) * NAME(load16)((const char *)weight + i * es, bf16);
            if (bf16) gh = NAME(round_bf16_16)(gh);
            NAME(f32x16) xh = NAME(load16)(xr + i * es, bf16) * rs;
            NAME(store16)(outr + i * es, rs * (gh - xh * mean), bf16);
        }
        for (; i < h; i++) {
            float gh = NAME(load1)(gr, i, bf16) * NAME(load1)(weight, i, bf16);
            if (bf16) gh = NAME(round_bf16_1)(gh);
            NAME(store1)(outr, i, rs * (gh - NAME(load1)(xr, i, bf16) * rs * mean), bf16);
        }
    }
}
