/* The middle of attention's backward (loratune/train/attention.py): probabilities and score gradients from
 * the products q·kᵀ and dO·vᵀ taken here in float32, compiled once per instruction set by attention.c (NAME(n)
 * gives the ISA suffix; the AVX512-BF16 copy takes bf16 q, dO and k, v in pairs, see tile_product_pairs). */

#include "vec16.h"

/* A tile of 4 query rows × NV·16 keys of a product x·yᵀ in float32: acc[t][v] = Σ_c x[t][c]·yt[c][j0 + 16v + lane],
 * x[t] a row of head_dim floats, yt the other factor transposed (head_dim rows of lp floats). */
static inline __attribute__((always_inline)) void NAME(tile_product)(NAME(f32x16) acc[4][4], const float *const *x,
                                                                    const float *yt, int64_t lp, int64_t j0,
                                                                    int64_t head_dim, const int NV) {
#ifndef __AVX512F__
    /* AVX2 has 16 registers of 8 floats: the 16 accumulators of 16 floats below would live on the stack. Here
     * 16 keys at a time, as two halves of 8, four rows: 8 accumulators in registers. Each lane sums over the
     * head dimensions in the same order, so the same bits. */
    for (int v = 0; v < NV; v++) {
        NAME(f32h) a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}, c0 = {0}, c1 = {0}, d0 = {0}, d1 = {0};
        const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
        for (int64_t c = 0; c < head_dim; c++) {
            NAME(f32h) lo, hi;
            memcpy(&lo, yt + c * lp + j0 + 16 * v, 32);
            memcpy(&hi, yt + c * lp + j0 + 16 * v + 8, 32);
            a0 += x0[c] * lo, a1 += x0[c] * hi;
            b0 += x1[c] * lo, b1 += x1[c] * hi;
            c0 += x2[c] * lo, c1 += x2[c] * hi;
            d0 += x3[c] * lo, d1 += x3[c] * hi;
        }
        memcpy(&acc[0][v], &a0, 32), memcpy((char *)&acc[0][v] + 32, &a1, 32);
        memcpy(&acc[1][v], &b0, 32), memcpy((char *)&acc[1][v] + 32, &b1, 32);
        memcpy(&acc[2][v], &c0, 32), memcpy((char *)&acc[2][v] + 32, &c1, 32);
        memcpy(&acc[3][v], &d0, 32), memcpy((char *)&acc[3][v] + 32, &d1, 32);
    }
    return;
#endif
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
    NAME(i32x16) valid = NAME(less16_i32)(lanes + (int32_t)j, (NAME(i32x16)){0} + (int32_t)end);
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
void NAME(attention_backward_scores)(void *probs, void *grad_scores, const void *q, const void *go,
                                     const void *o, const void *kt, const void *vt, const float *lse,
                                     const float *mask, const int64_t *mask_row, int64_t first_tile,
                                     int64_t tiles, int64_t rows_per_batch, int64_t q_len, int64_t k_len,
                                     int64_t head_dim, int causal, float scale, int bf16, int pairs) {
    const int64_t es = bf16 ? 2 : 4, lp = (k_len + 15) / 16 * 16, per_batch = (rows_per_batch + 3) / 4;
#ifndef __AVX512BF16__
    pairs = 0;  /* (loratune.kernels.fused asks for pairs only from the AVX512-BF16 copy) */
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
