/* Decoding's attention for one new token per row, compiled once per instruction set by decode_attention.c (NAME(n)
 * gives the ISA suffix): each query head of a row against that row's cached keys and values plus the step's own
 * key and value, which the kernel also writes into the cache's next column. bf16 or float32 tensors, float32
 * arithmetic (scores, softmax and the weighted sum), the output rounded once, as PyTorch's CPU attention does. */

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
            const char *v = c == cols - 1 ? vn : vc + c * dim * es;
            int64_t i = 0;
            for (; i + 8 <= dim; i += 8) {
                NAME(f32x8) a;
                memcpy(&a, acc + i, 32);
                a += e * NAME(load8)(v + i * es, bf16);
                memcpy(acc + i, &a, 32);
            }
            for (; i < dim; i++) acc[i] += e * NAME(load1)(v, i, bf16);
        }
        char *o = (char *)out + (r * q_heads + h) * dim * es;
        const float inverse = 1.f / total;
        for (int64_t i = 0; i < dim; i++) NAME(store1)(o, i, acc[i] * inverse, bf16);
    }
}
