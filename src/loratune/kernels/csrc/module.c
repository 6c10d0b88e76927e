/* loratune.kernels._cpu: loratune's compiled CPU kernels as one Python module, each taking raw addresses that
 * loratune/kernels/lowrank.py and fused.py check first.
 *
 * - add_low_rank: the low-rank update of an unmerged LoRA layer for a few rows, out += (x·Aᵀ)·(s·Bᵀ), as one
 *   call instead of four PyTorch operations (cast, two small products, add). Decoding runs hundreds of these per
 *   token, where each PyTorch operation costs microseconds of dispatch and cold caches next to the base layer's
 *   product. It runs on the calling thread.
 * - linear_rows: a linear layer's product for the few rows of a decoding step, x·Wᵀ + b, bound by reading the
 *   weights: each is read once, split over the threads the caller gives (BLAS's matrix-vector products reach
 *   about half the memory bandwidth here); lora_rows: that product and add_low_rank's update in one call, an
 *   unmerged LoRA layer's whole output.
 * - rope: the rotary position embedding of a step's queries and keys in one call (decoding's attention);
 *   decode_attention: that step's attention over the KV cache, appending the step's keys and values to it.
 *   rows_attention: a prompt's attention, each query computed alone, so a row's result does not depend on the
 *   batch it is read in.
 * - the elementwise parts of a training step as single passes over memory: a Llama block's RMSNorm and
 *   silu(gate)·up, forward and backward, dropout from a counter-based mask, attention's backward between its
 *   products, the cross-entropy's softmax; float32 arithmetic on bf16 or float32 tensors. In PyTorch operations
 *   each is a chain of five to fifteen operations, each writing a fresh intermediate tensor; here every element
 *   is read and written once. They split their work over the threads the caller gives (parallel.c).
 * - fastfood: intrinsic-dimension training's random projection P·θ and its transpose, block by block in the
 *   cache (loratune/train/projection.py): one pass over the D values each way where PyTorch operations make a
 *   dozen.
 *
 * Every kernel is compiled for each instruction set (kernels.h); at import the module runs the best copy this
 * CPU has, and select() switches all of them to another (loratune/kernels/loader.py, LORATUNE_KERNEL_ISA). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "parallel.h"

#define PTR(i) ((void *)(intptr_t)v[i])

/* v: out, gate, up, n, is_bf16 */
static void run_silu_mul(const int64_t *v, float eps, int64_t b, int64_t e) {
    (void)eps;
    const int64_t es = v[4] ? 2 : 4;
    silu_mul_impl((char *)PTR(0) + b * es, (char *)PTR(1) + b * es, (char *)PTR(2) + b * es, e - b, (int)v[4]);
}

/* v: grad_gate, grad_up, gate, up, grad, n, is_bf16 */
static void run_silu_mul_backward(const int64_t *v, float eps, int64_t b, int64_t e) {
    (void)eps;
    const int64_t es = v[6] ? 2 : 4;
    silu_mul_backward_impl((char *)PTR(0) + b * es, (char *)PTR(1) + b * es, (char *)PTR(2) + b * es,
                           (char *)PTR(3) + b * es, (char *)PTR(4) + b * es, e - b, (int)v[6]);
}

/* v: out, rstd, x, weight, rows, h, is_bf16 */
static void run_rms_norm(const int64_t *v, float eps, int64_t b, int64_t e) {
    const int64_t row = v[5] * (v[6] ? 2 : 4);
    rms_norm_impl((char *)PTR(0) + b * row, (float *)PTR(1) + b, (char *)PTR(2) + b * row, PTR(3), e - b, v[5],
                  eps, (int)v[6]);
}

/* v: out, rstd, x, weight, rows, h, is_bf16 */
static void run_rms_norm_apply(const int64_t *v, float eps, int64_t b, int64_t e) {
    (void)eps;
    const int64_t row = v[5] * (v[6] ? 2 : 4);
    rms_norm_apply_impl((char *)PTR(0) + b * row, (const float *)PTR(1) + b, (char *)PTR(2) + b * row, PTR(3), e - b,
                        v[5], (int)v[6]);
}

