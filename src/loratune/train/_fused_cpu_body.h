/* The training kernels, compiled once per instruction set by _fused_cpu.c (NAME(n) gives the ISA suffix).
 * Every function takes bf16 or float32 tensors (``bf16`` says which), computes in float32 and rounds where
 * the PyTorch code it replaces rounds (see loratune/train/fused_ops.py), so results agree with it up to the
 * order of float32 sums. */

#include "../_vec16.h"

/* silu(g) = g / (1 + exp(-g)) */
static inline __attribute__((always_inline)) NAME(f32x16) NAME(silu16)(NAME(f32x16) g) {
    return g / (1.0f + NAME(exp16)(-g));
}

/* out = silu(gate) * up, silu rounded to the tensors' dtype first (as F.silu(gate) * up does). */
static void NAME(silu_mul)(void *restrict out, const void *restrict gate, const void *restrict up, int64_t n,
                           int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        NAME(f32x16) s = NAME(silu16)(NAME(load16)((const char *)gate + i * es, bf16));
        if (bf16) s = NAME(round_bf16_16)(s);
        NAME(store16)((char *)out + i * es, s * NAME(load16)((const char *)up + i * es, bf16), bf16);
    }
    for (; i < n; i++) {
        float g = NAME(load1)(gate, i, bf16);
        float s = g / (1.0f + NAME(exp1)(-g));
        if (bf16) s = NAME(round_bf16_1)(s);
        NAME(store1)(out, i, s * NAME(load1)(up, i, bf16), bf16);
    }
}

/* Gradients of silu(gate) * up for the output gradient grad: grad_up = grad·g·σ(g),
 * grad_gate = grad·up·σ(g)·(1 + g·(1 − σ(g))), in that order of float32 products. The outputs may be the
 * inputs' own memory (each block of 16 is read before it is written), so no restrict here. */
static void NAME(silu_mul_backward)(void *grad_gate, void *grad_up, const void *gate, const void *up,
                                    const void *grad, int64_t n, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        NAME(f32x16) g = NAME(load16)((const char *)gate + i * es, bf16);
        NAME(f32x16) u = NAME(load16)((const char *)up + i * es, bf16);
        NAME(f32x16) d = NAME(load16)((const char *)grad + i * es, bf16);
        NAME(f32x16) sig = 1.0f / (1.0f + NAME(exp16)(-g));
        NAME(store16)((char *)grad_up + i * es, d * g * sig, bf16);
        NAME(store16)((char *)grad_gate + i * es, d * u * sig * (1.0f + g * (1.0f - sig)), bf16);
    }
    for (; i < n; i++) {
        float g = NAME(load1)(gate, i, bf16), u = NAME(load1)(up, i, bf16), d = NAME(load1)(grad, i, bf16);
        float sig = 1.0f / (1.0f + NAME(exp1)(-g));
        NAME(store1)(grad_up, i, d * g * sig, bf16);
        NAME(store1)(grad_gate, i, d * u * sig * (1.0f + g * (1.0f - sig)), bf16);
    }
}

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
static void NAME(rms_norm)(void *restrict out, float *restrict rstd, const void *restrict x,
                           const void *restrict weight, int64_t rows, int64_t h, float eps, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * h * es;
        rstd[r] = 1.0f / sqrtf(NAME(row_dot)(xr, xr, h, bf16) / (float)h + eps);
        NAME(rms_norm_row)((char *)out + r * h * es, xr, weight, rstd[r], h, bf16);
    }
}

/* rms_norm's output again for the rstd it wrote (the same bits: what backward rebuilds instead of keeping). */
static void NAME(rms_norm_apply)(void *restrict out, const float *restrict rstd, const void *restrict x,
                                 const void *restrict weight, int64_t rows, int64_t h, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++)
        NAME(rms_norm_row)((char *)out + r * h * es, (const char *)x + r * h * es, weight, rstd[r], h, bf16);
}

/* The input gradient of rms_norm for output gradient grad: with x̂ = x·rstd and ĝ = grad·weight (rounded to
 * the dtype), grad_x = rstd · (ĝ − x̂ · mean(ĝ·x̂)) per row. */
static void NAME(rms_norm_backward)(void *restrict grad_x, const void *restrict grad, const void *restrict x,
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

/* Dropout's mask as a pure function of (seed, element index): a counter-based hash, so any split of the work
 * over threads gives the same mask and the backward pass regenerates it instead of storing it. Element i is
 * kept when mix(mix(i_lo ^ seed_lo) + (seed_hi ^ i_hi)) < keep_below (a 32-bit threshold: P(keep) = keep_below
 * / 2^32), mix being murmur3's 32-bit finalizer. out = keep ? x·scale : 0; applied to the output gradient with
 * the same seed it is the input gradient. */
static inline __attribute__((always_inline)) NAME(u32x16) NAME(mix16)(NAME(u32x16) h) {
    h ^= h >> 16;
    h *= 0x7feb352dU;
    h ^= h >> 15;
    h *= 0x846ca68bU;
    h ^= h >> 16;
    return h;
}

static void NAME(dropout)(void *out, const void *x, int64_t first, int64_t n, uint64_t seed, uint32_t keep_below,
                          float scale, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    const uint32_t seed_lo = (uint32_t)seed, seed_hi = (uint32_t)(seed >> 32);
    const NAME(u32x16) lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t i = 0; i < n; i += 16) {
        uint64_t at = (uint64_t)(first + i);
        NAME(u32x16) index = (uint32_t)at + lanes;  /* a block of 16 never crosses a 2^32 boundary: first % 16 == 0 */
        NAME(u32x16) h = NAME(mix16)(NAME(mix16)(index ^ seed_lo) + (seed_hi ^ (uint32_t)(at >> 32)));
        if (i + 16 <= n) {
            NAME(u32x16) keep = (NAME(u32x16))(h < keep_below);
            NAME(f32x16) v = NAME(load16)((const char *)x + i * es, bf16) * scale;
            NAME(store16)((char *)out + i * es, (NAME(f32x16))((NAME(u32x16))v & keep), bf16);
        } else {  /* the last few elements: the same hashes, one at a time */
            for (int64_t k = i; k < n; k++)
                NAME(store1)(out, k, h[k - i] < keep_below ? NAME(load1)(x, k, bf16) * scale : 0.0f, bf16);
        }
    }
}
