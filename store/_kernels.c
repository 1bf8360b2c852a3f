/* Sorting integer keys, for the queries' distinct counts.
 *
 * Counting distinct users per group sorts (group, user) keys: 200k of them for a typical test,
 * millions for a large one. numpy's sort takes ~25 ns per key on this project's machines; an
 * LSD radix sort of 11-bit digits, skipping the digits above the largest key, takes a few, with
 * the GIL released so other queries and ingest run meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DIGIT_BITS 11
#define BUCKETS (1 << DIGIT_BITS)

#define RADIX_SORT(NAME, T)                                                                        \
    static int NAME(T *keys, size_t n) {                                                           \
        T top = 0;                                                                                 \
        for (size_t i = 0; i < n; i++)                                                             \
            top |= keys[i];                                                                        \
        T *tmp = malloc(n * sizeof(T));                                                            \
        if (tmp == NULL)                                                                           \
            return -1;                                                                             \
        T *src = keys, *dst = tmp;                                                                 \
        size_t count[BUCKETS];                                                                     \
        for (unsigned shift = 0; shift < 8 * sizeof(T) && (top >> shift) != 0; shift += DIGIT_BITS) { \
            memset(count, 0, sizeof(count));                                                       \
            for (size_t i = 0; i < n; i++)                                                         \
                count[(src[i] >> shift) & (BUCKETS - 1)]++;                                        \
            if (count[(src[0] >> shift) & (BUCKETS - 1)] == n)                                     \
                continue; /* every key has this digit: the pass would not move anything */         \
            size_t sum = 0;                                                                        \
            for (size_t b = 0; b < BUCKETS; b++) {                                                 \
                size_t c = count[b];                                                               \
                count[b] = sum;                                                                    \
                sum += c;                                                                          \
            }                                                                                      \
            for (size_t i = 0; i < n; i++)                                                         \
                dst[count[(src[i] >> shift) & (BUCKETS - 1)]++] = src[i];                          \
            T *swap = src;                                                                         \
            src = dst;                                                                             \
            dst = swap;                                                                            \
        }                                                                                          \
        if (src != keys)                                                                           \
            memcpy(keys, src, n * sizeof(T));                                                      \
        free(tmp);                                                                                 \
        return 0;                                                                                  \
    }

RADIX_SORT(sort32, uint32_t)
RADIX_SORT(sort64, uint64_t)

/* sort_unsigned(keys): sorts a writable, contiguous array of 4- or 8-byte integers in place, as
 * unsigned numbers (signed keys must be non-negative for that to be their order). */
static PyObject *sort_unsigned(PyObject *self, PyObject *args) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (view.itemsize != 4 && view.itemsize != 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "keys must be 4- or 8-byte integers");
        return NULL;
    }
    size_t n = (size_t)(view.len / view.itemsize);
    int failed = 0;
    if (n > 1) {
        Py_BEGIN_ALLOW_THREADS
        failed = view.itemsize == 4 ? sort32((uint32_t *)view.buf, n) : sort64((uint64_t *)view.buf, n);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sort_unsigned", sort_unsigned, METH_VARARGS, "Sort 4- or 8-byte unsigned keys in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
