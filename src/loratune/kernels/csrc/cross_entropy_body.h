/* The cross-entropy's softmax over rows of logits (loratune/inference/loss.py), compiled once per instruction
 * set by cross_entropy.c (NAME(n) gives the ISA suffix). */

#include "vec16.h"

/* Cross-entropy over rows of logits (rows × vocab, the dtype): lse[r] = log Σ exp(logits[r]) in float32 (max
 * subtracted first); with want_grad, each row is overwritten by its gradient softmax(logits[r]) − onehot(target[r])
 * (rounded to the dtype). work: vocab floats of scratch to keep the exponentials in, or NULL to compute them
 * again for the gradient. */
void NAME(cross_entropy_rows)(void *logits, float *lse, const int64_t *targets, int64_t rows, int64_t vocab,
                              int want_grad, float *work, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r++) {
        char *row = (char *)logits + r * vocab * es;
        NAME(f32x16) top16 = (NAME(f32x16)){0} - __builtin_inff();
        int64_t j = 0;
        for (; j + 16 <= vocab; j += 16) {
            NAME(f32x16) x = NAME(load16)(row + j * es, bf16);
            top16 = NAME(select16)(NAME(less16)(top16, x), x, top16);
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
        for (; j < vocab; j++)
            NAME(store1)(row, j, (work ? work[j] : NAME(exp1)(NAME(load1)(row, j, bf16) - top)) * inv, bf16);
        NAME(store1)(row, t, p_target - 1.0f, bf16);
    }
}
