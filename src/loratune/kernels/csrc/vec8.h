/* 8-float vectors for the kernels that keep several accumulators in registers (the few-row products of
 * linear_rows_body.h and lowrank_body.h). Included after vec16.h by each kernel body once per instruction set,
 * inside its NAME(n) (no include guard, as vec16.h). Eight floats are one AVX2 register: sixteen-float vectors
 * are two registers each on AVX2, and GCC keeps arrays or several of them on the stack, at half the speed. */

typedef float NAME(f32x8) __attribute__((vector_size(32)));
typedef uint16_t NAME(u16x8) __attribute__((vector_size(16)));
typedef uint32_t NAME(u32x8) __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) NAME(f32x8) NAME(load8)(const void *p, int bf16) {
    NAME(f32x8) f;
    if (bf16) {
        NAME(u16x8) h;
        memcpy(&h, p, 16);
        NAME(u32x8) u = __builtin_convertvector(h, NAME(u32x8)) << 16;
        memcpy(&f, &u, 32);
    } else {
        memcpy(&f, p, 32);
    }
    return f;
}

/* Stores eight floats, rounded to bf16 (to nearest even, NaN kept) when bf16. */
static inline __attribute__((always_inline)) void NAME(store8)(void *p, NAME(f32x8) f, int bf16) {
    if (bf16) {
        for (int l = 0; l < 8; l++) ((uint16_t *)p)[l] = NAME(f32_to_bf16)(f[l]);
    } else {
        memcpy(p, &f, 32);
    }
}

static inline __attribute__((always_inline)) float NAME(lanes_sum8)(NAME(f32x8) v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
