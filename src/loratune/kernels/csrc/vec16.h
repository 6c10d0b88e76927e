/* 16-float vectors and bf16 conversions shared by loratune's CPU kernels. Included by each kernel body once
 * per instruction set, inside a NAME(n) that gives every symbol that set's suffix (no include guard: each
 * inclusion defines a differently named copy). The vector width is fixed at 16 floats; the compiler lowers it
 * to one AVX-512 register, two AVX2 registers or four SSE registers. */

typedef float NAME(f32x16) __attribute__((vector_size(64)));
typedef uint32_t NAME(u32x16) __attribute__((vector_size(64)));
typedef uint16_t NAME(u16x16) __attribute__((vector_size(32)));
typedef int32_t NAME(i32x16) __attribute__((vector_size(64)));

/* Lane-wise comparisons as masks (every bit set where true). Without AVX-512 a 16-lane comparison has no
 * instruction of its own, and GCC compares such a vector lane by lane in scalar code (several times the time of
 * the whole kernel around it); there the two halves are compared as eight-lane vectors, which AVX2 compares in
 * one instruction each. Kernels compare through these, never with a bare < on 16 lanes. */
typedef float NAME(f32h) __attribute__((vector_size(32)));
typedef int32_t NAME(i32h) __attribute__((vector_size(32)));
typedef uint32_t NAME(u32h) __attribute__((vector_size(32)));

#ifndef __AVX512F__
#define VEC16_SPLIT(type, v, lo, hi)                                                                                   \
    type lo, hi;                                                                                                       \
    memcpy(&lo, &(v), 32);                                                                                             \
    memcpy(&hi, (const char *)&(v) + 32, 32)

static inline __attribute__((always_inline)) NAME(i32x16) NAME(join16)(NAME(i32h) lo, NAME(i32h) hi) {
    NAME(i32x16) r;
    memcpy(&r, &lo, 32);
    memcpy((char *)&r + 32, &hi, 32);
    return r;
}
#endif

/* a < b, lane by lane (floats). */
static inline __attribute__((always_inline)) NAME(i32x16) NAME(less16)(NAME(f32x16) a, NAME(f32x16) b) {
#ifdef __AVX512F__
    return a < b;
#else
    VEC16_SPLIT(NAME(f32h), a, a0, a1);
    VEC16_SPLIT(NAME(f32h), b, b0, b1);
    return NAME(join16)(a0 < b0, a1 < b1);
#endif
}

/* a < b, lane by lane (signed integers). */
static inline __attribute__((always_inline)) NAME(i32x16) NAME(less16_i32)(NAME(i32x16) a, NAME(i32x16) b) {
#ifdef __AVX512F__
    return a < b;
#else
    VEC16_SPLIT(NAME(i32h), a, a0, a1);
    VEC16_SPLIT(NAME(i32h), b, b0, b1);
    return NAME(join16)(a0 < b0, a1 < b1);
#endif
}

/* a < b, lane by lane (unsigned integers): AVX2 compares signed integers only, and flipping both sign bits turns
 * the unsigned order into the signed one. */
static inline __attribute__((always_inline)) NAME(i32x16) NAME(less16_u32)(NAME(u32x16) a, NAME(u32x16) b) {
    const NAME(u32x16) sign = (NAME(u32x16)){0} + 0x80000000u;
    return NAME(less16_i32)((NAME(i32x16))(a ^ sign), (NAME(i32x16))(b ^ sign));
}


