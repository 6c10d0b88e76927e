/* Attention's backward kernel (attention_body.h) for every instruction set, and its AMX form. */
#define KERNEL_BODY "attention_body.h"
#include "per_isa.h"

#ifdef HAVE_AMX
/* attention_backward_scores with AMX (Sapphire Rapids and later): the products of a tile of 16 query rows × 16
 * keys as AMX tile products, straight from bf16 q and dO rows and k, v in pairs (head_dim a multiple of 32, the
 * batch entry's rows a multiple of 16); the rest as in attention_backward_scores. A span is a range of 4-row tiles
 * starting and ending at multiples of 4 (16 rows). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config_t;

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma")))
void attention_backward_scores_amx(void *probs, void *grad_scores, const void *q, const void *go, const void *o,
                                   const void *kt, const void *vt, const float *lse, const float *mask,
                                   const int64_t *mask_row, int64_t first_tile, int64_t tiles, int64_t rows_per_batch,
                                   int64_t q_len, int64_t k_len, int64_t head_dim, int causal, float scale) {
    tile_config_t config = {.palette = 1};
    for (int t = 0; t < 6; t++) config.rows[t] = 16, config.colsb[t] = 64;  /* C: s, dp; A: q, dO; B: k, v */
    _tile_loadconfig(&config);
    const int64_t lp = (k_len + 15) / 16 * 16, per_batch = rows_per_batch / 16;
    float s_tile[16][16], dp_tile[16][16];
    for (int64_t unit = first_tile / 4; unit < (first_tile + tiles) / 4; unit++) {
        const int64_t b = unit / per_batch, r0 = unit % per_batch * 16, g0 = b * rows_per_batch + r0;
        int64_t end[16], tile_end = 0;
        float l[16], delta[16];
        const float *m[16];
        for (int t = 0; t < 16; t++) {
            attention_row_avx512bf16(g0 + t, (r0 + t) % q_len, lse, go, 1, o, 1, head_dim, mask, mask_row, causal,
                                     k_len, &end[t], &l[t], &delta[t], &m[t]);
            if (end[t] > tile_end) tile_end = end[t];
        }
        const uint16_t *q_rows = (const uint16_t *)q + g0 * head_dim, *go_rows = (const uint16_t *)go + g0 * head_dim;
        const uint16_t *kt_b = (const uint16_t *)kt + b * head_dim * lp;
        const uint16_t *vt_b = (const uint16_t *)vt + b * head_dim * lp;
        char *pr = (char *)probs + g0 * lp * 2, *gr = (char *)grad_scores + g0 * lp * 2;
        int64_t j0 = 0;
        for (; j0 < tile_end; j0 += 16) {
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t c = 0; c < head_dim; c += 32) {
                _tile_loadd(2, q_rows + c, head_dim * 2);
                _tile_loadd(3, go_rows + c, head_dim * 2);
                _tile_loadd(4, kt_b + (c / 2 * lp + j0) * 2, lp * 4);
                _tile_loadd(5, vt_b + (c / 2 * lp + j0) * 2, lp * 4);
                _tile_dpbf16ps(0, 2, 4);
                _tile_dpbf16ps(1, 3, 5);
            }
            _tile_stored(0, s_tile, 64);
            _tile_stored(1, dp_tile, 64);
            for (int t = 0; t < 16; t++) {
                f32x16_avx512bf16 sv, dv;
                memcpy(&sv, s_tile[t], 64);
                memcpy(&dv, dp_tile[t], 64);
                attention_scores16_avx512bf16(pr + t * lp * 2, gr + t * lp * 2, sv, dv, j0, end[t], l[t], delta[t],
                                              m[t], k_len, scale, 1);
            }
        }
        for (int t = 0; t < 16; t++) {  /* keys no row of the tile sees */
            memset(pr + (t * lp + j0) * 2, 0, (size_t)((lp - j0) * 2));
            memset(gr + (t * lp + j0) * 2, 0, (size_t)((lp - j0) * 2));
        }
    }
    _tile_release();
}
#endif
