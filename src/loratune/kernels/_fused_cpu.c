/* loratune.kernels._fused_cpu: the elementwise parts of a training step as single passes over memory — a Llama
 * block's RMSNorm forward and backward and silu(gate)·up forward and backward, dropout from a counter-based
 * mask, attention's backward between its products, the cross-entropy's softmax — in float32 arithmetic on bf16
 * or float32 tensors. In PyTorch operations each is a chain of five to fifteen operations, each writing a fresh
 * intermediate tensor; here every element is read and written once. loratune/kernels/fused.py checks every
 * argument before it reaches these functions (they take raw addresses).
 *
 * Compiled for AVX-512 with BF16, AVX-512, AVX2+FMA and the baseline instruction set; the module picks the best
 * one the CPU has when it is imported, and attention's products use AMX tiles where the CPU has them and Linux
 * grants them. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KERNEL_BODY "_fused_cpu_body.h"
/* AVX512-BF16 and AMX need GCC 11 / Clang 12 intrinsics; AMX also Linux's permission call */
#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define PER_ISA_AVX512_BF16 1
#if defined(__linux__)
#define WITH_AMX 1
#endif
#endif
#include "_per_isa.h"

typedef void (*silu_mul_fn)(void *, const void *, const void *, int64_t, int);
typedef void (*silu_mul_backward_fn)(void *, void *, const void *, const void *, const void *, int64_t, int);
typedef void (*rms_norm_fn)(void *, float *, const void *, const void *, int64_t, int64_t, float, int);
typedef void (*rms_norm_apply_fn)(void *, const float *, const void *, const void *, int64_t, int64_t, int);
typedef void (*rms_norm_backward_fn)(void *, const void *, const void *, const void *, const float *, int64_t,
                                     int64_t, int);
typedef void (*dropout_fn)(void *, const void *, int64_t, int64_t, uint64_t, uint32_t, float, int);
typedef void (*attention_backward_scores_fn)(void *, void *, const void *, const void *, const void *, const void *,
                                             const void *, const float *, const float *, const int64_t *, int64_t,
                                             int64_t, int64_t, int64_t, int64_t, int64_t, int, float, int, int);

typedef void (*cross_entropy_rows_fn)(void *, float *, const int64_t *, int64_t, int64_t, int, float *, int);
static cross_entropy_rows_fn cross_entropy_rows_impl = cross_entropy_rows_baseline;
static silu_mul_fn silu_mul_impl = silu_mul_baseline;
static silu_mul_backward_fn silu_mul_backward_impl = silu_mul_backward_baseline;
static rms_norm_fn rms_norm_impl = rms_norm_baseline;
static rms_norm_apply_fn rms_norm_apply_impl = rms_norm_apply_baseline;
static rms_norm_backward_fn rms_norm_backward_impl = rms_norm_backward_baseline;
static dropout_fn dropout_impl = dropout_baseline;
static attention_backward_scores_fn attention_backward_scores_impl = attention_backward_scores_baseline;
static const char *isa = "baseline";

/* One call's arguments: addresses, sizes, and the float eps; a span [begin, end) of elements or rows. */
typedef struct {
    int64_t v[20];
    float eps;
    void (*run)(const int64_t *v, float eps, int64_t begin, int64_t end);
    int64_t begin, end;
} job_t;

static void *run_job(void *p) {
    job_t *j = (job_t *)p;
    j->run(j->v, j->eps, j->begin, j->end);
    return NULL;
}

#define MAX_THREADS 64

/* Splits [0, n) into up to `threads` spans (multiples of `grain`, at least `min_span` long) and runs them on
 * that many threads, the calling one included. PyTorch's own elementwise operations use every thread
 * torch.get_num_threads() gives, so these do too. Built with OpenMP (Linux), the spans run on the OpenMP
 * runtime PyTorch loaded (the same libgomp.so.1), so they take PyTorch's own worker threads, which are still
 * spinning from its last operation, instead of new threads competing with them for the cores; otherwise on
 * new threads (a thread that cannot be started leaves its span to the caller). */
static void parallel_for(job_t base, int64_t n, int64_t grain, int64_t min_span, int64_t threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n / min_span) threads = n / min_span;
    if (threads <= 1) {
        base.run(base.v, base.eps, 0, n);
        return;
    }
    int64_t span = (n + threads - 1) / threads;
    span = (span + grain - 1) / grain * grain;
    job_t jobs[MAX_THREADS];
    int64_t count = 0;
    for (int64_t begin = 0; begin < n; begin += span, count++) {
        jobs[count] = base;
        jobs[count].begin = begin;
        jobs[count].end = begin + span < n ? begin + span : n;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)count) schedule(static, 1)
    for (int64_t t = 0; t < count; t++) run_job(&jobs[t]);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 1; t < count; t++) started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int64_t t = 1; t < count; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_job(&jobs[t]);
    }
#endif
}

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

