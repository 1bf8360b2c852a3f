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

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "text_at reads words as little-endian"
#endif

#define RADIX_SORT(NAME, T)                                                                        \
    static int NAME(T *keys, size_t n, unsigned skip) {                                            \
        T top = 0;                                                                                 \
        for (size_t i = 0; i < n; i++)                                                             \
            top |= keys[i];                                                                        \
        T *tmp = malloc(n * sizeof(T));                                                            \
        if (tmp == NULL)                                                                           \
            return -1;                                                                             \
        T *src = keys, *dst = tmp;                                                                 \
        size_t count[BUCKETS];                                                                     \
        for (unsigned shift = skip; shift < 8 * sizeof(T) && (top >> shift) != 0; shift += DIGIT_BITS) { \
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

/* sort_unsigned(keys, skip=0): sorts a writable, contiguous array of 4- or 8-byte integers in
 * place, as unsigned numbers (signed keys must be non-negative for that to be their order). The
 * sort is stable and LSD: with `skip`, the lowest `skip` bits are taken as already in order (a
 * row number the keys carry, ascending), and only the bits above them are sorted by, in fewer
 * passes. */
static PyObject *sort_unsigned(PyObject *self, PyObject *args) {
    PyObject *obj;
    unsigned skip = 0;
    if (!PyArg_ParseTuple(args, "O|I", &obj, &skip))
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (view.itemsize != 4 && view.itemsize != 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "keys must be 4- or 8-byte integers");
        return NULL;
    }
    if (skip >= 8 * (unsigned)view.itemsize) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "skip must be fewer bits than a key has");
        return NULL;
    }
    size_t n = (size_t)(view.len / view.itemsize);
    int failed = 0;
    if (n > 1) {
        Py_BEGIN_ALLOW_THREADS
        failed = view.itemsize == 4 ? sort32((uint32_t *)view.buf, n, skip) : sort64((uint64_t *)view.buf, n, skip);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Sessions and conversions per run, for the session metrics: each user's rows (a run of the
 * rows sorted by group and user) carry their session ids and conversions, and a user's sessions
 * are the distinct ids of the run. The rows are read where they are, through the sorting
 * permutation, in one pass (prefetched ahead: the reads are random), and the ids are compared
 * as bytes: no hash of every id is computed first, and a user's only event (the most common run)
 * reads no id at all. A run's ids are sorted in a scratch array (insertion sort while short, as
 * most are) and its changes counted: O(r log r) comparisons of at most 256 bytes (core/events.py's
 * MAX_STRING_BYTES) whatever the values, so no input can make it slow. */
typedef struct {
    uint64_t w[2]; /* the id's first 16 bytes, zero past its end: most ids are told apart by them */
    const uint8_t *p;
    int64_t len;
} text_t;

/* Any order in which equal ids are together will do: the words first (in the scratch array,
 * where sorting finds them), then the length, then the bytes past the sixteenth. */
static int compare_text(const void *a, const void *b) {
    const text_t *x = a, *y = b;
    if (x->w[0] != y->w[0])
        return x->w[0] < y->w[0] ? -1 : 1;
    if (x->w[1] != y->w[1])
        return x->w[1] < y->w[1] ? -1 : 1;
    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return x->len > 16 ? memcmp(x->p + 16, y->p + 16, (size_t)(x->len - 16)) : 0;
}

/* `room`: the bytes the data holds from the id on (16 are read at once where it has them). */
static inline void text_at(text_t *t, const uint8_t *p, int64_t len, int64_t room) {
    t->p = p;
    t->len = len;
    if (room < 16) {
        t->w[0] = t->w[1] = 0;
        memcpy(t->w, p, (size_t)(len < 16 ? len : 16));
        return;
    }
    memcpy(t->w, p, 16);
    if (len < 8) {
        t->w[0] = len ? t->w[0] & (~0ULL >> (64 - 8 * len)) : 0;
        t->w[1] = 0;
    } else if (len < 16) {
        t->w[1] = len > 8 ? t->w[1] & (~0ULL >> (64 - 8 * (len - 8))) : 0;
    }
}

static int64_t distinct_in(text_t *run, size_t n) {
    if (n < 2)
        return (int64_t)n;
    if (n <= 16) {
        for (size_t i = 1; i < n; i++) {
            text_t x = run[i];
            size_t j = i;
            for (; j > 0 && compare_text(&x, &run[j - 1]) < 0; j--)
                run[j] = run[j - 1];
            run[j] = x;
        }
    } else {
        qsort(run, n, sizeof(text_t), compare_text);
    }
    int64_t count = 1;
    for (size_t i = 1; i < n; i++)
        count += compare_text(&run[i], &run[i - 1]) != 0;
    return count;
}

#define AHEAD 16 /* rows prefetched ahead of the one read */

/* session_moments(offsets int32[n + 1], data, conversion uint8[n], order int64[m], bounds int64[k + 1],
 *                 groups int64[k], out float64[6, g]): the rows' session ids are an Arrow string
 * array's offsets and data; run i (a user in group groups[i]) is rows order[bounds[i]] ..
 * order[bounds[i + 1] - 1], with e_i events, s_i distinct ids and c_i conversions. Per group,
 * out holds the sums of e and s, the centered sums of squares of e and s, and the centered
 * co-moments of c with s and of e with s (the delta method's terms of conversions and events
 * per session), summed run by run in order, as numpy's bincount sums its weights. */