/* v: grad_x, grad, x, weight, rstd, rows, h, is_bf16 */
static void run_rms_norm_backward(const int64_t *v, float eps, int64_t b, int64_t e) {
    (void)eps;
    const int64_t row = v[6] * (v[7] ? 2 : 4);
    rms_norm_backward_impl((char *)PTR(0) + b * row, (char *)PTR(1) + b * row, (char *)PTR(2) + b * row, PTR(3),
                           (const float *)PTR(4) + b, e - b, v[6], (int)v[7]);
}

/* v: out, x, n, seed, keep_below, is_bf16; eps: the scale. Spans start at multiples of 16 (the grain). */
static void run_dropout(const int64_t *v, float scale, int64_t b, int64_t e) {
    const int64_t es = v[5] ? 2 : 4;
    dropout_impl((char *)PTR(0) + b * es, (char *)PTR(1) + b * es, b, e - b, (uint64_t)v[3], (uint32_t)v[4], scale,
                 (int)v[5]);
}

/* Whether the AMX path takes a call (v as run_attention_backward_scores reads it): bf16 in pairs, head_dim a
 * multiple of 32 and each batch entry's rows a multiple of 16. */
static int amx_fits(const int64_t *v) {
    return use_amx && v[16] && v[17] && v[14] % 32 == 0 && v[11] % 16 == 0;
}

/* v: probs, grad_scores, q, go, o, kt, vt, lse, mask, mask_row, tiles, rows_per_batch, q_len, k_len, head_dim,
 * causal, is_bf16, pairs; eps: the scale. A span is a range of 4-row tiles (whole 16-row units where AMX takes it). */
static void run_attention_backward_scores(const int64_t *v, float scale, int64_t b, int64_t e) {
#ifdef HAVE_AMX
    if (amx_fits(v)) {
        attention_backward_scores_amx(PTR(0), PTR(1), PTR(2), PTR(3), PTR(4), PTR(5), PTR(6), (const float *)PTR(7),
                                      (const float *)PTR(8), (const int64_t *)PTR(9), b, e - b, v[11], v[12], v[13],
                                      v[14], (int)v[15], scale);
        return;
    }
#endif
    attention_backward_scores_impl(PTR(0), PTR(1), PTR(2), PTR(3), PTR(4), PTR(5), PTR(6), (const float *)PTR(7),
                                   (const float *)PTR(8), (const int64_t *)PTR(9), b, e - b, v[11], v[12], v[13],
                                   v[14], (int)v[15], scale, (int)v[16], (int)v[17]);
}

/* v: logits, lse, targets, rows, vocab, want_grad, is_bf16. A span is a range of rows; each thread has its own
 * scratch row (without one it computes the exponentials twice). */
static void run_cross_entropy_rows(const int64_t *v, float eps, int64_t b, int64_t e) {
    (void)eps;
    float *work = (float *)malloc((size_t)v[4] * sizeof(float));
    const int64_t row = v[4] * (v[6] ? 2 : 4);
    cross_entropy_rows_impl((char *)PTR(0) + b * row, (float *)PTR(1) + b, (const int64_t *)PTR(2) + b, e - b, v[4],
                            (int)v[5], work, (int)v[6]);
    free(work);
}

/* v: out, x, weight, bias, rows, in, out_features, is_bf16; a span of output columns */
static void run_linear_rows(const int64_t *v, float eps, int64_t b, int64_t e) {
    (void)eps;
    linear_rows_impl(PTR(0), PTR(1), PTR(2), PTR(3), v[4], v[5], v[6], b, e, (int)v[7]);
}

/* v: linear_rows' 8 values (weight 0: no product, the update alone), then A, sBt, rank, blocks, rows_per_block,
 * h (low_rank_h_all's, every row's); a span of output columns: their product, then their share of the update */
static void run_lora_rows(const int64_t *v, float eps, int64_t b, int64_t e) {
    if (v[2] != 0) run_linear_rows(v, eps, b, e);
    low_rank_add_cols_impl(PTR(0), (const float *)PTR(9), (const float *)PTR(13), v[4], v[10], v[6],
                           (const int64_t *)PTR(11), v[12], b, e, (int)v[7]);
}