static inline __attribute__((always_inline)) float NAME(bf16_to_f32)(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch does; NaN stays a (quiet) NaN. */
static inline __attribute__((always_inline)) uint16_t NAME(f32_to_bf16)(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

/* Which lanes of u (a float's bits) hold a NaN: |u| above infinity's bits, both below 2^31, so a signed comparison
 * (which AVX2 has) gives it. */
static inline __attribute__((always_inline)) NAME(i32x16) NAME(nan_bits16)(NAME(u32x16) u) {
    return NAME(less16_i32)((NAME(i32x16)){0} + 0x7f800000, (NAME(i32x16))(u & 0x7fffffffu));
}

static inline __attribute__((always_inline)) NAME(f32x16) NAME(load16)(const void *p, int bf16) {
    NAME(f32x16) f;
    if (bf16) {
#ifdef __AVX512BW__
        __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
        memcpy(&f, &u, 64);
#else
        NAME(u16x16) h;
        memcpy(&h, p, 32);
        NAME(u32x16) u = __builtin_convertvector(h, NAME(u32x16)) << 16;
        memcpy(&f, &u, 64);
#endif
    } else {
        memcpy(&f, p, 64);
    }
    return f;
}

static inline __attribute__((always_inline)) void NAME(store16)(void *p, NAME(f32x16) f, int bf16) {
#ifdef __AVX512BF16__
    if (bf16) {  /* one rounding instruction (it reads float32 denormals as zero) */
        __m512 v;
        memcpy(&v, &f, 64);
        const __m256bh h = _mm512_cvtneps_pbh(v);
        memcpy(p, &h, 32);
        return;
    }
#endif
    if (bf16) {
        NAME(u32x16) u;
        memcpy(&u, &f, 64);
        NAME(u32x16) rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        NAME(u32x16) is_nan = (NAME(u32x16))NAME(nan_bits16)(u);
        NAME(u32x16) bits = (((u >> 16) | 0x40u) & is_nan) | (rounded & ~is_nan);
#ifdef __AVX512BW__
        __m512i b;
        memcpy(&b, &bits, 64);
        _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(b));
#else
        NAME(u16x16) h = __builtin_convertvector(bits, NAME(u16x16));
        memcpy(p, &h, 32);
#endif
    } else {
        memcpy(p, &f, 64);
    }
}

static inline __attribute__((always_inline)) float NAME(load1)(const void *p, int64_t i, int bf16) {
    return bf16 ? NAME(bf16_to_f32)(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void NAME(store1)(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = NAME(f32_to_bf16)(v);
    else ((float *)p)[i] = v;
}


static inline __attribute__((always_inline)) NAME(f32x16) NAME(select16)(NAME(i32x16) mask, NAME(f32x16) a,
                                                                     NAME(f32x16) b) {
    NAME(i32x16) ai, bi, r;
    memcpy(&ai, &a, 64);
    memcpy(&bi, &b, 64);
    r = (ai & mask) | (bi & ~mask);
    NAME(f32x16) f;
    memcpy(&f, &r, 64);
    return f;
}

/* exp(x) with Cephes' single-precision polynomial (relative error below 2e-7); NaN stays NaN, it overflows to
 * +inf above 88.72 and gives 0 below -88.72 (no denormal results, as PyTorch's vectorized exp). With AVX-512,
 * n is rounded in one instruction and 2^n applied with scalef; elsewhere 2^n is built from its bits (there,
 * between 88.38 and 88.72 it gives exp(88.38), which only a sigmoid ever sees), eight lanes at a time (see
 * less16). */
#ifndef __AVX512F__
static inline __attribute__((always_inline)) NAME(f32h) NAME(select8h)(NAME(i32h) mask, NAME(f32h) a, NAME(f32h) b) {
    NAME(i32h) ai, bi, r;
    memcpy(&ai, &a, 32);
    memcpy(&bi, &b, 32);
    r = (ai & mask) | (bi & ~mask);
    NAME(f32h) f;
    memcpy(&f, &r, 32);
    return f;
}

static inline __attribute__((always_inline)) NAME(f32h) NAME(exp8h)(NAME(f32h) x) {
    const NAME(f32h) zero = (NAME(f32h)){0};
    const float bound = 88.3762626647949f;
    const NAME(f32h) inf = zero + __builtin_inff();
    NAME(i32h) is_nan = x != x, over = x > 88.7228391f, under = x < -88.7228391f;
    NAME(f32h) c = NAME(select8h)(x > bound, zero + bound, NAME(select8h)(x < -bound, zero - bound, x));
    NAME(f32h) fx = c * 1.44269504088896341f + 0.5f;
    NAME(i32h) n = __builtin_convertvector(fx, NAME(i32h)); /* toward zero: fix up to floor below */
    n += (NAME(i32h))(__builtin_convertvector(n, NAME(f32h)) > fx);
    NAME(f32h) nf = __builtin_convertvector(n, NAME(f32h));
    c = c - nf * 0.693359375f;
    c = c - nf * -2.12194440e-4f;
    NAME(f32h) y = zero + 1.9875691500e-4f;
    y = y * c + 1.3981999507e-3f;
    y = y * c + 8.3334519073e-3f;
    y = y * c + 4.1665795894e-2f;
    y = y * c + 1.6666665459e-1f;
    y = y * c + 5.0000001201e-1f;
    y = y * (c * c) + c + 1.0f;
    NAME(i32h) bits = (n + 127) << 23;
    NAME(f32h) scale;
    memcpy(&scale, &bits, 32);
    y = NAME(select8h)(over, inf, NAME(select8h)(under, zero, y * scale));
    return NAME(select8h)(is_nan, x, y);
}
#endif

static inline __attribute__((always_inline)) NAME(f32x16) NAME(exp16)(NAME(f32x16) x) {
#ifdef __AVX512F__
    const NAME(f32x16) zero = (NAME(f32x16)){0};
    __m512 v, n;
    memcpy(&v, &x, 64);
    v = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), v));  /* NaN passes through */
    n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    NAME(f32x16) c, nf;
    memcpy(&c, &v, 64);
    memcpy(&nf, &n, 64);
    c = c - nf * 0.693359375f;
    c = c - nf * -2.12194440e-4f;
    NAME(f32x16) y = zero + 1.9875691500e-4f;
    y = y * c + 1.3981999507e-3f;
    y = y * c + 8.3334519073e-3f;
    y = y * c + 4.1665795894e-2f;
    y = y * c + 1.6666665459e-1f;
    y = y * c + 5.0000001201e-1f;
    y = y * (c * c) + c + 1.0f;
    __m512 r;
    memcpy(&r, &y, 64);
    r = _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(-88.7228391f), _CMP_NLT_UQ), r, n);
    memcpy(&y, &r, 64);
    return y;
#else
    VEC16_SPLIT(NAME(f32h), x, lo, hi);
    lo = NAME(exp8h)(lo);
    hi = NAME(exp8h)(hi);
    NAME(f32x16) y;
    memcpy(&y, &lo, 32);
    memcpy((char *)&y + 32, &hi, 32);
    return y;
#endif
}

static inline __attribute__((always_inline)) float NAME(exp1)(float x) {
    NAME(f32x16) v = (NAME(f32x16)){0} + x;
    return NAME(exp16)(v)[0];
}

/* x rounded to bf16 and back (what storing a bf16 tensor and reading it again gives). */
static inline __attribute__((always_inline)) NAME(f32x16) NAME(round_bf16_16)(NAME(f32x16) f) {
    NAME(u32x16) u;
    memcpy(&u, &f, 64);
    NAME(u32x16) rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    NAME(u32x16) is_nan = (NAME(u32x16))NAME(nan_bits16)(u);
    NAME(u32x16) bits = ((u | 0x400000u) & 0xffff0000u & is_nan) | (rounded & ~is_nan);
    memcpy(&f, &bits, 64);
    return f;
}

static inline __attribute__((always_inline)) float NAME(round_bf16_1)(float f) {
    return NAME(bf16_to_f32)(NAME(f32_to_bf16)(f));
}
