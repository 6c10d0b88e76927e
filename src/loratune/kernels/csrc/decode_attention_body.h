/* Decoding's attention for one new token per row, compiled once per instruction set by decode_attention.c (NAME(n)
 * gives the ISA suffix): each query head of a row against that row's cached keys and values plus the step's own
 * key and value, which the kernel also writes into the cache's next column. bf16 or float32 tensors, float32
 * arithmetic (scores, softmax and the weighted sum), the output rounded once, as PyTorch's CPU attention does.
 * And a prompt's attention for batch-invariant serving (rows_attention), each query computed alone. */

#include <math.h>

#include "vec16.h"
#include "vec8.h"

/* The sum of a·b over `dim` elements (float32 accumulators). */
static inline __attribute__((always_inline)) float NAME(dot_dim)(const char *a, const char *b, int64_t dim, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    NAME(f32x8) acc = {0};
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) acc += NAME(load8)(a + i * es, bf16) * NAME(load8)(b + i * es, bf16);
    float s = NAME(lanes_sum8)(acc);
    for (; i < dim; i++) s += NAME(load1)(a, i, bf16) * NAME(load1)(b, i, bf16);
    return s;
}

/* acc[i] += e · v[i] for the dim values of v (bf16 or float32), in float32. */
static inline __attribute__((always_inline)) void NAME(add_scaled)(float *acc, float e, const char *v, int64_t dim,
                                                                  int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    int64_t i = 0;
    for (; i + 8 <= dim; i += 8) {
        NAME(f32x8) a;
        memcpy(&a, acc + i, 32);
        a += e * NAME(load8)(v + i * es, bf16);
        memcpy(acc + i, &a, 32);
    }
    for (; i < dim; i++) acc[i] += e * NAME(load1)(v, i, bf16);
}

/* For the (row, query head) pairs [begin, end), pair p being row p / q_heads and head p % q_heads (its key/value
 * head: head / (q_heads / kv_heads)):
 *   out[r, h] = softmax(scale · q[r, h]·K[r, g]ᵀ over the columns c with mask[r, c] ≠ 0) · V[r, g]
 * where column c < cols - 1 of K, V is the cache's (keys, values: rows × kv_heads × capacity × dim) and the last
 * column is k_new[r, g], v_new[r, g] (rows × kv_heads × dim), written into the cache's column cols - 1 by the pair
 * of the group's first query head (no pair reads that column from the cache, so the write races with nothing).
 * q, out: rows × q_heads × dim; mask: rows × cols; work: cols + dim floats of scratch. The last column must be
 * unmasked (it is the token itself). */
void NAME(decode_attention)(void *out, const void *q, void *keys, void *values, const void *k_new, const void *v_new,
                            const int64_t *mask, int64_t q_heads, int64_t kv_heads, int64_t dim, int64_t cols,
                            int64_t capacity, float scale, float *work, int64_t begin, int64_t end, int bf16) {
    const int64_t es = bf16 ? 2 : 4, group = q_heads / kv_heads;
    float *scores = work, *acc = work + cols;
    for (int64_t p = begin; p < end; p++) {
        const int64_t r = p / q_heads, h = p % q_heads, g = h / group;
        const char *qr = (const char *)q + (r * q_heads + h) * dim * es;
        const char *kn = (const char *)k_new + (r * kv_heads + g) * dim * es;
        const char *vn = (const char *)v_new + (r * kv_heads + g) * dim * es;
        char *kc = (char *)keys + (r * kv_heads + g) * capacity * dim * es;
        char *vc = (char *)values + (r * kv_heads + g) * capacity * dim * es;
        const int64_t *m = mask + r * cols;
        if (h % group == 0) {
            memcpy(kc + (cols - 1) * dim * es, kn, (size_t)(dim * es));
            memcpy(vc + (cols - 1) * dim * es, vn, (size_t)(dim * es));
        }
        float top = -INFINITY;
        for (int64_t c = 0; c < cols; c++) {
            if (!m[c]) continue;
            const char *k = c == cols - 1 ? kn : kc + c * dim * es;
            const float s = NAME(dot_dim)(qr, k, dim, bf16) * scale;
            scores[c] = s;
            if (s > top) top = s;
        }
        for (int64_t i = 0; i < dim; i++) acc[i] = 0.f;
        float total = 0.f;
        for (int64_t c = 0; c < cols; c++) {
            if (!m[c]) continue;
            const float e = expf(scores[c] - top);
            total += e;
            NAME(add_scaled)(acc, e, c == cols - 1 ? vn : vc + c * dim * es, dim, bf16);
        }
        char *o = (char *)out + (r * q_heads + h) * dim * es;
        const float inverse = 1.f / total;
        for (int64_t i = 0; i < dim; i++) NAME(store1)(o, i, acc[i] * inverse, bf16);
    }
}

/* A prompt's attention, each query on its own: for the work items [begin, end), item p being (row r, key/value head
 * g, block b of `block` queries) = ((r · kv_heads + g) · blocks + b):
 *   out[r, t, h] = softmax(scale · q[r, t, h]·K[r, g]ᵀ over the columns c with allowed[r, t, c] ≠ 0) · V[r, g]
 * for the block's queries t and the group's query heads h. Each score is Σ_d q_d·k_d summed over d in order (16
 * columns side by side, from the block's keys transposed), the exponentials taken per column, their sum and the
 * weighted sum of values over the allowed columns in order: a query's output depends on its own allowed keys and
 * values alone, not on the other rows, padding columns or how many queries a call takes (the batch-invariant
 * serving's guarantee). q, out: rows × queries × q_heads × dim; keys, values: rows × kv_heads × capacity × dim
 * (the first cols columns read); allowed: rows × queries × cols bytes; work: (dim + 1) · width + 2 · dim floats of
 * scratch, width = cols rounded up to 16. A query with no allowed column (a padding position) gets
 * zeros. */