/* An unmerged LoRA layer's output for a few rows (job.v as run_lora_rows takes it, without h): h = x·Aᵀ of
 * every row on this thread, then product and update by spans of output columns over `threads` threads; with
 * weight 0, the update alone (add_low_rank's spread over threads). */
static void lora_rows_over_threads(job_t job, int64_t threads) {
    const int64_t *v = job.v;
    float small[4096];
    const int64_t size = v[4] * v[10];
    float *h = size <= 4096 ? small : malloc(size * sizeof(float));
    if (h == NULL) { /* no memory for h: the update on this thread, after the product */
        job.run = run_linear_rows;
        if (v[2] != 0) parallel_for(job, v[6], 4, 64, threads);
        (v[7] ? add_low_rank_bf16_impl : add_low_rank_f32_impl)(PTR(0), PTR(1), (const float *)PTR(8),
                                                               (const float *)PTR(9), v[4], v[5], v[10], v[6],
                                                               (const int64_t *)PTR(11), v[12]);
        return;
    }
    low_rank_h_all_impl(PTR(1), (const float *)PTR(8), v[4], v[5], v[10], (const int64_t *)PTR(11), v[12], h,
                        (int)v[7]);
    job.v[13] = (int64_t)(intptr_t)h;
    job.run = run_lora_rows;
    /* spans of whole eight-column groups, so that each column is summed by the same code (vector or tail) as in
     * one span */
    parallel_for(job, v[6], 8, 64, threads);
    if (h != small) free(h);
}

/* v: q_out, q, q_heads, k_out, k, k_heads, cos, sin, rows, dim, is_bf16; a span of rows */
static void run_rope(const int64_t *v, float eps, int64_t b, int64_t e) {
    (void)eps;
    rope_impl(PTR(0), PTR(1), v[2], PTR(3), PTR(4), v[5], PTR(6), PTR(7), v[9], b, e, (int)v[10]);
}

/* v: out, q, keys, values, k_new, v_new, mask, pairs, q_heads, kv_heads, dim, cols, capacity, is_bf16; eps: the
 * scale. A span is a range of (row, query head) pairs; each thread has its own scratch (scores and the sum). */
static void run_decode_attention(const int64_t *v, float scale, int64_t b, int64_t e) {
    float *work = (float *)malloc((size_t)(v[11] + v[10]) * sizeof(float));
    if (work == NULL) return;
    decode_attention_impl(PTR(0), PTR(1), PTR(2), PTR(3), PTR(4), PTR(5), (const int64_t *)PTR(6), v[8], v[9], v[10],
                          v[11], v[12], scale, work, b, e, (int)v[13]);
    free(work);
}

/* v: out, q, keys, values, allowed, items, queries, block, q_heads, kv_heads, dim, cols, capacity, is_bf16; eps:
 * the scale. A span is a range of (row, key/value head, block of queries) items; each thread has its own scratch. */
static void run_rows_attention(const int64_t *v, float scale, int64_t b, int64_t e) {
    const int64_t width = (v[11] + 15) / 16 * 16;
    float *work = (float *)malloc((size_t)((v[10] + 1) * width + 2 * v[10]) * sizeof(float));
    if (work == NULL) return;
    rows_attention_impl(PTR(0), PTR(1), PTR(2), PTR(3), (const uint8_t *)PTR(4), v[6], v[7], v[8], v[9], v[10], v[11],
                        v[12], scale, work, b, e, (int)v[13]);
    free(work);
}

/* v: out, x, signs, perm, gs, d, L, D, blocks, transpose, chunk, scratch; a span starts at a chunk of `chunk`
 * blocks and works in that chunk's 2·L floats of scratch and, in the transpose, sums into that chunk's row of
 * out (d floats per chunk), so the result does not depend on which thread runs which span. */
