/* loratune.kernels._lowrank_cpu: the low-rank update of an unmerged LoRA layer for a few rows on a CPU,
 * out += (x·Aᵀ)·(s·Bᵀ), as one call instead of four PyTorch operations (cast, two small products, add).
 * Decoding runs hundreds of these per token, where each PyTorch operation costs microseconds of dispatch and
 * cold caches next to the base layer's product; see kernels/lowrank.py, which checks every argument.
 *
 * The kernel is compiled for AVX-512, AVX2+FMA and the baseline instruction set; the module picks the best
 * one the CPU has when it is imported. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_RANK 1024

#define KERNEL_BODY "_lowrank_cpu_body.h"
#include "_per_isa.h"

typedef void (*kernel_fn)(void *, const void *, const float *, const float *, int64_t, int64_t, int64_t, int64_t,
                          const int64_t *, int64_t);
static kernel_fn kernel_bf16 = add_low_rank_bf16_baseline;
static kernel_fn kernel_f32 = add_low_rank_f32_baseline;
static const char *isa = "baseline";

#define N_ARGS 11

/* add_low_rank(out, x, A, sBt, rows, in, rank, out_features, is_bf16, blocks, rows_per_block): addresses as
 * ints; blocks is 0 (every row uses all rank rows of A and sBt) or the address of an int64 array of
 * (offset, n) pairs, one per group of rows_per_block rows. */
static PyObject *add_low_rank(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != N_ARGS) {
        PyErr_SetString(PyExc_TypeError, "add_low_rank takes 11 arguments");
        return NULL;
    }
    int64_t v[N_ARGS];
    for (int i = 0; i < N_ARGS; i++) v[i] = PyLong_AsLongLong(args[i]);
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
    kernel_fn fn = v[8] ? kernel_bf16 : kernel_f32;
    fn((void *)(intptr_t)v[0], (const void *)(intptr_t)v[1], (const float *)(intptr_t)v[2],
       (const float *)(intptr_t)v[3], rows, in, rank, out_f, blocks, rows_per_block);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add_low_rank", (PyCFunction)(void (*)(void))add_low_rank, METH_FASTCALL,
     "add_low_rank(out, x, A, sBt, rows, in_features, rank, out_features, is_bf16, blocks, rows_per_block): "
     "out += (x·Aᵀ)·sBt, all addresses of contiguous CPU tensors (see loratune.kernels.lowrank)."},
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
    if (m != NULL && (PyModule_AddStringConstant(m, "ISA", isa) < 0 ||
                      PyModule_AddIntConstant(m, "MAX_RANK", MAX_RANK) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