void NAME(rows_attention)(void *out, const void *q, const void *keys, const void *values, const uint8_t *allowed,
                          int64_t queries, int64_t block, int64_t q_heads, int64_t kv_heads, int64_t dim, int64_t cols,
                          int64_t capacity, float scale, float *work, int64_t begin, int64_t end, int bf16) {
    const int64_t es = bf16 ? 2 : 4, group = q_heads / kv_heads, blocks = (queries + block - 1) / block;
    const int64_t width = (cols + 15) / 16 * 16;
    float *kt = work, *sh = kt + dim * width, *ah = sh + width, *qh = ah + dim;  /* keys; one query head's own */
    for (int64_t p = begin; p < end; p++) {
        const int64_t b = p % blocks, g = (p / blocks) % kv_heads, r = p / (blocks * kv_heads);
        const int64_t t0 = b * block, t1 = t0 + block < queries ? t0 + block : queries;
        const char *kc = (const char *)keys + (r * kv_heads + g) * capacity * dim * es;
        const char *vc = (const char *)values + (r * kv_heads + g) * capacity * dim * es;
        int64_t lo = cols, hi = -1;  /* the columns any query of the block reads */
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *m = allowed + (r * queries + t) * cols;
            for (int64_t c = 0; c < cols; c++)
                if (m[c]) {
                    if (c < lo) lo = c;
                    if (c > hi) hi = c;
                }
        }
        const int64_t first = lo / 16 * 16, last = hi < 0 ? first : (hi / 16 + 1) * 16;
        for (int64_t c = first; c < last; c++) {  /* kt[d][c - first]: the keys transposed, zeros past the last */
            const char *k = kc + c * dim * es;
            for (int64_t d = 0; d < dim; d++) kt[d * width + c - first] = c < cols ? NAME(load1)(k, d, bf16) : 0.f;
        }
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *m = allowed + (r * queries + t) * cols;
            int64_t from = cols, to = -1;
            for (int64_t c = 0; c < cols; c++)
                if (m[c]) {
                    if (c < from) from = c;
                    to = c;
                }
            for (int64_t h = 0; h < group; h++) {
                const int64_t at = (r * queries + t) * q_heads + g * group + h;
                char *o = (char *)out + at * dim * es;
                if (to < 0) {
                    for (int64_t d = 0; d < dim; d++) NAME(store1)(o, d, 0.f, bf16);
                    continue;
                }
                for (int64_t d = 0; d < dim; d++) qh[d] = NAME(load1)((const char *)q + at * dim * es, d, bf16);
                int64_t c0 = from / 16 * 16;
                for (; c0 + 48 <= to; c0 += 64) {  /* four runs of 16 keys: four independent sums (latency) */
                    NAME(f32x16) s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
                    const float *k0 = kt + c0 - first;
                    for (int64_t d = 0; d < dim; d++) {
                        const float *kd = k0 + d * width;
                        s0 += qh[d] * NAME(load16)(kd, 0);
                        s1 += qh[d] * NAME(load16)(kd + 16, 0);
                        s2 += qh[d] * NAME(load16)(kd + 32, 0);
                        s3 += qh[d] * NAME(load16)(kd + 48, 0);
                    }
                    s0 *= scale, s1 *= scale, s2 *= scale, s3 *= scale;
                    memcpy(sh + c0 - first, &s0, 64), memcpy(sh + c0 - first + 16, &s1, 64);
                    memcpy(sh + c0 - first + 32, &s2, 64), memcpy(sh + c0 - first + 48, &s3, 64);
                }
                for (; c0 <= to; c0 += 16) {
                    NAME(f32x16) sum = (NAME(f32x16)){0};
                    for (int64_t d = 0; d < dim; d++) sum += qh[d] * NAME(load16)(kt + d * width + c0 - first, 0);
                    sum *= scale;
                    memcpy(sh + c0 - first, &sum, 64);
                }
                float top = -INFINITY;
                for (int64_t c = from; c <= to; c++)
                    if (m[c] && sh[c - first] > top) top = sh[c - first];
                for (int64_t c0 = from / 16 * 16; c0 <= to; c0 += 16) {
                    NAME(f32x16) e = NAME(exp16)(NAME(load16)(sh + c0 - first, 0) - top);
                    memcpy(sh + c0 - first, &e, 64);
                }
                float total = 0.f;
                if (dim == 64) {  /* the common head size: the weighted sum in registers */
                    NAME(f32x16) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                    for (int64_t c = from; c <= to; c++) {
                        if (!m[c]) continue;
                        const float e = sh[c - first];
                        const char *v = vc + c * dim * es;
                        total += e;
                        a0 += e * NAME(load16)(v, bf16);
                        a1 += e * NAME(load16)(v + 16 * es, bf16);
                        a2 += e * NAME(load16)(v + 32 * es, bf16);
                        a3 += e * NAME(load16)(v + 48 * es, bf16);
                    }
                    memcpy(ah, &a0, 64), memcpy(ah + 16, &a1, 64), memcpy(ah + 32, &a2, 64), memcpy(ah + 48, &a3, 64);
                } else {
                    for (int64_t d = 0; d < dim; d++) ah[d] = 0.f;
                    for (int64_t c = from; c <= to; c++) {
                        if (!m[c]) continue;
                        const float e = sh[c - first];
                        const char *v = vc + c * dim * es;
                        total += e;
                        NAME(add_scaled)(ah, e, v, dim, bf16);
                    }
                }
                const float inverse = 1.f / total;
                for (int64_t d = 0; d < dim; d++) NAME(store1)(o, d, ah[d] * inverse, bf16);
            }
        }
    }
}