static void run_fastfood(const int64_t *v, float eps, int64_t b, int64_t e) {
    (void)eps;
    const int64_t chunk = b / v[10];
    float *work = (float *)PTR(11) + chunk * 2 * v[6];
    float *out = (float *)PTR(0) + (v[9] ? chunk * v[5] : 0);
    fastfood_blocks_impl(out, (const float *)PTR(1), (const int8_t *)PTR(2), (const int32_t *)PTR(3),
                         (const float *)PTR(4), v[5], v[6], v[7], b, e - b, work, work + v[6], (int)v[9]);
}

/* Reads the integer arguments (the float one at index float_at, if any, into *eps) and runs the job on
 * args[nargs - 1] threads over n = v[n_at] items. */
static PyObject *call(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Py_ssize_t float_at, int n_at,
                      int64_t grain, int64_t min_span, void (*run)(const int64_t *, float, int64_t, int64_t),
                      const char *name) {
    if (nargs != want + 1) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, want + 1);
        return NULL;
    }
    job_t job = {.run = run, .eps = 0.f};
    for (Py_ssize_t i = 0, k = 0; i < want; i++) {
        if (i == float_at) job.eps = (float)PyFloat_AsDouble(args[i]);
        else job.v[k++] = PyLong_AsLongLong(args[i]);
    }
    int64_t threads = PyLong_AsLongLong(args[want]);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    parallel_for(job, job.v[n_at], grain, min_span, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *linear_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    /* spans of whole 4-row blocks of W, each at least 64 rows: fewer are not worth waking a thread for */
    return call(args, nargs, 8, -1, 6, 4, 64, run_linear_rows, "linear_rows");
}

static PyObject *rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 11, -1, 8, 1, 16, run_rope, "rope");
}

static PyObject *decode_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 15, 13, 7, 1, 2, run_decode_attention, "decode_attention");
}

static PyObject *rows_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 15, 13, 5, 1, 2, run_rows_attention, "rows_attention");
}

static PyObject *silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 5, -1, 3, 16, 1 << 16, run_silu_mul, "silu_mul");
}

static PyObject *silu_mul_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 7, -1, 5, 16, 1 << 16, run_silu_mul_backward, "silu_mul_backward");
}

static PyObject *rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 8, 6, 4, 1, 64, run_rms_norm, "rms_norm");
}

static PyObject *rms_norm_apply(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 7, -1, 4, 1, 64, run_rms_norm_apply, "rms_norm_apply");
}

static PyObject *rms_norm_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 8, -1, 5, 1, 64, run_rms_norm_backward, "rms_norm_backward");
}

static PyObject *dropout(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 7, 5, 2, 16, 1 << 16, run_dropout, "dropout");
}

static PyObject *fastfood(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "fastfood takes 13 arguments");
        return NULL;
    }
    job_t job = {.run = run_fastfood, .eps = 0.f};
    for (int i = 0; i < 12; i++) job.v[i] = PyLong_AsLongLong(args[i]);
    const int64_t threads = PyLong_AsLongLong(args[12]);
    if (PyErr_Occurred()) return NULL;
    if (job.v[5] < 1 || job.v[5] > job.v[6] || job.v[10] < 1 || threads * job.v[10] < job.v[8]) {
        PyErr_SetString(PyExc_ValueError, "fastfood needs 1 <= d <= L and threads * chunk >= blocks");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(job, job.v[8], job.v[10], job.v[10], threads); /* spans of whole chunks */
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *attention_backward_scores(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    /* spans of whole 16-row units for AMX (4 tiles of 4 rows); amx_fits reads the same arguments */
    int64_t v[20] = {0};
    for (Py_ssize_t i = 0, k = 0; i < 19 && i < nargs; i++)
        if (i != 16) v[k++] = PyLong_AsLongLong(args[i]);
    if (PyErr_Occurred()) return NULL;
    if (v[17] && current_isa() < ISA_AVX512BF16) {  /* the other copies would read bf16 pairs as float32 */
        PyErr_SetString(PyExc_ValueError, "attention_backward_scores: pairs need the avx512bf16 or amx kernels");
        return NULL;
    }
    return call(args, nargs, 19, 16, 10, amx_fits(v) ? 4 : 1, 4, run_attention_backward_scores,
                "attention_backward_scores");
}

static PyObject *cross_entropy_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 7, -1, 3, 1, 4, run_cross_entropy_rows, "cross_entropy_rows");
}

