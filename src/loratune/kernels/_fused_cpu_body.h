/* The training kernels, compiled once per instruction set by _fused_cpu.c (NAME(n) gives the ISA suffix).
 * Every function takes bf16 or float32 tensors (``bf16`` says which), computes in float32 and rounds where
 * the PyTorch code it replaces rounds (see loratune/train/fused_ops.py), so results agree with it up to the
 * order of float32 sums. */

#include "_vec16.h"

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

/* A tile of 4 query rows × NV·16 keys of a product x·yᵀ in float32: acc[t][v] = Σ_c x[t][c]·yt[c][j0 + 16v + lane],
 * x[t] a row of head_dim floats, yt the other factor transposed (head_dim rows of lp floats). */
static inline __attribute__((always_inline)) void NAME(tile_product)(NAME(f32x16) acc[4][4], const float *const *x,
                                                                    const float *yt, int64_t lp, int64_t j0,
                                                                    int64_t head_dim, const int NV) {
    for (int t = 0; t < 4; t++)
        for (int v = 0; v < NV; v++) acc[t][v] = (NAME(f32x16)){0};
    for (int64_t c = 0; c < head_dim; c++) {
        NAME(f32x16) y[4];
        for (int v = 0; v < NV; v++) memcpy(&y[v], yt + c * lp + j0 + 16 * v, 64);
        for (int t = 0; t < 4; t++) {
            const float xs = x[t][c];
            for (int v = 0; v < NV; v++) acc[t][v] += xs * y[v];
        }
    }
}

#ifdef __AVX512BF16__
/* tile_product for bf16 x rows and yt in pairs ([head_dim/2][lp][2]: the two bf16 of dimensions 2c, 2c+1 of each
 * key side by side), with AVX512-BF16's pair products (exact bf16 products, float32 sums). */
static inline __attribute__((always_inline)) void NAME(tile_product_pairs)(NAME(f32x16) acc[4][4],
                                                                          const uint16_t *const *x,
                                                                          const uint16_t *yt, int64_t lp, int64_t j0,
                                                                          int64_t head_dim, const int NV) {
    __m512 sum[4][4];
    for (int t = 0; t < 4; t++)
        for (int v = 0; v < NV; v++) sum[t][v] = _mm512_setzero_ps();
    for (int64_t c = 0; c < head_dim / 2; c++) {
        __m512bh y[4];
        for (int v = 0; v < NV; v++) y[v] = (__m512bh)_mm512_loadu_si512(yt + (c * lp + j0 + 16 * v) * 2);
        for (int t = 0; t < 4; t++) {
            int32_t pair;
            memcpy(&pair, x[t] + 2 * c, 4);
            const __m512bh xs = (__m512bh)_mm512_set1_epi32(pair);
            for (int v = 0; v < NV; v++) sum[t][v] = _mm512_dpbf16_ps(sum[t][v], xs, y[v]);
        }
    }
    for (int t = 0; t < 4; t++)
        for (int v = 0; v < NV; v++) memcpy(&acc[t][v], &sum[t][v], 64);
}
#endif

/* Keys j .. j + 15 of one query row: from its scores s (q·kᵀ) and dp (dO·vᵀ), p = exp(scale·s + mask − lse) and
 * ds = p·(dp − delta)·scale into the row's probs and grad_scores, zero from key `end` on. */
static inline __attribute__((always_inline)) void NAME(attention_scores16)(
    char *probs, char *grad_scores, NAME(f32x16) s, NAME(f32x16) dp, int64_t j, int64_t end, float lse, float delta,
    const float *mask, int64_t k_len, float scale, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    const NAME(i32x16) lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    NAME(f32x16) x = s * scale;
    if (mask) {
        if (j + 16 <= k_len) x += NAME(load16)(mask + j, 0);
        else
            for (int l = 0; l < 16; l++) x[l] += j + l < k_len ? mask[j + l] : 0.0f;
    }
    NAME(i32x16) valid = (lanes + (int32_t)j) < (int32_t)end;
    NAME(f32x16) p = NAME(select16)(valid, NAME(exp16)(x - lse), (NAME(f32x16)){0});
    NAME(store16)(probs + j * es, p, bf16);
    NAME(store16)(grad_scores + j * es, p * (dp - delta) * scale, bf16);
}

/* What a query row's scores need besides the products: the last key + 1 it sees (0 when its lse is −inf: every
 * key masked), its lse, delta = Σ dO·O over head_dim, and its mask row (NULL for none). Row g (global) is query
 * position i. dO is float32 or bf16 (go_bf16), O the dtype. */
