/* silu(gate)·up and its gradients, one pass over memory each, compiled once per instruction set by silu_mul.c
 * (NAME(n) gives the ISA suffix). bf16 or float32 tensors (``bf16`` says which), float32 arithmetic, rounded where
 * the PyTorch code it replaces rounds (loratune/train/fused_ops.py). */

#include "vec16.h"

/* σ(g) = 1 / (1 + exp(-g)), from e = exp(-|g|) (at most 1, so 1 + e never overflows): 1/(1 + e) for g ≥ 0,
 * e/(1 + e) below. With AVX-512 the reciprocal is a 14-bit estimate and one Newton step (float32 accuracy, a
 * fraction of a division's time). */
static inline __attribute__((always_inline)) NAME(f32x16) NAME(sigmoid16)(NAME(f32x16) g) {
    const NAME(f32x16) zero = (NAME(f32x16)){0};
    NAME(f32x16) e = NAME(exp16)(NAME(select16)(NAME(less16)(g, zero), g, -g)), d = 1.0f + e, r;
#ifdef __AVX512F__
    __m512 dm, rm;
    memcpy(&dm, &d, 64);
    rm = _mm512_rcp14_ps(dm);
    memcpy(&r, &rm, 64);
    r = r * (2.0f - d * r);
#else
    r = 1.0f / d;
#endif
    return NAME(select16)(NAME(less16)(g, zero), e * r, r);
}

/* silu(g) = g·σ(g) */
static inline __attribute__((always_inline)) NAME(f32x16) NAME(silu16)(NAME(f32x16) g) {
    return g * NAME(sigmoid16)(g);
}

#ifndef __AVX512F__
/* Without AVX-512: eight lanes at a time, which AVX2 holds in one register and compares in one instruction (the
 * sixteen-lane code above compiles there into two registers' worth of shuffles through memory). */
static inline __attribute__((always_inline)) NAME(f32h) NAME(load8h)(const void *p, int bf16) {
    NAME(f32h) f;
    if (bf16) {
        uint16_t h[8];
        memcpy(h, p, 16);
        NAME(u32h) u = {h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]};
        u <<= 16;
        memcpy(&f, &u, 32);
    } else {
        memcpy(&f, p, 32);
    }
    return f;
}

/* f rounded to bf16 (to nearest even, NaN kept quiet) and back to float32: what storing and reading gives. */
static inline __attribute__((always_inline)) NAME(f32h) NAME(round_bf16_8h)(NAME(f32h) f) {
    NAME(u32h) u;
    memcpy(&u, &f, 32);
    NAME(u32h) rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    /* both sides below 2^31: a signed comparison, which AVX2 has, gives the unsigned one */
    NAME(u32h) is_nan = (NAME(u32h))((NAME(i32h))(u & 0x7fffffffu) > 0x7f800000);
    NAME(u32h) bits = ((u | 0x400000u) & 0xffff0000u & is_nan) | (rounded & ~is_nan);
    memcpy(&f, &bits, 32);
    return f;
}

static inline __attribute__((always_inline)) void NAME(store8h)(void *p, NAME(f32h) f, int bf16) {
    if (bf16) {
        NAME(u32h) u;
        f = NAME(round_bf16_8h)(f);
        memcpy(&u, &f, 32);
        for (int l = 0; l < 8; l++) ((uint16_t *)p)[l] = (uint16_t)(u[l] >> 16);
    } else {
        memcpy(p, &f, 32);
    }
}

static inline __attribute__((always_inline)) NAME(f32h) NAME(sigmoid8h)(NAME(f32h) g) {
    const NAME(f32h) zero = (NAME(f32h)){0};
    const NAME(i32h) negative = g < zero;
    const NAME(f32h) e = NAME(exp8h)(NAME(select8h)(negative, g, -g)), r = 1.0f / (1.0f + e);
    return NAME(select8h)(negative, e * r, r);
}
#endif

/* out = silu(gate) * up, silu rounded to the tensors' dtype first (as F.silu(gate) * up does). */
void NAME(silu_mul)(void *restrict out, const void *restrict gate, const void *restrict up, int64_t n,
                    int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) {
        NAME(f32x16) s = NAME(silu16)(NAME(load16)((const char *)gate + i * es, bf16));
        if (bf16) s = NAME(round_bf16_16)(s);
        NAME(store16)((char *)out + i * es, s * NAME(load16)((const char *)up + i * es, bf16), bf16);
    }
#else
    for (; i + 8 <= n; i += 8) {
        const NAME(f32h) g = NAME(load8h)((const char *)gate + i * es, bf16);
        NAME(f32h) s = g * NAME(sigmoid8h)(g);
        if (bf16) s = NAME(round_bf16_8h)(s);
        NAME(store8h)((char *)out + i * es, s * NAME(load8h)((const char *)up + i * es, bf16), bf16);
    }
#endif
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
void NAME(silu_mul_backward)(void *grad_gate, void *grad_up, const void *gate, const void *up,
                             const void *grad, int64_t n, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) {
        NAME(f32x16) g = NAME(load16)((const char *)gate + i * es, bf16);
        NAME(f32x16) u = NAME(load16)((const char *)up + i * es, bf16);
        NAME(f32x16) d = NAME(load16)((const char *)grad + i * es, bf16);
        NAME(f32x16) sig = NAME(sigmoid16)(g);
        NAME(store16)((char *)grad_up + i * es, d * g * sig, bf16);
        NAME(store16)((char *)grad_gate + i * es, d * u * sig * (1.0f + g * (1.0f - sig)), bf16);
    }
#else
    for (; i + 8 <= n; i += 8) {
        const NAME(f32h) g = NAME(load8h)((const char *)gate + i * es, bf16);
        const NAME(f32h) u = NAME(load8h)((const char *)up + i * es, bf16);
        const NAME(f32h) d = NAME(load8h)((const char *)grad + i * es, bf16);
        const NAME(f32h) sig = NAME(sigmoid8h)(g);
        NAME(store8h)((char *)grad_up + i * es, d * g * sig, bf16);
        NAME(store8h)((char *)grad_gate + i * es, d * u * sig * (1.0f + g * (1.0f - sig)), bf16);
    }
#endif
    for (; i < n; i++) {
        float g = NAME(load1)(gate, i, bf16), u = NAME(load1)(up, i, bf16), d = NAME(load1)(grad, i, bf16);
        float sig = 1.0f / (1.0f + NAME(exp1)(-g));
        NAME(store1)(grad_up, i, d * g * sig, bf16);
        NAME(store1)(grad_gate, i, d * u * sig * (1.0f + g * (1.0f - sig)), bf16);
    }
}