#define N_ARGS 11

/* rows from which add_low_rank spreads over the threads it is given: a prompt's, not a decoding step's few */
#define LOW_RANK_SPREAD_ROWS 16

/* add_low_rank(out, x, A, sBt, rows, in, rank, out_features, is_bf16, blocks, rows_per_block[, threads]):
 * addresses as ints; blocks is 0 (every row uses all rank rows of A and sBt) or the address of an int64 array of
 * (offset, n) pairs, one per group of rows_per_block rows. On the calling thread, which holds the GIL: a few
 * rows are less work than waking other threads; with threads > 1, a prompt's many rows (LOW_RANK_SPREAD_ROWS)
 * spread over them, the same bits. */
static PyObject *add_low_rank(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != N_ARGS && nargs != N_ARGS + 1) {
        PyErr_SetString(PyExc_TypeError, "add_low_rank takes 11 arguments (12 with threads)");
        return NULL;
    }
    int64_t v[N_ARGS + 1] = {0};
    for (int i = 0; i < nargs; i++) v[i] = PyLong_AsLongLong(args[i]);
    if (PyErr_Occurred()) return NULL;
    const int64_t rows = v[4], in = v[5], rank = v[6], out_f = v[7], rows_per_block = v[10];
    const int64_t *blocks = (const int64_t *)(intptr_t)v[9];
    if (rows < 0 || in < 1 || rank < 1 || rank > MAX_RANK || out_f < 1 || rows_per_block < 1) {
        PyErr_SetString(PyExc_ValueError, "add_low_rank: bad sizes");
        return NULL;
    }
    if (blocks != NULL) {
        for (int64_t b = 0; b * rows_per_block < rows; b++) {
            if (blocks[2 * b] < 0 || blocks[2 * b + 1] < 0 || blocks[2 * b] + blocks[2 * b + 1] > rank) {
                PyErr_SetString(PyExc_ValueError, "add_low_rank: a block lies outside the factors");
                return NULL;
            }
        }
    }
    if (v[N_ARGS] > 1 && rows >= LOW_RANK_SPREAD_ROWS) {  /* as lora_rows lays its values out, with no product */
        job_t job = {.eps = 0.f, .v = {v[0], v[1], 0, 0, rows, in, out_f, v[8], v[2], v[3], rank, v[9], v[10]}};
        Py_BEGIN_ALLOW_THREADS
        lora_rows_over_threads(job, v[N_ARGS]);
        Py_END_ALLOW_THREADS
        Py_RETURN_NONE;
    }
    add_low_rank_bf16_fn fn = v[8] ? add_low_rank_bf16_impl : add_low_rank_f32_impl;
    fn((void *)(intptr_t)v[0], (const void *)(intptr_t)v[1], (const float *)(intptr_t)v[2],
       (const float *)(intptr_t)v[3], rows, in, rank, out_f, blocks, rows_per_block);
    Py_RETURN_NONE;
}

/* lora_rows(out, x, weight, bias, rows, in, out_features, is_bf16, A, sBt, rank, blocks, rows_per_block, threads):
 * an unmerged LoRA layer's whole output for a few rows in one call: linear_rows' product and add_low_rank's update
 * (the same bits), both spread over `threads` threads (addresses as add_low_rank's; bias 0 for none). */