static inline __attribute__((always_inline)) void NAME(attention_row)(
    int64_t g, int64_t i, const float *lse, const void *go, int go_bf16, const void *o, int bf16, int64_t head_dim,
    const float *mask, const int64_t *mask_row, int causal, int64_t k_len, int64_t *end, float *l, float *delta,
    const float **m) {
    const int64_t es = bf16 ? 2 : 4, in_es = go_bf16 ? 2 : 4;
    *l = lse[g];
    *end = *l == -__builtin_inff() ? 0 : causal ? (i + 1 < k_len ? i + 1 : k_len) : k_len;
    *m = mask ? mask + mask_row[g] : NULL;
    NAME(f32x16) acc = (NAME(f32x16)){0};
    float d = 0.0f;
    int64_t c = 0;
    const char *go_row = (const char *)go + g * head_dim * in_es, *o_row = (const char *)o + g * head_dim * es;
    for (; c + 16 <= head_dim; c += 16)
        acc += NAME(load16)(go_row + c * in_es, go_bf16) * NAME(load16)(o_row + c * es, bf16);
    for (int k = 0; k < 16; k++) d += acc[k];
    for (; c < head_dim; c++) d += NAME(load1)(go_row, c, go_bf16) * NAME(load1)(o_row, c, bf16);
    *delta = d;
}

/* One tile of attention's backward (see attention_backward_scores) for NV vectors of keys from j0. */
static inline __attribute__((always_inline)) void NAME(attention_tile)(
    char *probs, char *grad_scores, const void *const *q, const void *const *go, const void *kt, const void *vt,
    int64_t lp, int64_t j0, int64_t head_dim, int n, const int64_t *end, const float *lse, const float *delta,
    const float *const *mask, int64_t k_len, float scale, int bf16, const int pairs, const int NV) {
    const int64_t es = bf16 ? 2 : 4;
    NAME(f32x16) s[4][4], dp[4][4];
#ifdef __AVX512BF16__
    if (pairs) {
        NAME(tile_product_pairs)(s, (const uint16_t *const *)q, kt, lp, j0, head_dim, NV);
        NAME(tile_product_pairs)(dp, (const uint16_t *const *)go, vt, lp, j0, head_dim, NV);
    } else
#endif
    {
        (void)pairs;
        NAME(tile_product)(s, (const float *const *)q, kt, lp, j0, head_dim, NV);
        NAME(tile_product)(dp, (const float *const *)go, vt, lp, j0, head_dim, NV);
    }
    for (int t = 0; t < n; t++)
        for (int v = 0; v < NV; v++)
            NAME(attention_scores16)(probs + t * lp * es, grad_scores + t * lp * es, s[t][v], dp[t][v], j0 + 16 * v,
                                     end[t], lse[t], delta[t], mask[t], k_len, scale, bf16);
}

/* The middle of attention's backward for a span of tiles, each 4 query rows of one batch entry (a key/value
 * head: its group's query rows one after another, row r at query position r mod q_len): with s = q·kᵀ and
 * dp = dO·vᵀ in float32 (q, dO [rows][head_dim]; kᵀ, vᵀ [head_dim][lp], lp = k_len rounded up to 16 and zero
 * beyond, all float32 copies; with `pairs` (AVX512-BF16, bf16 dtype) q, dO as they are and kᵀ, vᵀ in bf16 pairs,
 * see tile_product_pairs), p = exp(scale·s + mask − lse) and ds = p·(dp − delta)·scale, written to probs and
 * grad_scores ([rows][lp] in the dtype; zero where causal masks a key after its query, beyond k_len, or where
 * lse is −inf). delta = Σ dO·O per row (o in the dtype); mask: additive float32, row g's at mask + mask_row[g]. */