static PyObject *session_moments(PyObject *self, PyObject *args) {
    Py_buffer offsets, data, conversion, order, bounds, groups, out;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*w*", &offsets, &data, &conversion, &order, &bounds, &groups, &out))
        return NULL;
    Py_ssize_t n = offsets.len / (Py_ssize_t)sizeof(int32_t) - 1, m = order.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t k = groups.len / (Py_ssize_t)sizeof(int64_t), n_groups = out.len / (6 * (Py_ssize_t)sizeof(double));
    const int64_t *b = (const int64_t *)bounds.buf, *o = (const int64_t *)order.buf, *g = (const int64_t *)groups.buf;
    int bad = n < 0 || offsets.len % (Py_ssize_t)sizeof(int32_t) || conversion.len != n ||
              order.len % (Py_ssize_t)sizeof(int64_t) || groups.len % (Py_ssize_t)sizeof(int64_t) ||
              bounds.len != (k + 1) * (Py_ssize_t)sizeof(int64_t) || out.len != 6 * n_groups * (Py_ssize_t)sizeof(double);
    size_t longest = 0;
    for (Py_ssize_t i = 0; !bad && i < k; i++) {
        if (b[i] < 0 || b[i + 1] < b[i] || b[i + 1] > m || g[i] < 0 || g[i] >= n_groups)
            bad = 1;
        else if ((size_t)(b[i + 1] - b[i]) > longest)
            longest = (size_t)(b[i + 1] - b[i]);
    }
    text_t *scratch = bad ? NULL : malloc(longest ? longest * sizeof(text_t) : 1);
    double *runs = bad ? NULL : malloc(k ? 2 * (size_t)k * sizeof(double) : 1); /* s_i, c_i */
    double *per = bad ? NULL : calloc(n_groups ? 4 * (size_t)n_groups : 1, sizeof(double)); /* users, means */
    int outside = 0; /* a row past the rows, or a string past the data */
    if (!bad && scratch != NULL && runs != NULL && per != NULL) {
        const int32_t *off = (const int32_t *)offsets.buf;
        const uint8_t *bytes = (const uint8_t *)data.buf, *c = (const uint8_t *)conversion.buf;
        double *sum_e = (double *)out.buf, *sum_s = sum_e + n_groups, *m2_e = sum_s + n_groups,
               *m2_s = m2_e + n_groups, *co_cs = m2_s + n_groups, *co_es = co_cs + n_groups;
        double *users = per, *mean_e = per + n_groups, *mean_s = mean_e + n_groups, *mean_c = mean_s + n_groups;
        Py_BEGIN_ALLOW_THREADS
        memset(out.buf, 0, (size_t)out.len);
        for (Py_ssize_t i = 0; i < k && !outside; i++) {
            size_t len = (size_t)(b[i + 1] - b[i]);
            int64_t converted = 0;
            for (size_t j = 0; j < len; j++) {
                Py_ssize_t at = b[i] + (Py_ssize_t)j;
                /* Two stages: a row's offsets and conversion, then (its offsets read by now) its id. */
                if (at + AHEAD < m && (uint64_t)o[at + AHEAD] < (uint64_t)n) {
                    __builtin_prefetch(&off[o[at + AHEAD]]);
                    __builtin_prefetch(&c[o[at + AHEAD]]);
                }
                if (at + AHEAD / 2 < m && (uint64_t)o[at + AHEAD / 2] < (uint64_t)n)
                    __builtin_prefetch(bytes + off[o[at + AHEAD / 2]]);
                int64_t row = o[at];
                if ((uint64_t)row >= (uint64_t)n) {
                    outside = 1;
                    break;
                }
                converted += c[row];
                if (len == 1)
                    break; /* one event: one session, whatever its id */
                int64_t lo = off[row], hi = off[row + 1];
                if (lo < 0 || hi < lo || hi > data.len) {
                    outside = 1;
                    break;
                }
                text_at(&scratch[j], bytes + lo, hi - lo, data.len - lo);
            }
            if (outside)
                break;
            runs[2 * i] = (double)distinct_in(scratch, len);
            runs[2 * i + 1] = (double)converted;
            users[g[i]] += 1;
            sum_e[g[i]] += (double)len;
            sum_s[g[i]] += runs[2 * i];
            mean_c[g[i]] += runs[2 * i + 1]; /* summed here, divided below */
        }
        if (!outside) {
            for (Py_ssize_t j = 0; j < n_groups; j++) {
                mean_e[j] = users[j] > 0 ? sum_e[j] / users[j] : 0.0;
                mean_s[j] = users[j] > 0 ? sum_s[j] / users[j] : 0.0;
                mean_c[j] = users[j] > 0 ? mean_c[j] / users[j] : 0.0;
            }
            for (Py_ssize_t i = 0; i < k; i++) {
                Py_ssize_t j = g[i];
                double de = (double)(b[i + 1] - b[i]) - mean_e[j], ds = runs[2 * i] - mean_s[j],
                       dc = runs[2 * i + 1] - mean_c[j];
                m2_e[j] += de * de;
                m2_s[j] += ds * ds;
                co_cs[j] += dc * ds;
                co_es[j] += de * ds;
            }
        }
        Py_END_ALLOW_THREADS
    }
    free(scratch);
    free(runs);
    free(per);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&conversion);
    PyBuffer_Release(&order);
    PyBuffer_Release(&bounds);
    PyBuffer_Release(&groups);
    PyBuffer_Release(&out);
    if (bad || outside) {
        PyErr_SetString(PyExc_ValueError, bad ? "bounds must rise within the order, one more than the runs' groups, "
                                                "each group within the output, with one conversion byte per string"
                                              : "the order names a row past the strings, or a string past the data");
        return NULL;
    }
    if (scratch == NULL || runs == NULL || per == NULL)
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
    {"session_moments", session_moments, METH_VARARGS, "Per group, the moments of users' events, sessions and conversions."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
