/* The Fastfood projection of intrinsic-dimension training (loratune/train/projection.py), compiled once per
 * instruction set by fastfood.c (NAME(n) gives the ISA suffix). Each block of L = 2^k rows of P is
 * s·H·G·Π·H·B (B: signs, H: the Sylvester–Hadamard matrix, Π: a permutation, G·s: the scaled Gaussian
 * diagonal); a block is worked in two L-float buffers that stay in the cache, so P·θ reads θ and writes its D
 * values once, and Pᵀ·g reads g once: PyTorch operations make a dozen passes over D values for the same. */

#include "vec16.h"

/* v with lanes i and i ^ h exchanged (h = 1, 2, 4, 8): one shuffle instruction. */
#if defined(__clang__)
#define NAME_SWAP(v, a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p)                                                \
    __builtin_shufflevector(v, v, a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p)
#else
#define NAME_SWAP(v, a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p)                                                \
    __builtin_shuffle(v, (NAME(i32x16)){a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p})
#endif

/* The 16-point transform of one vector's lanes: each level adds lane i ^ h to lane i, negating lane i where bit h
 * is set (lane i ^ h − lane i). */
static inline __attribute__((always_inline)) NAME(f32x16) NAME(wht16)(NAME(f32x16) v) {
    const NAME(f32x16) s1 = {1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1};
    const NAME(f32x16) s2 = {1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1};
    const NAME(f32x16) s4 = {1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1};
    const NAME(f32x16) s8 = {1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1};
    v = NAME_SWAP(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14) + s1 * v;
    v = NAME_SWAP(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13) + s2 * v;
    v = NAME_SWAP(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11) + s4 * v;
    return NAME_SWAP(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7) + s8 * v;
}

/* v·H_L in place (the unnormalised Walsh–Hadamard transform, natural order; L a power of two). From L = 16 on:
 * the four levels inside each 16-float vector by lane shuffles, then the levels h ≥ 16 two at a time (radix 4) on
 * whole vectors, the last alone when their count is odd; below 16, scalar butterflies. */
static void NAME(fwht)(float *restrict v, int64_t L) {
    if (L < 16) {
        for (int64_t h = 1; h < L; h *= 2)
            for (int64_t base = 0; base < L; base += 2 * h)
                for (int64_t j = base; j < base + h; j++) {
                    const float a = v[j], b = v[j + h];
                    v[j] = a + b;
                    v[j + h] = a - b;
                }
        return;
    }
    typedef NAME(f32x16) vec;
    for (int64_t j = 0; j < L; j += 16) {
        vec x;
        memcpy(&x, v + j, sizeof x);
        x = NAME(wht16)(x);
        memcpy(v + j, &x, sizeof x);
    }
    int64_t h = 16;
    for (; 4 * h <= L; h *= 4)
        for (int64_t base = 0; base < L; base += 4 * h)
            for (int64_t j = base; j < base + h; j += 16) {
                vec a, b, c, e;
                memcpy(&a, v + j, sizeof a);
                memcpy(&b, v + j + h, sizeof b);
                memcpy(&c, v + j + 2 * h, sizeof c);
                memcpy(&e, v + j + 3 * h, sizeof e);
                const vec s0 = a + b, s1 = a - b, s2 = c + e, s3 = c - e;
                a = s0 + s2, b = s1 + s3, c = s0 - s2, e = s1 - s3;
                memcpy(v + j, &a, sizeof a);
                memcpy(v + j + h, &b, sizeof b);
                memcpy(v + j + 2 * h, &c, sizeof c);
                memcpy(v + j + 3 * h, &e, sizeof e);
            }
    if (h < L)
        for (int64_t j = 0; j < h; j += 16) {
            vec a, b;
            memcpy(&a, v + j, sizeof a);
            memcpy(&b, v + j + h, sizeof b);
            const vec s = a + b, t = a - b;
            memcpy(v + j, &s, sizeof s);
            memcpy(v + j + h, &t, sizeof t);
        }
}

/* Blocks first..first+count-1. Forward (transpose 0): out[k·L + i] = (P·x)[k·L + i] for x = θ (d values), the
 * rows below D. Transpose 1: out[0..d) += Σ_k (P_kᵀ·g_k) for x = g (D values; rows from D on are zero). buf,
 * tmp: L floats each. */
void NAME(fastfood_blocks)(float *out, const float *x, const int8_t *signs, const int32_t *perm, const float *gs,
                           int64_t d, int64_t L, int64_t D, int64_t first, int64_t count, float *buf, float *tmp,
                           int transpose) {
    for (int64_t k = first; k < first + count; k++) {
        const int8_t *sign = signs + k * L;
        const int32_t *pi = perm + k * L;
        const float *g = gs + k * L;
        const int64_t rows = D - k * L < L ? D - k * L : L;
        if (!transpose) {
            for (int64_t i = 0; i < d; i++) buf[i] = sign[i] * x[i];
            for (int64_t i = d; i < L; i++) buf[i] = 0.0f;
            NAME(fwht)(buf, L);
            for (int64_t i = 0; i < L; i++) tmp[i] = buf[pi[i]] * g[i];
            NAME(fwht)(tmp, L);
            memcpy(out + k * L, tmp, (size_t)rows * sizeof(float));
        } else {
            memcpy(buf, x + k * L, (size_t)rows * sizeof(float));
            for (int64_t i = rows; i < L; i++) buf[i] = 0.0f;
            NAME(fwht)(buf, L);
            for (int64_t i = 0; i < L; i++) tmp[pi[i]] = buf[i] * g[i];
            NAME(fwht)(tmp, L);
            for (int64_t i = 0; i < d; i++) out[i] += sign[i] * tmp[i];
        }
    }
}