static PyObject *lora_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "lora_rows takes 14 arguments");
        return NULL;
    }
    int64_t v[14];
    for (int i = 0; i < 14; i++) v[i] = PyLong_AsLongLong(args[i]);
    if (PyErr_Occurred()) return NULL;
    const int64_t rows = v[4], in = v[5], out_f = v[6], rank = v[10], rows_per_block = v[12];
    const int64_t *blocks = (const int64_t *)(intptr_t)v[11];
    if (rows < 0 || in < 1 || out_f < 1 || rank < 1 || rank > MAX_RANK || rows_per_block < 1) {
        PyErr_SetString(PyExc_ValueError, "lora_rows: bad sizes");
        return NULL;
    }
    for (int64_t b = 0; blocks != NULL && b * rows_per_block < rows; b++) {
        if (blocks[2 * b] < 0 || blocks[2 * b + 1] < 0 || blocks[2 * b] + blocks[2 * b + 1] > rank) {
            PyErr_SetString(PyExc_ValueError, "lora_rows: a block lies outside the factors");
            return NULL;
        }
    }
    job_t job = {.eps = 0.f};
    for (int i = 0; i < 13; i++) job.v[i] = v[i];
    Py_BEGIN_ALLOW_THREADS
    lora_rows_over_threads(job, v[13]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* run_program(ops, first, last, threads): ops[first:last] of a decoding step's program, one after the other,
 * with the GIL released once (a step of a 30-block model is some 400 kernel calls: released and taken back
 * around each, the GIL goes to whatever other thread wants it, an HTTP server's, and the step waits for it
 * back). `ops` is the address of int64 rows of PROGRAM_WIDTH: the operation, a float's bits (an eps or a scale),
 * then the operation's integer arguments as the Python function of the same name takes them, without the float
 * and the thread count (see loratune/inference/block_step.py). Unchecked: addresses the caller keeps alive. */
#define PROGRAM_WIDTH 24
enum { OP_LINEAR_ROWS = 1, OP_LORA_ROWS, OP_RMS_NORM, OP_ROPE, OP_DECODE_ATTENTION, OP_SILU_MUL, OP_ADD };

/* out += x over n elements (bf16 or float32), on the calling thread: a residual of a few rows */
static void add_into(void *out, const void *x, int64_t n, int bf16) {
    if (bf16) {
        uint16_t *o = (uint16_t *)out;
        const uint16_t *a = (const uint16_t *)x;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)o[i] << 16, w = (uint32_t)a[i] << 16;
            float f, g;
            memcpy(&f, &u, 4), memcpy(&g, &w, 4);
            f += g;
            memcpy(&u, &f, 4);
            o[i] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    } else {
        float *o = (float *)out;
        const float *a = (const float *)x;
        for (int64_t i = 0; i < n; i++) o[i] += a[i];
    }
}

static void run_op(const int64_t *row, int64_t threads) {
    job_t job = {.eps = 0.f};
    int32_t bits = (int32_t)row[1];
    memcpy(&job.eps, &bits, 4);
    memcpy(job.v, row + 2, sizeof(job.v));
    const int64_t *v = job.v;
    switch (row[0]) {
    case OP_LINEAR_ROWS:
        job.run = run_linear_rows;
        parallel_for(job, v[6], 4, 64, threads);
        break;
    case OP_LORA_ROWS:  /* linear_rows' 8 values, then A, sBt, rank, blocks, rows_per_block */
        lora_rows_over_threads(job, threads);
        break;
    case OP_RMS_NORM:
        job.run = run_rms_norm;
        parallel_for(job, v[4], 1, 64, threads);
        break;
    case OP_ROPE:
        job.run = run_rope;
        parallel_for(job, v[8], 1, 16, threads);
        break;
    case OP_DECODE_ATTENTION:
        job.run = run_decode_attention;
        parallel_for(job, v[7], 1, 2, threads);
        break;
    case OP_SILU_MUL:
        job.run = run_silu_mul;
        parallel_for(job, v[3], 16, 1 << 16, threads);
        break;
    case OP_ADD:
        add_into(PTR(0), PTR(1), v[2], (int)v[3]);
        break;
    }
}

