/* silu(gate)·up and its gradients, one pass over memory each, compiled once per instruction set by silu_mul.c
 * (NAME(n) gives the ISA suffix). bf16 or float32 tensors (``bf16`` says which), float32 arithmetic, rounded where
 * the PyTorch code it replaces rounds (loratune/train/fused_ops.py). */

#include "vec16.h"

/* σ(g) = 1 / (1 + exp(-g)), from e = exp(-|g|) (at most 1, so 1 + e never overflows): 1/(1 + e) for g ≥ 0,
 * e/(1 + e) below. With AVX-512 the reciprocal is a 14-bit estimate and one Newton step (float32 accuracy, a
 * fraction of a division's time). */
static inline __attribute__((always_inline)) NAME(f32x16) NAME(sigmoid16)(NAME(f32x16) g) {
    const NAME(f32x16) zero = (NAME(f32x16)){0};
    NAME(f32x16) e = NAME(exp16)(NAME(select16)(g < zero, g, -g)), d = 1.0f + e, r;
#ifdef __AVX512F__
    __m512 dm, rm;
    memcpy(&dm, &d, 64);
    rm = _mm512_rcp14_ps(dm);
    memcpy(&r, &rm, 64);
    r = r * (2.0f - d * r);
#else
    r = 1.0f / d;
#endif
    return NAME(select16)(g < zero, e * r, r);
}

/* silu(g) = g·σ(g) */
static inline __attribute__((always_inline)) NAME(f32x16) NAME(silu16)(NAME(f32x16) g) {
    return g * NAME(sigmoid16)(g);
}

/* out = silu(gate) * up, silu rounded to the tensors' dtype first (as F.silu(gate) * up does). */
void NAME(silu_mul)(void *restrict out, const void *restrict gate, const void *restrict up, int64_t n,
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
void NAME(silu_mul_backward)(void *grad_gate, void *grad_up, const void *gate, const void *up,
                             const void *grad, int64_t n, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        NAME(f32x16) g = NAME(load16)((const char *)gate + i * es, bf16);
        NAME(f32x16) u = NAME(load16)((const char *)up + i * es, bf16);
        NAME(f32x16) d = NAME(load16)((const char *)grad + i * es, bf16);
        NAME(f32x16) sig = NAME(sigmoid16)(g);
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