static void NAME(attention_backward_scores)(void *probs, void *grad_scores, const void *q, const void *go,
                                            const void *o, const void *kt, const void *vt, const float *lse,
                                            const float *mask, const int64_t *mask_row, int64_t first_tile,
                                            int64_t tiles, int64_t rows_per_batch, int64_t q_len, int64_t k_len,
                                            int64_t head_dim, int causal, float scale, int bf16, int pairs) {
    const int64_t es = bf16 ? 2 : 4, lp = (k_len + 15) / 16 * 16, per_batch = (rows_per_batch + 3) / 4;
#ifndef __AVX512BF16__
    pairs = 0;  /* (the module tells Python it has no pair products) */
#endif
    const int64_t in_es = pairs ? 2 : 4;  /* q, dO, kᵀ, vᵀ */
    for (int64_t tile = first_tile; tile < first_tile + tiles; tile++) {
        const int64_t b = tile / per_batch, r0 = tile % per_batch * 4;
        const int n = (int)(rows_per_batch - r0 < 4 ? rows_per_batch - r0 : 4);
        const int64_t g0 = b * rows_per_batch + r0;  /* global row of the tile's first row */
        int64_t end[4], tile_end = 0;
        float l[4], delta[4];
        const float *m[4];
        for (int t = 0; t < 4; t++) {
            const int64_t row = r0 + (t < n ? t : n - 1);
            NAME(attention_row)(b * rows_per_batch + row, row % q_len, lse, go, pairs, o, bf16, head_dim, mask,
                                mask_row, causal, k_len, &end[t], &l[t], &delta[t], &m[t]);
            if (t < n && end[t] > tile_end) tile_end = end[t];
        }
        const void *qt[4], *got[4];  /* a tile of fewer than 4 rows repeats its last one */
        for (int t = 0; t < 4; t++) {
            qt[t] = (const char *)q + (g0 + (t < n ? t : n - 1)) * head_dim * in_es;
            got[t] = (const char *)go + (g0 + (t < n ? t : n - 1)) * head_dim * in_es;
        }
        const char *kt_b = (const char *)kt + b * head_dim * lp * in_es;
        const char *vt_b = (const char *)vt + b * head_dim * lp * in_es;
        char *pr = (char *)probs + g0 * lp * es, *gr = (char *)grad_scores + g0 * lp * es;
        int64_t j0 = 0;
        for (; j0 < tile_end && j0 + 64 <= lp; j0 += 64)
            NAME(attention_tile)(pr, gr, qt, got, kt_b, vt_b, lp, j0, head_dim, n, end, l, delta, m, k_len, scale,
                                 bf16, pairs, 4);
        for (; j0 < tile_end; j0 += 16)
            NAME(attention_tile)(pr, gr, qt, got, kt_b, vt_b, lp, j0, head_dim, n, end, l, delta, m, k_len, scale,
                                 bf16, pairs, 1);
        for (int t = 0; t < n; t++) {  /* keys no row of the tile sees */
            memset(pr + (t * lp + j0) * es, 0, (size_t)((lp - j0) * es));
            memset(gr + (t * lp + j0) * es, 0, (size_t)((lp - j0) * es));
        }
    }
}

/* Cross-entropy over rows of logits (rows × vocab, the dtype): lse[r] = log Σ exp(logits[r]) in float32 (max
 * subtracted first); with want_grad, each row is overwritten by its gradient softmax(logits[r]) − onehot(target[r])
 * (rounded to the dtype). work: vocab floats of scratch to keep the exponentials in, or NULL to compute them
 * again for the gradient. */
static void NAME(cross_entropy_rows)(void *logits, float *lse, const int64_t *targets, int64_t rows, int64_t vocab,
                                     int want_grad, float *work, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++) {
        char *row = (char *)logits + r * vocab * es;
        NAME(f32x16) top16 = (NAME(f32x16)){0} - __builtin_inff();
        int64_t j = 0;
        for (; j + 16 <= vocab; j += 16) {
            NAME(f32x16) x = NAME(load16)(row + j * es, bf16);
            top16 = NAME(select16)(x > top16, x, top16);
        }
        float top = -__builtin_inff();
        for (int l = 0; l < 16; l++) top = top16[l] > top ? top16[l] : top;
        for (; j < vocab; j++) top = NAME(load1)(row, j, bf16) > top ? NAME(load1)(row, j, bf16) : top;
        NAME(f32x16) sum16 = (NAME(f32x16)){0};
        for (j = 0; j + 16 <= vocab; j += 16) {
            NAME(f32x16) e = NAME(exp16)(NAME(load16)(row + j * es, bf16) - top);
            if (work) memcpy(work + j, &e, 64);
            sum16 += e;
        }
        float sum = 0.0f;
        for (int l = 0; l < 16; l++) sum += sum16[l];
        for (; j < vocab; j++) {
            const float e = NAME(exp1)(NAME(load1)(row, j, bf16) - top);
            if (work) work[j] = e;
            sum += e;
        }
        lse[r] = logf(sum) + top;
        if (!want_grad) continue;
        const int64_t t = targets[r];
        const float inv = 1.0f / sum, p_target = NAME(exp1)(NAME(load1)(row, t, bf16) - top) * inv;
        for (j = 0; j + 16 <= vocab; j += 16) {
            NAME(f32x16) e = work ? NAME(load16)(work + j, 0) : NAME(exp16)(NAME(load16)(row + j * es, bf16) - top);
            NAME(store16)(row + j * es, e * inv, bf16);
        }
        for (; j < vocab; j++) NAME(store1)(row, j, (work ? work[j] : NAME(exp1)(NAME(load1)(row, j, bf16) - top)) * inv, bf16);
        NAME(store1)(row, t, p_target - 1.0f, bf16);
    }
}