static PyObject *run_program(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "run_program takes 4 arguments");
        return NULL;
    }
    const int64_t *ops = (const int64_t *)(intptr_t)PyLong_AsLongLong(args[0]);
    const int64_t first = PyLong_AsLongLong(args[1]), last = PyLong_AsLongLong(args[2]);
    const int64_t threads = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    for (int64_t i = first; i < last; i++) {
        if (ops[i * PROGRAM_WIDTH] < OP_LINEAR_ROWS || ops[i * PROGRAM_WIDTH] > OP_ADD) {
            PyErr_Format(PyExc_ValueError, "run_program: operation %lld is unknown", (long long)i);
            return NULL;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = first; i < last; i++) run_op(ops + i * PROGRAM_WIDTH, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* select(name) -> bool. Meant for start-up and tests: a training kernel that runs meanwhile on other threads
 * may run part of its call with each copy. */
static PyObject *select_(PyObject *self, PyObject *name) {
    (void)self;
    const char *wanted = PyUnicode_AsUTF8(name);
    if (wanted == NULL) return NULL;
    for (int isa = 0; isa < ISA_COUNT; isa++)
        if (strcmp(wanted, isa_names[isa]) == 0) return PyBool_FromLong(select_isa(isa));
    Py_RETURN_FALSE;
}

static PyObject *isa(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    return PyUnicode_FromString(isa_names[current_isa()]);
}

static PyMethodDef methods[] = {
    {"add_low_rank", (PyCFunction)(void (*)(void))add_low_rank, METH_FASTCALL,
     "add_low_rank(out, x, A, sBt, rows, in_features, rank, out_features, is_bf16, blocks, rows_per_block[, "
     "threads]): "
     "out += (x·Aᵀ)·sBt, all addresses of contiguous CPU tensors (see loratune.kernels.lowrank)."},
    {"linear_rows", (PyCFunction)(void (*)(void))linear_rows, METH_FASTCALL,
     "linear_rows(out, x, weight, bias, rows, in_features, out_features, is_bf16, threads): out = x·Wᵀ + bias for "
     "a few rows, each weight read once (bias 0 for none)."},
    {"lora_rows", (PyCFunction)(void (*)(void))lora_rows, METH_FASTCALL,
     "lora_rows(out, x, weight, bias, rows, in_features, out_features, is_bf16, A, sBt, rank, blocks, rows_per_block, "
     "threads): out = x·Wᵀ + bias + (x·Aᵀ)·sBt for a few rows, in one call (see loratune.kernels.rows)."},
    {"rope", (PyCFunction)(void (*)(void))rope, METH_FASTCALL,
     "rope(q_out, q, q_heads, k_out, k, k_heads, cos, sin, rows, head_dim, is_bf16, threads): rotary position "
     "embedding (rotate-half) of queries and keys, as transformers' apply_rotary_pos_emb."},
    {"decode_attention", (PyCFunction)(void (*)(void))decode_attention, METH_FASTCALL,
     "decode_attention(out, q, keys, values, k_new, v_new, mask, pairs, q_heads, kv_heads, head_dim, cols, capacity, "
     "scale, is_bf16, threads): one new token per row attending to its cached keys and values and its own, which "
     "it writes into the cache's column cols - 1 (see loratune.inference.block_step)."},
    {"rows_attention", (PyCFunction)(void (*)(void))rows_attention, METH_FASTCALL,
     "rows_attention(out, q, keys, values, allowed, items, queries, block, q_heads, kv_heads, head_dim, cols, "
     "capacity, scale, is_bf16, threads): a prompt's attention, each query over its allowed columns in order, "
     "whatever else the call holds (see loratune.kernels.fused.rows_attention)."},
    {"silu_mul", (PyCFunction)(void (*)(void))silu_mul, METH_FASTCALL,
     "silu_mul(out, gate, up, n, is_bf16, threads): out = silu(gate)·up over n elements (addresses)."},
    {"silu_mul_backward", (PyCFunction)(void (*)(void))silu_mul_backward, METH_FASTCALL,
     "silu_mul_backward(grad_gate, grad_up, gate, up, grad, n, is_bf16, threads): silu(gate)·up's gradients."},
    {"rms_norm", (PyCFunction)(void (*)(void))rms_norm, METH_FASTCALL,
     "rms_norm(out, rstd, x, weight, rows, h, eps, is_bf16, threads): Llama's RMSNorm over rows of h elements."},
    {"rms_norm_apply", (PyCFunction)(void (*)(void))rms_norm_apply, METH_FASTCALL,
     "rms_norm_apply(out, rstd, x, weight, rows, h, is_bf16, threads): rms_norm's output for a known rstd."},
    {"rms_norm_backward", (PyCFunction)(void (*)(void))rms_norm_backward, METH_FASTCALL,
     "rms_norm_backward(grad_x, grad, x, weight, rstd, rows, h, is_bf16, threads): RMSNorm's input gradient."},
    {"dropout", (PyCFunction)(void (*)(void))dropout, METH_FASTCALL,
     "dropout(out, x, n, seed, keep_below, scale, is_bf16, threads): out = keep(seed, i) ? x·scale : 0."},
    {"attention_backward_scores", (PyCFunction)(void (*)(void))attention_backward_scores, METH_FASTCALL,
     "attention_backward_scores(probs, grad_scores, q, go, o, kt, vt, lse, mask, mask_row, tiles, rows_per_batch, "
     "q_len, k_len, head_dim, causal, scale, is_bf16, pairs, threads): attention's probabilities and score "
     "gradients (pairs: q, dO in bf16 and k, v in bf16 pairs, only with the avx512bf16 and amx kernels)."},
    {"cross_entropy_rows", (PyCFunction)(void (*)(void))cross_entropy_rows, METH_FASTCALL,
     "cross_entropy_rows(logits, lse, targets, rows, vocab, want_grad, is_bf16, threads): each row's log-sum-exp, "
     "and with want_grad the row overwritten by softmax - onehot(target)."},
    {"fastfood", (PyCFunction)(void (*)(void))fastfood, METH_FASTCALL,
     "fastfood(out, x, signs, perm, gs, d, L, D, blocks, transpose, chunk, scratch, threads): a Fastfood "
     "projection's blocks in float32 (int8 signs, int32 permutation, scaled Gaussian diagonal; scratch: 2·L floats "
     "per chunk of `chunk` blocks): out = P·x (D values), or with transpose each chunk adds its blocks' Pᵀ·x into "
     "its own row of out (d floats per chunk; see loratune.train.projection)."},
    {"run_program", (PyCFunction)(void (*)(void))run_program, METH_FASTCALL,
     "run_program(ops, first, last, threads): rows first..last of a decoding step's program (int64 rows of "
     "PROGRAM_WIDTH: operation, float bits, arguments) with the GIL released once (see "
     "loratune.inference.block_step)."},
    {"select", (PyCFunction)select_, METH_O,
     "select(isa): runs every kernel as the copy for `isa` (one of RUNNABLE) from now on; False (nothing changed) "
     "for one this CPU cannot run or that was not built."},
    {"isa", (PyCFunction)isa, METH_NOARGS, "isa(): the instruction set the kernels run with now."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "loratune.kernels._cpu", NULL, -1, methods};

/* RUNNABLE: the instruction sets this CPU runs, in the order of kernels.h (the best last); BUILT: every one
 * compiled in, whatever the CPU. */
static PyObject *isa_tuple(int runnable_only) {
    PyObject *names = PyList_New(0);
    for (int isa = 0; names != NULL && isa < ISA_COUNT; isa++) {
        if (!(runnable_only ? isa_runnable(isa) : isa_built(isa))) continue;
        PyObject *name = PyUnicode_FromString(isa_names[isa]);
        if (name == NULL || PyList_Append(names, name) < 0) Py_CLEAR(names);
        Py_XDECREF(name);
    }
    PyObject *tuple = names != NULL ? PyList_AsTuple(names) : NULL;
    Py_XDECREF(names);
    return tuple;
}

static int add_isa_tuple(PyObject *m, const char *name, int runnable_only) {
    PyObject *tuple = isa_tuple(runnable_only);
    const int result = PyModule_AddObjectRef(m, name, tuple);
    Py_XDECREF(tuple);
    return result;
}

PyMODINIT_FUNC PyInit__cpu(void) {
    detect_isas();
    int best = ISA_COUNT - 1;
    while (!isa_runnable(best)) best--;  /* the baseline always runs */
    select_isa(best);
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (add_isa_tuple(m, "RUNNABLE", 1) < 0 || add_isa_tuple(m, "BUILT", 0) < 0 ||
                      PyModule_AddIntConstant(m, "MAX_RANK", MAX_RANK) < 0 ||
                      PyModule_AddIntConstant(m, "PROGRAM_WIDTH", PROGRAM_WIDTH) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
