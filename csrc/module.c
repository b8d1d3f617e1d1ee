/* sparseferry._native: the CPython entry points of the kernels (plain C API, no numpy/pybind11).
 *
 * Tensors arrive as raw addresses (tensor.data_ptr()) plus sizes; sparseferry/kernels/native.py
 * checks dtypes, shapes, contiguity and device before calling, and keeps the tensors alive.
 * Every kernel releases the GIL while it runs, so a background thread can decompress the next
 * layer while the main thread computes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "sf_kernels.h"

static int g_paths = 0;

static PyObject *py_qx_paths(PyObject *self, PyObject *args) {
    (void)self, (void)args;
    return PyLong_FromLong(sf_qx_paths());
}

static PyObject *py_supported_paths(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(g_paths);
}

static int check_path(int path) {
    if (path < 0 || path > SF_PATH_AVX512 || !(g_paths & (1 << path))) {
        PyErr_Format(PyExc_ValueError, "kernel path %d is not supported on this CPU", path);
        return 0;
    }
    return 1;
}

/* decompress(path, elem_size, rows, cols, values, nnz, bitmask, row_offsets, out, threads) -> bad_row */
static PyObject *py_decompress(PyObject *self, PyObject *args) {
    (void)self;
    int path, elem_size, threads;
    long long rows, cols, nnz;
    unsigned long long values, bitmask, row_offsets, out;
    if (!PyArg_ParseTuple(args, "iiLLKLKKKi", &path, &elem_size, &rows, &cols, &values, &nnz, &bitmask,
                          &row_offsets, &out, &threads))
        return NULL;
    if (!check_path(path)) return NULL;
    if (elem_size != 2 && elem_size != 4) return PyErr_Format(PyExc_ValueError, "elem_size %d not 2 or 4", elem_size);
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = sf_decompress(path, elem_size, rows, cols, (const void *)(uintptr_t)values, nnz,
                        (const uint8_t *)(uintptr_t)bitmask, (const int64_t *)(uintptr_t)row_offsets,
                        (void *)(uintptr_t)out, threads < 1 ? 1 : threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

/* matvec(path, dtype, rows, cols, values, nnz, bitmask, row_offsets, x, x_dtype, batch, y, threads[, out, bias]) -> bad_row */
/* The path and the W / x dtype codes of a matvec call (0 with the Python error set). */
static int check_matvec_args(int path, int dtype, int x_dtype) {
    if (!check_path(path)) return 0;
    if (dtype < SF_F32 || dtype > SF_F16) return PyErr_Format(PyExc_ValueError, "dtype code %d unknown", dtype), 0;
    if (x_dtype != SF_F32 && x_dtype != SF_BF16) return PyErr_Format(PyExc_ValueError, "x dtype code %d", x_dtype), 0;
    return 1;
}

/* The optional last two arguments of the matvecs: a bf16 [batch, rows] out that also receives y rounded
 * (+ a bf16 bias [rows], or 0): the decode step's products without a second call. */
static void round_out(unsigned long long y, long long batch, long long rows, unsigned long long bias,
                      unsigned long long out) {
    sf_round_bf16((const float *)(uintptr_t)y, batch, rows, (const uint16_t *)(uintptr_t)bias, (uint16_t *)(uintptr_t)out);
}

static PyObject *py_matvec(PyObject *self, PyObject *args) {
    (void)self;
    int path, dtype, x_dtype, threads;
    long long rows, cols, nnz, batch;
    unsigned long long values, bitmask, row_offsets, x, y, out16 = 0, bias16 = 0;
    if (!PyArg_ParseTuple(args, "iiLLKLKKKiLKi|KK", &path, &dtype, &rows, &cols, &values, &nnz, &bitmask, &row_offsets,
                          &x, &x_dtype, &batch, &y, &threads, &out16, &bias16))
        return NULL;
    if (!check_matvec_args(path, dtype, x_dtype)) return NULL;
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = sf_matvec(path, dtype, rows, cols, (const void *)(uintptr_t)values, nnz, (const uint8_t *)(uintptr_t)bitmask,
                    (const int64_t *)(uintptr_t)row_offsets, (const void *)(uintptr_t)x, x_dtype, batch,
                    (float *)(uintptr_t)y, threads < 1 ? 1 : threads);
    if (bad == -1 && out16) round_out(y, batch, rows, bias16, out16);
    Py_END_ALLOW_THREADS
    if (bad == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(bad);
}

static PyObject *py_matvec_dense(PyObject *self, PyObject *args) {
    (void)self;
    int path, dtype, x_dtype, threads;
    long long rows, cols, batch;
    unsigned long long w, x, y;
    if (!PyArg_ParseTuple(args, "iiLLKKiLKi", &path, &dtype, &rows, &cols, &w, &x, &x_dtype, &batch, &y, &threads))
        return NULL;
    if (!check_matvec_args(path, dtype, x_dtype)) return NULL;
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = sf_matvec_dense(path, dtype, rows, cols, (const void *)(uintptr_t)w, (const void *)(uintptr_t)x, x_dtype,
                          batch, (float *)(uintptr_t)y, threads < 1 ? 1 : threads);
    Py_END_ALLOW_THREADS
    if (bad == -2) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The quantized-values description shared by decompress_q and matvec_q. */
static int parse_quant(int qbits, unsigned long long codes, unsigned long long scales, unsigned long long zeros,
                       unsigned long long group_offsets, long long group_size, long long nscales, long long nnz,
                       sf_quant *q) {
    if (qbits != 8 && qbits != 4) {
        PyErr_Format(PyExc_ValueError, "qbits %d not 8 or 4", qbits);
        return 0;
    }
    if (group_size < 1 || nscales < 0 || (qbits == 8 && zeros) || (qbits == 4 && !zeros && nscales > 0)) {
        PyErr_Format(PyExc_ValueError, "bad quantization (group_size %lld, nscales %lld, zeros %s)", group_size, nscales,
                     zeros ? "given" : "absent");
        return 0;
    }
    q->qbits = qbits;
    q->codes = (const uint8_t *)(uintptr_t)codes;
    q->scales = (const uint16_t *)(uintptr_t)scales;
    q->zeros = zeros ? (const uint8_t *)(uintptr_t)zeros : NULL;
    q->group_offsets = (const int64_t *)(uintptr_t)group_offsets;
    q->group_size = group_size;
    q->nscales = nscales;
    q->ncodes = qbits == 8 ? nnz : (nnz + 1) / 2;
    return 1;
}

/* decompress_q(path, qbits, out_dtype, rows, cols, nnz, codes, scales, zeros, group_offsets, group_size, nscales,
 *              bitmask, row_offsets, out, threads) -> bad_row        (zeros: 0 for int8) */
static PyObject *py_decompress_q(PyObject *self, PyObject *args) {
    (void)self;
    int path, qbits, out_dtype, threads;
    long long rows, cols, nnz, group_size, nscales;
    unsigned long long codes, scales, zeros, group_offsets, bitmask, row_offsets, out;
    if (!PyArg_ParseTuple(args, "iiiLLLKKKKLLKKKi", &path, &qbits, &out_dtype, &rows, &cols, &nnz, &codes, &scales,
                          &zeros, &group_offsets, &group_size, &nscales, &bitmask, &row_offsets, &out, &threads))
        return NULL;
    if (!check_path(path)) return NULL;
    if (out_dtype < SF_F32 || out_dtype > SF_F16) return PyErr_Format(PyExc_ValueError, "dtype code %d unknown", out_dtype);
    sf_quant q;
    if (!parse_quant(qbits, codes, scales, zeros, group_offsets, group_size, nscales, nnz, &q)) return NULL;
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = sf_decompress_q(path, &q, out_dtype, rows, cols, nnz, (const uint8_t *)(uintptr_t)bitmask,
                          (const int64_t *)(uintptr_t)row_offsets, (void *)(uintptr_t)out, threads < 1 ? 1 : threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

/* matvec_q(path, qbits, out_dtype, rows, cols, nnz, codes, scales, zeros, group_offsets, group_size, nscales,
 *          bitmask, row_offsets, x, x_dtype, batch, y, threads) -> bad_row
 * matvec_qx(the same arguments) -> bad_row, or -3 where int8 activations do not apply (see sf_matvec_qx) */
static PyObject *matvec_q_any(PyObject *args, int int8_x) {
    int path, qbits, out_dtype, x_dtype, threads;
    long long rows, cols, nnz, group_size, nscales, batch;
    unsigned long long codes, scales, zeros, group_offsets, bitmask, row_offsets, x, y, out16 = 0, bias16 = 0;
    if (!PyArg_ParseTuple(args, "iiiLLLKKKKLLKKKiLKi|KK", &path, &qbits, &out_dtype, &rows, &cols, &nnz, &codes, &scales,
                          &zeros, &group_offsets, &group_size, &nscales, &bitmask, &row_offsets, &x, &x_dtype, &batch,
                          &y, &threads, &out16, &bias16))
        return NULL;
    if (!check_path(path)) return NULL;
    if (out_dtype < SF_F32 || out_dtype > SF_F16) return PyErr_Format(PyExc_ValueError, "dtype code %d unknown", out_dtype);
    if (x_dtype != SF_F32 && x_dtype != SF_BF16) return PyErr_Format(PyExc_ValueError, "x dtype code %d", x_dtype);
    sf_quant q;
    if (!parse_quant(qbits, codes, scales, zeros, group_offsets, group_size, nscales, nnz, &q)) return NULL;
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    if (int8_x)
        bad = sf_matvec_qx(path, &q, rows, cols, nnz, (const uint8_t *)(uintptr_t)bitmask, (const int64_t *)(uintptr_t)row_offsets,
                           (const void *)(uintptr_t)x, x_dtype, batch, (float *)(uintptr_t)y, threads < 1 ? 1 : threads);
    else
        bad = sf_matvec_q(path, &q, out_dtype, rows, cols, nnz, (const uint8_t *)(uintptr_t)bitmask,
                          (const int64_t *)(uintptr_t)row_offsets, (const void *)(uintptr_t)x, x_dtype, batch,
                          (float *)(uintptr_t)y, threads < 1 ? 1 : threads);
    if (bad == -1 && out16) round_out(y, batch, rows, bias16, out16);
    Py_END_ALLOW_THREADS
    if (bad == -2) return PyErr_NoMemory();
    return PyLong_FromLongLong(bad);
}

static PyObject *py_matvec_q(PyObject *self, PyObject *args) {
    (void)self;
    return matvec_q_any(args, 0);
}

static PyObject *py_matvec_qx(PyObject *self, PyObject *args) {
    (void)self;
    return matvec_q_any(args, 1);
}

/* rmsnorm_bf16(x, w, rows, h, eps, out): bf16 rows (addresses checked by the caller) */
static PyObject *py_rmsnorm_bf16(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, w, out;
    long long rows, h;
    double eps;
    if (!PyArg_ParseTuple(args, "KKLLdK", &x, &w, &rows, &h, &eps, &out)) return NULL;
    if (rows < 0 || h < 1) return PyErr_Format(PyExc_ValueError, "rmsnorm: %lld rows of %lld", rows, h);
    sf_rmsnorm_bf16((const uint16_t *)(uintptr_t)x, (const uint16_t *)(uintptr_t)w, rows, h, (float)eps,
                    (uint16_t *)(uintptr_t)out);
    Py_RETURN_NONE;
}

/* rope_bf16(x, b, t, heads, hd, cos, sin, cos_batch): in place (decode.c) */
static PyObject *py_rope_bf16(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, c, s;
    long long b, t, heads, hd, cb;
    if (!PyArg_ParseTuple(args, "KLLLLKKL", &x, &b, &t, &heads, &hd, &c, &s, &cb)) return NULL;
    if (b < 0 || t < 0 || heads < 0 || hd < 2 || hd % 2 || hd > 512 || (cb != 1 && cb != b))
        return PyErr_Format(PyExc_ValueError, "rope: b %lld t %lld heads %lld head_dim %lld cos batch %lld", b, t, heads,
                            hd, cb);
    Py_BEGIN_ALLOW_THREADS
    sf_rope_bf16((uint16_t *)(uintptr_t)x, b, t, heads, hd, (const uint16_t *)(uintptr_t)c,
                 (const uint16_t *)(uintptr_t)s, cb);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* silu_mul_bf16(g, u, n, out) / add_bf16(a, b, n, out): n bf16 numbers */
static PyObject *py_silu_mul_bf16(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long g, u, out;
    long long n;
    if (!PyArg_ParseTuple(args, "KKLK", &g, &u, &n, &out)) return NULL;
    sf_silu_mul_bf16((const uint16_t *)(uintptr_t)g, (const uint16_t *)(uintptr_t)u, n, (uint16_t *)(uintptr_t)out);
    Py_RETURN_NONE;
}

static PyObject *py_add_bf16(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long a, b, out;
    long long n;
    if (!PyArg_ParseTuple(args, "KKLK", &a, &b, &n, &out)) return NULL;
    sf_add_bf16((const uint16_t *)(uintptr_t)a, (const uint16_t *)(uintptr_t)b, n, (uint16_t *)(uintptr_t)out);
    Py_RETURN_NONE;
}

/* round_bf16(y, batch, rows, bias or 0, out): fp32 [batch, rows] (+ bf16 bias [rows]) -> bf16 */
static PyObject *py_round_bf16(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long y, bias, out;
    long long batch, rows;
    if (!PyArg_ParseTuple(args, "KLLKK", &y, &batch, &rows, &bias, &out)) return NULL;
    sf_round_bf16((const float *)(uintptr_t)y, batch, rows, (const uint16_t *)(uintptr_t)bias, (uint16_t *)(uintptr_t)out);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"supported_paths", py_supported_paths, METH_NOARGS, "Bit set of runnable paths: 1<<0 c, 1<<1 avx2, 1<<2 avx512."},
    {"qx_paths", py_qx_paths, METH_NOARGS, "Bit set of the paths matvec_qx runs on here (int8 activations)."},
    {"decompress", py_decompress, METH_VARARGS, "Bitmap -> dense; returns -1 or the index of an inconsistent row."},
    {"matvec", py_matvec, METH_VARARGS, "y = x @ W.T from the bitmap; returns -1 or an inconsistent row."},
    {"matvec_dense", py_matvec_dense, METH_VARARGS, "y = x @ W.T for a dense row-major W (fp32 accumulation)."},
    {"decompress_q", py_decompress_q, METH_VARARGS, "Quantized bitmap -> dense, dequantizing; -1 or a bad row."},
    {"matvec_q", py_matvec_q, METH_VARARGS, "y = x @ W.T from a quantized bitmap; -1 or a bad row."},
    {"rmsnorm_bf16", py_rmsnorm_bf16, METH_VARARGS, "transformers' RMSNorm of bf16 rows with a bf16 weight."},
    {"rope_bf16", py_rope_bf16, METH_VARARGS, "Rotary embedding of bf16 heads in place, transformers' rounding."},
    {"silu_mul_bf16", py_silu_mul_bf16, METH_VARARGS, "bf16(silu(g)) * u in bf16."},
    {"add_bf16", py_add_bf16, METH_VARARGS, "a + b in bf16."},
    {"round_bf16", py_round_bf16, METH_VARARGS, "fp32 rows (+ a bf16 bias) rounded to bf16."},
    {"matvec_qx", py_matvec_qx, METH_VARARGS, "matvec_q with x quantized to int8 per 32 columns; -3: not here."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "sparseferry native kernels", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    g_paths = sf_supported_paths();
    sf_init_tables();
    return PyModule_Create(&module);
}