#ifdef WITH_AMX
#include <sys/syscall.h>
#include <unistd.h>

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
static void attention_backward_scores_amx(void *probs, void *grad_scores, const void *q, const void *go, const void *o,
                                          const void *kt, const void *vt, const float *lse, const float *mask,
                                          const int64_t *mask_row, int64_t first_tile, int64_t tiles,
                                          int64_t rows_per_batch, int64_t q_len, int64_t k_len, int64_t head_dim,
                                          int causal, float scale) {
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
        const uint16_t *kt_b = (const uint16_t *)kt + b * head_dim * lp, *vt_b = (const uint16_t *)vt + b * head_dim * lp;
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

/* Asks Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM for XTILEDATA); 1 when granted (or already held). */
static int amx_granted(void) {
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#endif

static int use_amx = 0;

/* Whether the AMX path takes a call (v as run_attention_backward_scores reads it): bf16 in pairs, head_dim a
 * multiple of 32 and each batch entry's rows a multiple of 16. */
static int amx_fits(const int64_t *v) {
    return use_amx && v[16] && v[17] && v[14] % 32 == 0 && v[11] % 16 == 0;
}

/* v: probs, grad_scores, q, go, o, kt, vt, lse, mask, mask_row, tiles, rows_per_batch, q_len, k_len, head_dim,
 * causal, is_bf16, pairs; eps: the scale. A span is a range of 4-row tiles (whole 16-row units where AMX takes it). */
static void run_attention_backward_scores(const int64_t *v, float scale, int64_t b, int64_t e) {
#ifdef WITH_AMX
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

static PyObject *attention_backward_scores(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    /* spans of whole 16-row units for AMX (4 tiles of 4 rows); amx_fits reads the same arguments */
    int64_t v[20] = {0};
    for (Py_ssize_t i = 0, k = 0; i < 19 && i < nargs; i++)
        if (i != 16) v[k++] = PyLong_AsLongLong(args[i]);
    if (PyErr_Occurred()) return NULL;
    return call(args, nargs, 19, 16, 10, amx_fits(v) ? 4 : 1, 4, run_attention_backward_scores,
                "attention_backward_scores");
}

static PyObject *cross_entropy_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return call(args, nargs, 7, -1, 3, 1, 4, run_cross_entropy_rows, "cross_entropy_rows");
}

static PyMethodDef methods[] = {
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
     "gradients (pairs: q, dO in bf16 and k, v in bf16 pairs, only where BF16_PAIRS)."},
    {"cross_entropy_rows", (PyCFunction)(void (*)(void))cross_entropy_rows, METH_FASTCALL,
     "cross_entropy_rows(logits, lse, targets, rows, vocab, want_grad, is_bf16, threads): each row's log-sum-exp, "
     "and with want_grad the row overwritten by softmax - onehot(target)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused_cpu(void) {
#ifdef X86_DISPATCH
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#ifdef PER_ISA_AVX512_BF16
    if (avx512 && __builtin_cpu_supports("avx512bf16")) {
        silu_mul_impl = silu_mul_avx512bf16, silu_mul_backward_impl = silu_mul_backward_avx512bf16;
        rms_norm_impl = rms_norm_avx512bf16, rms_norm_backward_impl = rms_norm_backward_avx512bf16;
        rms_norm_apply_impl = rms_norm_apply_avx512bf16, dropout_impl = dropout_avx512bf16;
        attention_backward_scores_impl = attention_backward_scores_avx512bf16, isa = "avx512bf16";
        cross_entropy_rows_impl = cross_entropy_rows_avx512bf16;
#ifdef WITH_AMX
        use_amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && amx_granted();
#endif
    } else
#endif
    if (avx512) {
        silu_mul_impl = silu_mul_avx512, silu_mul_backward_impl = silu_mul_backward_avx512;
        rms_norm_impl = rms_norm_avx512, rms_norm_backward_impl = rms_norm_backward_avx512, isa = "avx512";
        rms_norm_apply_impl = rms_norm_apply_avx512, dropout_impl = dropout_avx512;
        attention_backward_scores_impl = attention_backward_scores_avx512, cross_entropy_rows_impl = cross_entropy_rows_avx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        silu_mul_impl = silu_mul_avx2, silu_mul_backward_impl = silu_mul_backward_avx2;
        rms_norm_impl = rms_norm_avx2, rms_norm_backward_impl = rms_norm_backward_avx2, isa = "avx2";
        rms_norm_apply_impl = rms_norm_apply_avx2, dropout_impl = dropout_avx2;
        attention_backward_scores_impl = attention_backward_scores_avx2, cross_entropy_rows_impl = cross_entropy_rows_avx2;
    }
#endif
    PyObject *m = PyModule_Create(&module);
    /* With AVX512-BF16, attention_backward_scores takes bf16 q and dO as they are and bf16 k, v in pairs */
    if (m != NULL && (PyModule_AddStringConstant(m, "ISA", isa) < 0 ||
                      PyModule_AddIntConstant(m, "BF16_PAIRS", strcmp(isa, "avx512bf16") == 0) < 0 ||
                      PyModule_AddIntConstant(m, "AMX", use_amx) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
