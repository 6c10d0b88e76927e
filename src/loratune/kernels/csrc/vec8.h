/* 8-float vectors for the kernels that keep several accumulators in registers (the few-row products of
 * linear_rows_body.h and lowrank_body.h). Included after vec16.h by each kernel body once per instruction set,
 * inside its NAME(n) (no include guard, as vec16.h). Eight floats are one AVX2 register: sixteen-float vectors
 * are two registers each on AVX2, and GCC keeps arrays or several of them on the stack, at half the speed. */

typedef float NAME(f32x8) __attribute__((vector_size(32)));
typedef uint16_t NAME(u16x8) __attribute__((vector_size(16)));
typedef uint32_t NAME(u32x8) __attribute__((vector_size(32)));
typedef int32_t NAME(i32x8) __attribute__((vector_size(32)));

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

/* Stores eight floats, rounded to bf16 (to nearest even, NaN kept: f32_to_bf16 on every lane, as vector
 * operations) when bf16. */
static inline __attribute__((always_inline)) void NAME(store8)(void *p, NAME(f32x8) f, int bf16) {
    if (bf16) {
        NAME(u32x8) u;
        memcpy(&u, &f, 32);
        const NAME(u32x8) rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        /* NaN: |u| above infinity's bits (both below 2^31, so a signed comparison, which AVX2 has, gives it) */
        const NAME(u32x8) is_nan = (NAME(u32x8))((NAME(i32x8))(u & 0x7fffffffu) > (NAME(i32x8)){0} + 0x7f800000);
        const NAME(u32x8) bits = (((u >> 16) | 0x40u) & is_nan) | (rounded & ~is_nan);
        const NAME(u16x8) h = __builtin_convertvector(bits, NAME(u16x8));
        memcpy(p, &h, 16);
    } else {
        memcpy(p, &f, 32);
    }
}

static inline __attribute__((always_inline)) float NAME(lanes_sum8)(NAME(f32x8) v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

typedef float NAME(f32x4) __attribute__((vector_size(16)));

/* lanes_sum8 of four vectors at once, summed in the same order (so the same bits), in eight vector operations
 * instead of about thirty scalar ones. */
static inline __attribute__((always_inline)) NAME(f32x4)
    NAME(lanes_sum8x4)(NAME(f32x8) a, NAME(f32x8) b, NAME(f32x8) c, NAME(f32x8) d) {
#define HALVES(v) (__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7))
    const NAME(f32x4) sa = HALVES(a), sb = HALVES(b), sc = HALVES(c), sd = HALVES(d);
#undef HALVES
    const NAME(f32x4) ab = __builtin_shufflevector(sa, sb, 0, 2, 4, 6) + __builtin_shufflevector(sa, sb, 1, 3, 5, 7);
    const NAME(f32x4) cd = __builtin_shufflevector(sc, sd, 0, 2, 4, 6) + __builtin_shufflevector(sc, sd, 1, 3, 5, 7);
    return __builtin_shufflevector(ab, cd, 0, 2, 4, 6) + __builtin_shufflevector(ab, cd, 1, 3, 5, 7);
}

/* v, kept in a register: GCC otherwise folds a load that feeds two products into both as memory operands,
 * loading it twice, and the loop is then bound by loads rather than by its products. */
static inline __attribute__((always_inline)) NAME(f32x8) NAME(in_register)(NAME(f32x8) v) {
#if defined(__AVX512F__)
    __asm__("" : "+v"(v));
#elif defined(__AVX__)
    __asm__("" : "+x"(v));
#endif
    return v;
}
