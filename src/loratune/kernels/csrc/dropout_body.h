/* Dropout from a counter-based mask, compiled once per instruction set by dropout.c (NAME(n) gives the ISA
 * suffix). Every copy draws the same mask: only integer arithmetic decides it. */

#include "vec16.h"

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

void NAME(dropout)(void *out, const void *x, int64_t first, int64_t n, uint64_t seed, uint32_t keep_below,
                   float scale, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    const uint32_t seed_lo = (uint32_t)seed, seed_hi = (uint32_t)(seed >> 32);
    const NAME(u32x16) lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (int64_t i = 0; i < n; i += 16) {
        uint64_t at = (uint64_t)(first + i);
        NAME(u32x16) index = (uint32_t)at + lanes;  /* a block of 16 never crosses a 2^32 boundary: first % 16 == 0 */
        NAME(u32x16) h = NAME(mix16)(NAME(mix16)(index ^ seed_lo) + (seed_hi ^ (uint32_t)(at >> 32)));
        if (i + 16 <= n) {
            NAME(u32x16) keep = (NAME(u32x16))NAME(less16_u32)(h, (NAME(u32x16)){0} + keep_below);
            NAME(f32x16) v = NAME(load16)((const char *)x + i * es, bf16) * scale;
            NAME(store16)((char *)out + i * es, (NAME(f32x16))((NAME(u32x16))v & keep), bf16);
        } else {  /* the last few elements: the same hashes, one at a time */
            for (int64_t k = i; k < n; k++)
                NAME(store1)(out, k, h[k - i] < keep_below ? NAME(load1)(x, k, bf16) * scale : 0.0f, bf16);
        }
    }
}
