/* loratune.train._fused_cpu: the elementwise parts of a training step as single passes over memory — a Llama
 * block's RMSNorm forward and backward and silu(gate)·up forward and backward, and dropout from a counter-based
 * mask — in float32 arithmetic on bf16 or float32 tensors. In PyTorch operations each is a chain of five to fifteen operations, each writing a fresh
 * intermediate tensor; here every element is read and written once. loratune/train/fused_cpu.py checks every
 * argument before it reaches these functions (they take raw addresses).
 *
 * Compiled for AVX-512, AVX2+FMA and the baseline instruction set; the module picks the best one the CPU has
 * when it is imported. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define KERNEL_BODY "train/_fused_cpu_body.h" /* relative to _per_isa.h */
#include "../_per_isa.h"

typedef void (*silu_mul_fn)(void *, const void *, const void *, int64_t, int);
typedef void (*silu_mul_backward_fn)(void *, void *, const void *, const void *, const void *, int64_t, int);
typedef void (*rms_norm_fn)(void *, float *, const void *, const void *, int64_t, int64_t, float, int);
typedef void (*rms_norm_apply_fn)(void *, const float *, const void *, const void *, int64_t, int64_t, int);
typedef void (*rms_norm_backward_fn)(void *, const void *, const void *, const void *, const float *, int64_t,
                                     int64_t, int);
typedef void (*dropout_fn)(void *, const void *, int64_t, int64_t, uint64_t, uint32_t, float, int);

static silu_mul_fn silu_mul_impl = silu_mul_baseline;
static silu_mul_backward_fn silu_mul_backward_impl = silu_mul_backward_baseline;
static rms_norm_fn rms_norm_impl = rms_norm_baseline;
static rms_norm_apply_fn rms_norm_apply_impl = rms_norm_apply_baseline;
static rms_norm_backward_fn rms_norm_backward_impl = rms_norm_backward_baseline;
static dropout_fn dropout_impl = dropout_baseline;
static const char *isa = "baseline";

/* One call's arguments: addresses, sizes, and the float eps; a span [begin, end) of elements or rows. */
typedef struct {
    int64_t v[8];
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
 * that many threads, the calling one included; a thread that cannot be started leaves its span to the caller.
 * PyTorch's own elementwise operations use every thread torch.get_num_threads() gives, so these do too. */
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
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int64_t count = 0;
    for (int64_t begin = 0; begin < n; begin += span, count++) {
        jobs[count] = base;
        jobs[count].begin = begin;
        jobs[count].end = begin + span < n ? begin + span : n;
    }
    for (int64_t t = 1; t < count; t++) started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int64_t t = 1; t < count; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_job(&jobs[t]);
    }
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused_cpu(void) {
#ifdef X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        silu_mul_impl = silu_mul_avx512, silu_mul_backward_impl = silu_mul_backward_avx512;
        rms_norm_impl = rms_norm_avx512, rms_norm_backward_impl = rms_norm_backward_avx512, isa = "avx512";
        rms_norm_apply_impl = rms_norm_apply_avx512, dropout_impl = dropout_avx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        silu_mul_impl = silu_mul_avx2, silu_mul_backward_impl = silu_mul_backward_avx2;
        rms_norm_impl = rms_norm_avx2, rms_norm_backward_impl = rms_norm_backward_avx2, isa = "avx2";
        rms_norm_apply_impl = rms_norm_apply_avx2, dropout_impl = dropout_avx2;
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "ISA", isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
