/* Rotary position embedding (RoPE, the rotate-half form of Llama-family models) applied to queries and keys in
 * one pass, compiled once per instruction set by rope.c (NAME(n) gives the ISA suffix). bf16 or float32 tensors,
 * rounded where transformers' apply_rotary_pos_emb rounds: x·cos and rotate_half(x)·sin each rounded to the dtype,
 * then their sum; no fused multiply-add, so that float32 gives its bits too. */

#include "vec16.h"

/* Stores sixteen floats, rounded to bf16 as store1 rounds (denormals kept, which AVX512-BF16's conversion would
 * flush) when bf16. */
static inline __attribute__((always_inline)) void NAME(store_rounded16)(char *p, NAME(f32x16) f, int bf16) {
    if (!bf16) {
        memcpy(p, &f, 64);
        return;
    }
    const NAME(f32x16) rounded = NAME(round_bf16_16)(f);
    NAME(u32x16) u;
    memcpy(&u, &rounded, 64);
    const NAME(u16x16) h = __builtin_convertvector(u >> 16, NAME(u16x16));
    memcpy(p, &h, 32);
}

/* out[r, h, :] = x[r, h, :]·cos[r, :] + rotate_half(x[r, h, :])·sin[r, :] for `heads` heads of `dim` elements
 * (dim even) in each of rows [begin, end); x, out (rows × heads × dim) and cos, sin (rows × dim) contiguous.
 * Sixteen pairs at a time, the same operations lane by lane, then the rest one by one. */
static __attribute__((optimize("fp-contract=off"))) void NAME(rope_rows)(
    char *restrict out, const char *restrict x, const char *restrict cos, const char *restrict sin, int64_t heads,
    int64_t dim, int64_t begin, int64_t end, int bf16) {
    const int64_t es = bf16 ? 2 : 4, half = dim / 2;
    for (int64_t r = begin; r < end; r++) {
        const char *c = cos + r * dim * es, *s = sin + r * dim * es;
        for (int64_t h = 0; h < heads; h++) {
            const int64_t at = (r * heads + h) * dim;
            const char *xr = x + at * es;
            char *o = out + at * es;
            int64_t i = 0;
            for (; i + 16 <= half; i += 16) {
                const NAME(f32x16) x1 = NAME(load16)(xr + i * es, bf16), x2 = NAME(load16)(xr + (i + half) * es, bf16);
                NAME(f32x16) a = x1 * NAME(load16)(c + i * es, bf16), b = -x2 * NAME(load16)(s + i * es, bf16);
                NAME(f32x16) p = x2 * NAME(load16)(c + (i + half) * es, bf16);
                NAME(f32x16) q = x1 * NAME(load16)(s + (i + half) * es, bf16);
                if (bf16) {
                    a = NAME(round_bf16_16)(a), b = NAME(round_bf16_16)(b);
                    p = NAME(round_bf16_16)(p), q = NAME(round_bf16_16)(q);
                }
                NAME(store_rounded16)(o + i * es, a + b, bf16);
                NAME(store_rounded16)(o + (i + half) * es, p + q, bf16);
            }
            for (; i < half; i++) {
                const float x1 = NAME(load1)(xr, i, bf16), x2 = NAME(load1)(xr, i + half, bf16);
                float a = x1 * NAME(load1)(c, i, bf16), b = -x2 * NAME(load1)(s, i, bf16);
                float p = x2 * NAME(load1)(c, i + half, bf16), q = x1 * NAME(load1)(s, i + half, bf16);
                if (bf16) {
                    a = NAME(round_bf16_1)(a), b = NAME(round_bf16_1)(b);
                    p = NAME(round_bf16_1)(p), q = NAME(round_bf16_1)(q);
                }
                NAME(store1)(o, i, a + b, bf16);
                NAME(store1)(o, i + half, p + q, bf16);
            }
        }
    }
}

void NAME(rope)(void *q_out, const void *q, int64_t q_heads, void *k_out, const void *k, int64_t k_heads,
                const void *cos, const void *sin, int64_t dim, int64_t begin, int64_t end, int bf16) {
    NAME(rope_rows)(q_out, q, cos, sin, q_heads, dim, begin, end, bf16);
    NAME(rope_rows)(k_out, k, cos, sin, k_heads, dim, begin, end, bf16);
}
