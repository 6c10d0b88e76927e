/* loratune.layers._lowrank_cpu: the low-rank update of an unmerged LoRA layer for a few rows on a CPU,
 * out += (x·Aᵀ)·(s·Bᵀ), as one call instead of four PyTorch operations (cast, two small products, add).
 * Decoding runs hundreds of these per token, where each PyTorch operation costs microseconds of dispatch and
 * cold caches next to the base layer's product; see layers/lowrank_cpu.py, which checks every argument.
 *
 * The kernel is compiled for AVX-512, AVX2+FMA and the baseline instruction set; the module picks the best
 * one the CPU has when it is imported. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_RANK 1024

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define X86_DISPATCH 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define NAME(n) n##_avx512
#include "_lowrank_cpu_body.h"
#undef NAME
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NAME(n) n##_avx2
#include "_lowrank_cpu_body.h"
#undef NAME
#pragma GCC pop_options
#endif
#define NAME(n) n##_baseline
#include "_lowrank_cpu_body.h"
#undef NAME

typedef void (*kernel_fn)(void *, const void *, const float *, const float *, int64_t, int64_t, int64_t, int64_t);
static kernel_fn kernel_bf16 = add_low_rank_bf16_baseline;
static kernel_fn kernel_f32 = add_low_rank_f32_baseline;
static const char *isa = "baseline";

/* add_low_rank(out_ptr, x_ptr, A_ptr, sBt_ptr, rows, in, rank, out_features, is_bf16): addresses as ints. */
static PyObject *add_low_rank(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "add_low_rank takes 9 arguments");
        return NULL;
    }
    int64_t v[9];
    for (int i = 0; i < 9; i++) v[i] = PyLong_AsLongLong(args[i]);
    if (PyErr_Occurred()) return NULL;
    if (v[4] < 0 || v[5] < 1 || v[6] < 1 || v[6] > MAX_RANK || v[7] < 1) {
        PyErr_SetString(PyExc_ValueError, "add_low_rank: bad sizes");
        return NULL;
    }
    kernel_fn fn = v[8] ? kernel_bf16 : kernel_f32;
    fn((void *)(intptr_t)v[0], (const void *)(intptr_t)v[1], (const float *)(intptr_t)v[2],
       (const float *)(intptr_t)v[3], v[4], v[5], v[6], v[7]);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_low_rank", (PyCFunction)(void (*)(void))add_low_rank, METH_FASTCALL,
     "add_low_rank(out, x, A, sBt, rows, in_features, rank, out_features, is_bf16): out += (x·Aᵀ)·sBt, "
     "all addresses of contiguous CPU tensors (see loratune.layers.lowrank_cpu)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lowrank_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__lowrank_cpu(void) {
#ifdef X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        kernel_bf16 = add_low_rank_bf16_avx512, kernel_f32 = add_low_rank_f32_avx512, isa = "avx512";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        kernel_bf16 = add_low_rank_bf16_avx2, kernel_f32 = add_low_rank_f32_avx2, isa = "avx2";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "ISA", isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
