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

/* Sessions and conversions per run, for the session metrics: each user's rows (a run of the
 * rows sorted by group and user) carry the 128-bit hashes of their session ids and their
 * conversions, and a user's sessions are the distinct hashes of the run. The rows are read where
 * they are, through the sorting permutation, in one pass (prefetched ahead: the reads are
 * random), instead of gathering the hashes and the conversions into sorted copies first. A run's
 * hashes are sorted in a scratch copy (insertion sort while short, as most are) and its changes
 * counted: O(n log r) whatever the values, so no input can make it slow. */
typedef struct {
    uint64_t hi, lo;
} hash128;

static int before128(const hash128 *a, const hash128 *b) {
    return a->hi < b->hi || (a->hi == b->hi && a->lo < b->lo);
}

static int compare128(const void *a, const void *b) {
    return before128(a, b) ? -1 : before128(b, a) ? 1 : 0;
}

static int64_t distinct_in(hash128 *run, size_t n) {
    if (n < 2)
        return (int64_t)n;
    if (n <= 16) {
        for (size_t i = 1; i < n; i++) {
            hash128 x = run[i];
            size_t j = i;
            for (; j > 0 && before128(&x, &run[j - 1]); j--)
                run[j] = run[j - 1];
            run[j] = x;
        }
    } else {
        qsort(run, n, sizeof(hash128), compare128);
    }
    int64_t count = 1;
    for (size_t i = 1; i < n; i++)
        count += run[i].hi != run[i - 1].hi || run[i].lo != run[i - 1].lo;
    return count;
}

#define AHEAD 16 /* rows prefetched ahead of the one read */

/* sessions_in_runs(hashes uint64[n, 2], conversion uint8[n], order int64[m], bounds int64[k + 1],
 *                  sessions int64[k], conversions float64[k]): run i is rows order[bounds[i]] ..
 * order[bounds[i + 1] - 1]; sessions[i] is the number of distinct hashes among them and
 * conversions[i] the sum of their conversions. */
static PyObject *sessions_in_runs(PyObject *self, PyObject *args) {
    Py_buffer hashes, conversion, order, bounds, sessions, conversions;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*w*", &hashes, &conversion, &order, &bounds, &sessions, &conversions))
        return NULL;
    Py_ssize_t n = hashes.len / (Py_ssize_t)sizeof(hash128), m = order.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t k = sessions.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *b = (const int64_t *)bounds.buf, *o = (const int64_t *)order.buf;
    int bad = bounds.len != (k + 1) * (Py_ssize_t)sizeof(int64_t) || hashes.len % (Py_ssize_t)sizeof(hash128) ||
              conversion.len != n || order.len % (Py_ssize_t)sizeof(int64_t) ||
              conversions.len != k * (Py_ssize_t)sizeof(double);
    size_t longest = 0;
    for (Py_ssize_t i = 0; !bad && i < k; i++) {
        if (b[i] < 0 || b[i + 1] < b[i] || b[i + 1] > m)
            bad = 1;
        else if ((size_t)(b[i + 1] - b[i]) > longest)
            longest = (size_t)(b[i + 1] - b[i]);
    }
    hash128 *scratch = bad ? NULL : malloc(longest ? longest * sizeof(hash128) : 1);
    int outside = 0; /* a row number past the rows */
    if (!bad && scratch != NULL) {
        const hash128 *h = (const hash128 *)hashes.buf;
        const uint8_t *c = (const uint8_t *)conversion.buf;
        int64_t *s_out = (int64_t *)sessions.buf;
        double *c_out = (double *)conversions.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < k && !outside; i++) {
            size_t len = (size_t)(b[i + 1] - b[i]);
            int64_t converted = 0;
            for (size_t j = 0; j < len; j++) {
                Py_ssize_t at = b[i] + (Py_ssize_t)j;
                if (at + AHEAD < m && (uint64_t)o[at + AHEAD] < (uint64_t)n) {
                    __builtin_prefetch(&h[o[at + AHEAD]]);
                    __builtin_prefetch(&c[o[at + AHEAD]]);
                }
                int64_t row = o[at];
                if ((uint64_t)row >= (uint64_t)n) {
                    outside = 1;
                    break;
                }
                scratch[j] = h[row];
                converted += c[row];
            }
            if (!outside) {
                s_out[i] = distinct_in(scratch, len);
                c_out[i] = (double)converted;
            }
        }
        Py_END_ALLOW_THREADS
    }
    free(scratch);
    PyBuffer_Release(&hashes);
    PyBuffer_Release(&conversion);
    PyBuffer_Release(&order);
    PyBuffer_Release(&bounds);
    PyBuffer_Release(&sessions);
    PyBuffer_Release(&conversions);
    if (bad || outside) {
        PyErr_SetString(PyExc_ValueError, bad ? "bounds must rise within the order, one more than the outputs, "
                                                "with one conversion byte per hash"
                                              : "the order names a row past the hashes");
        return NULL;
    }
    if (scratch == NULL)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* set_bits(bits uint8[m], users int32 or int64[n]) -> newly set: sets each user's bit (little-endian
 * bits over codes) in place, counting the bits that were not set before, so that a bitset's count
 * of users grows by what a batch adds instead of by a count over the whole bitset (~30 ns per
 * event of sealing for a test of 2M users, done with numpy passes). */
static PyObject *set_bits(PyObject *self, PyObject *args) {
    Py_buffer bits, users;
    if (!PyArg_ParseTuple(args, "w*y*", &bits, &users))
        return NULL;
    PyObject *result = NULL;
    if (users.itemsize != 4 && users.itemsize != 8) {
        PyErr_SetString(PyExc_TypeError, "users must be 4- or 8-byte integers");
        goto done;
    }
    Py_ssize_t n = users.len / users.itemsize;
    uint64_t limit = (uint64_t)bits.len * 8, added = 0;
    int outside = 0;
    uint8_t *b = (uint8_t *)bits.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t u = users.itemsize == 4 ? (uint64_t)(uint32_t)((const int32_t *)users.buf)[i]
                                         : (uint64_t)((const int64_t *)users.buf)[i];
        if (u >= limit) { /* a negative code reads as a huge one */
            outside = 1;
            break;
        }
        uint8_t mask = (uint8_t)(1u << (u & 7));
        added += !(b[u >> 3] & mask);
        b[u >> 3] |= mask;
    }
    Py_END_ALLOW_THREADS
    if (outside)
        PyErr_SetString(PyExc_ValueError, "a user code is outside the bitset");
    else
        result = PyLong_FromUnsignedLongLong(added);
done:
    PyBuffer_Release(&bits);
    PyBuffer_Release(&users);
    return result;
}

static PyMethodDef methods[] = {
    {"set_bits", set_bits, METH_VARARGS, "Set users' bits in a bitset; returns how many were not set."},
    {"sort_unsigned", sort_unsigned, METH_VARARGS, "Sort 4- or 8-byte unsigned keys in place."},
    {"sessions_in_runs", sessions_in_runs, METH_VARARGS, "Distinct 128-bit hashes and conversions in each run of rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
