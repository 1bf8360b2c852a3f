/* The string dictionary's inner loops: hashing strings and probing the code table.
 *
 * numpy has no vectorized way to hash variable-length strings or to probe a hash table; done
 * in numpy passes it cost ~350 ns per value, most of ingest. Here one pass per batch hashes
 * each value straight from the Arrow buffers and finds or assigns its code (~30-100 ns, with
 * the GIL released so queries run meanwhile).
 *
 * The table (see dictionary.py): `slots`, int32 codes with linear probing, power-of-two size;
 * `hashes`, the 128-bit keyed hash of each code's value (16 bytes, one cache line read to confirm
 * a match).
 * Readers probe concurrently with the one writer: a code's hashes are written before the slot
 * that publishes it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define EMPTY (-1)
#define BLOCK 32

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "hash_bytes reads words as little-endian"
#endif

/* SipHash-2-4 with a 128-bit output (Aumasson and Bernstein), keyed per dictionary with 16 random
 * bytes the process never shows: nobody outside it can predict which slot a value takes, so no
 * batch can be made to pile up in one probe chain, and a value's 128 bits identify it (see
 * dictionary.py for why that is safe without comparing bytes). `end` is the end of the buffer:
 * a short tail is read as one word when the buffer allows it. */
#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                                   \
    do {                                                                                                           \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                                                  \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                                     \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                                     \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                                                  \
    } while (0)

typedef struct {
    uint64_t k0, k1;
} sipkey_t;

static inline void hash_bytes(const sipkey_t *key, const uint8_t *p, int64_t len, const uint8_t *end, uint64_t out[2]) {
    uint64_t v0 = 0x736f6d6570736575ULL ^ key->k0, v1 = 0x646f72616e646f6dULL ^ key->k1 ^ 0xee;
    uint64_t v2 = 0x6c7967656e657261ULL ^ key->k0, v3 = 0x7465646279746573ULL ^ key->k1;
    uint64_t b = (uint64_t)len << 56, m;
    for (; len >= 8; p += 8, len -= 8) {
        memcpy(&m, p, 8);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    if (len > 0) {
        if (end - p >= 8) {
            memcpy(&m, p, 8);
            m &= (1ULL << (8 * len)) - 1; /* little-endian: keep the string's own bytes */
        } else {
            m = 0;
            memcpy(&m, p, (size_t)len);
        }
        b |= m;
    }
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xee;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    out[0] = v0 ^ v1 ^ v2 ^ v3;
    v1 ^= 0xdd;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    out[1] = v0 ^ v1 ^ v2 ^ v3;
}

static int key_from(sipkey_t *key, Py_buffer *bytes) {
    if (bytes->len != 16) {
        PyErr_SetString(PyExc_ValueError, "the hash key must be 16 bytes");
        return -1;
    }
    memcpy(&key->k0, bytes->buf, 8);
    memcpy(&key->k1, (const uint8_t *)bytes->buf + 8, 8);
    return 0;
}

typedef struct {
    int32_t *slots;
    uint64_t mask;
    uint64_t *hashes; /* 2 per code */
    uint64_t codes;   /* how many codes `hashes` has room for */
} table_t;

/* The code of the value hashed to h, or EMPTY; *at is the slot where probing stopped. */
static inline int32_t probe(const table_t *t, const uint64_t h[2], uint64_t *at) {
    uint64_t pos = h[0] & t->mask;
    for (;;) {
        int32_t code = __atomic_load_n(&t->slots[pos], __ATOMIC_ACQUIRE);
        if (code == EMPTY) {
            *at = pos;
            return EMPTY;
        }
        /* A code past `hashes` is one a writer is adding to a grown copy: not there yet. */
        if ((uint64_t)code < t->codes && t->hashes[2 * (uint64_t)code] == h[0] && t->hashes[2 * (uint64_t)code + 1] == h[1]) {
            *at = pos;
            return code;
        }
        pos = (pos + 1) & t->mask;
    }
}

static int table_from(table_t *t, Py_buffer *slots, Py_buffer *hashes) {
    Py_ssize_t n = slots->len / (Py_ssize_t)sizeof(int32_t);
    if (n <= 0 || (n & (n - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "slots must have a power-of-two length");
        return -1;
    }
    t->slots = (int32_t *)slots->buf;
    t->mask = (uint64_t)n - 1;
    t->hashes = (uint64_t *)hashes->buf;
    t->codes = (uint64_t)hashes->len / 16;
    return 0;
}

/* encode(key, offsets int32[n+1], data, start, slots, hashes, known, limit, capacity, codes int64[n])
 *   -> (known, stop)
 * Codes for rows start.. of the string array, in row order; a new value gets the next code
 * (so codes follow first appearance). Stops at the first new value once `limit` codes exist,
 * for the caller to grow the table and call again from `stop`. Past `capacity` codes, new
 * values get -1. */
/* Short values (a device, a country, a variant) repeat all through a batch: a memo of the code
 * last found for each, keyed by its bytes themselves, spares them their hash and their probe
 * (5 of an event's 6 dictionary columns). Direct-mapped and per call: a miss costs a compare. */
#define MEMO 64
typedef struct {
    uint64_t w[2];
    int64_t len; /* -1: empty */
    int64_t code;
} memo_t;

/* A value of at most 16 bytes as two words, zero past its end: two loads and masks where the
 * buffer holds 16 bytes from the value on (`room`), else a copy. */
static inline void short_words(const uint8_t *s, int64_t len, int64_t room, uint64_t w[2]) {
    if (room < 16) {
        w[0] = w[1] = 0;
        memcpy(w, s, (size_t)len);
        return;
    }
    memcpy(&w[0], s, 8);
    memcpy(&w[1], s + 8, 8);
    if (len < 8) {
        w[0] = len ? w[0] & (~0ULL >> (64 - 8 * len)) : 0;
        w[1] = 0;
    } else if (len < 16) {
        w[1] = len > 8 ? w[1] & (~0ULL >> (64 - 8 * (len - 8))) : 0;
    }
}

static inline int memo_slot(const uint64_t w[2], int64_t len) {
    uint64_t x = (w[0] ^ ROTL(w[1], 29) ^ (uint64_t)len) * 0x9E3779B97F4A7C15ull;
    return (int)(x >> 58);
}

static PyObject *encode(PyObject *self, PyObject *args) {
    Py_buffer key_bytes, offsets, data, slots, hashes, codes;
    Py_ssize_t start, known, limit, capacity;
    if (!PyArg_ParseTuple(args, "y*y*y*nw*w*nnnw*", &key_bytes, &offsets, &data, &start, &slots, &hashes, &known,
                          &limit, &capacity, &codes))
        return NULL;
    PyObject *result = NULL;
    table_t t;
    sipkey_t key;
    Py_ssize_t n = offsets.len / (Py_ssize_t)sizeof(int32_t) - 1;
    if (key_from(&key, &key_bytes) < 0 || table_from(&t, &slots, &hashes) < 0)
        goto done;
    if (codes.len < n * (Py_ssize_t)sizeof(int64_t) || hashes.len < limit * 16 || limit > (t.mask + 1) / 2) {
        PyErr_SetString(PyExc_ValueError, "output or table too small");
        goto done;
    }
    /* Every count within what the buffers hold: the loop below trusts them. */
    if (n < 0 || start < 0 || start > n || known < 0 || known > limit || limit < 0 || capacity < 0) {
        PyErr_SetString(PyExc_ValueError, "start, known, limit and capacity must be within the table and the input");
        goto done;
    }
    const int32_t *off = (const int32_t *)offsets.buf;
    const uint8_t *bytes = (const uint8_t *)data.buf;
    int64_t *out = (int64_t *)codes.buf;
    Py_ssize_t row = start;
    int bad = 0, stopped = 0;
    Py_BEGIN_ALLOW_THREADS
    /* Blocks of rows: hash them all and prefetch their slots, then the hashes those slots point
     * to, then probe one by one. A large dictionary misses the cache on every lookup; this way
     * a block's misses overlap instead of following one another. */
    uint64_t h[BLOCK][2];
    memo_t memo[MEMO];
    for (int m = 0; m < MEMO; m++)
        memo[m].len = -1;
    int64_t seen[BLOCK]; /* the row's code from the memo, or -1 */
    uint64_t word[BLOCK][2];
    int at_memo[BLOCK]; /* where a short value goes in the memo; -1: too long */
    while (row < n && !stopped && !bad) {
        Py_ssize_t end = row + BLOCK < n ? row + BLOCK : n;
        for (Py_ssize_t r = row; r < end; r++) {
            int64_t lo = off[r], hi = off[r + 1];
            Py_ssize_t i = r - row;
            if (lo < 0 || hi < lo || hi > data.len) {
                bad = 1;
                end = r;
                break;
            }
            seen[i] = -1;
            at_memo[i] = -1;
            if (hi - lo <= 16) {
                short_words(bytes + lo, hi - lo, data.len - lo, word[i]);
                int m = memo_slot(word[i], hi - lo);
                if (memo[m].len == hi - lo && memo[m].w[0] == word[i][0] && memo[m].w[1] == word[i][1]) {
                    seen[i] = memo[m].code;
                    continue;
                }
                at_memo[i] = m;
            }
            hash_bytes(&key, bytes + lo, hi - lo, bytes + data.len, h[i]);
            __builtin_prefetch(&t.slots[h[i][0] & t.mask]);
        }
        for (Py_ssize_t r = row; r < end; r++) {
            if (seen[r - row] >= 0)
                continue;
            int32_t code = t.slots[h[r - row][0] & t.mask];
            if (code >= 0 && (uint64_t)code < t.codes)
                __builtin_prefetch(&t.hashes[2 * (uint64_t)code]);
        }
        Py_ssize_t r = row;
        for (; r < end; r++) {
            if (seen[r - row] >= 0) {
                out[r] = seen[r - row];
                continue;
            }
            uint64_t at;
            int32_t code = probe(&t, h[r - row], &at);
            if (code == EMPTY) {
                if (known >= capacity) {
                    out[r] = -1;
                    continue;
                }
                if (known >= limit) {
                    stopped = 1;
                    break;
                }
                code = (int32_t)known++;
                t.hashes[2 * (uint64_t)code] = h[r - row][0];
                t.hashes[2 * (uint64_t)code + 1] = h[r - row][1];
                __atomic_store_n(&t.slots[at], code, __ATOMIC_RELEASE);
            }
            out[r] = code;
            int m = at_memo[r - row];
            if (m >= 0) {
                memo[m].w[0] = word[r - row][0];
                memo[m].w[1] = word[r - row][1];
                memo[m].len = off[r + 1] - off[r];
                memo[m].code = code;
            }
        }
        row = r;
    }
    Py_END_ALLOW_THREADS
    if (bad)
        PyErr_Format(PyExc_ValueError, "string %zd has offsets outside its data", row);
    else
        result = Py_BuildValue("nn", known, row);
done:
    PyBuffer_Release(&key_bytes);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&slots);
    PyBuffer_Release(&hashes);
    PyBuffer_Release(&codes);
    return result;
}

/* place(slots, hashes, first, count): puts codes first..first+count-1, known distinct, in the table. */
static PyObject *place(PyObject *self, PyObject *args) {
    Py_buffer slots, hashes;
    Py_ssize_t first, count;
    if (!PyArg_ParseTuple(args, "w*y*nn", &slots, &hashes, &first, &count))
        return NULL;
    table_t t;
    int ok = table_from(&t, &slots, &hashes) == 0;
    if (ok && (first < 0 || count < 0 || hashes.len < (first + count) * 16 ||
               (uint64_t)(first + count) > (t.mask + 1) / 2)) {
        PyErr_SetString(PyExc_ValueError, "table too small");
        ok = 0;
    }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t code = first; code < first + count; code++) {
            uint64_t pos = t.hashes[2 * code] & t.mask;
            while (t.slots[pos] != EMPTY)
                pos = (pos + 1) & t.mask;
            __atomic_store_n(&t.slots[pos], (int32_t)code, __ATOMIC_RELEASE);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&slots);
    PyBuffer_Release(&hashes);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* hash_into(key, offsets int32[n+1], data, hashes uint64[2n]): the hashes of every string. */
static PyObject *hash_into(PyObject *self, PyObject *args) {
    Py_buffer key_bytes, offsets, data, hashes;
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &key_bytes, &offsets, &data, &hashes))
        return NULL;
    sipkey_t key;
    Py_ssize_t n = offsets.len / (Py_ssize_t)sizeof(int32_t) - 1, row = 0;
    const int32_t *off = (const int32_t *)offsets.buf;
    uint64_t *out = (uint64_t *)hashes.buf;
    if (key_from(&key, &key_bytes) < 0) {
        PyBuffer_Release(&key_bytes);
        PyBuffer_Release(&offsets);
        PyBuffer_Release(&data);
        PyBuffer_Release(&hashes);
        return NULL;
    }
    int bad = n < 0 || hashes.len < n * 16;
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        for (; row < n; row++) {
            int64_t lo = off[row], hi = off[row + 1];
            if (lo < 0 || hi < lo || hi > data.len) {
                bad = 1;
                break;
            }
            hash_bytes(&key, (const uint8_t *)data.buf + lo, hi - lo, (const uint8_t *)data.buf + data.len,
                       out + 2 * row);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&key_bytes);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&hashes);
    if (bad) {
        PyErr_Format(PyExc_ValueError, "string %zd has offsets outside its data, or the output is too small", row);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* find(key, value: bytes, slots, hashes) -> code or -1, without inserting. */
static PyObject *find(PyObject *self, PyObject *args) {
    Py_buffer key_bytes, value, slots, hashes;
    if (!PyArg_ParseTuple(args, "y*y*y*y*", &key_bytes, &value, &slots, &hashes))
        return NULL;
    table_t t;
    sipkey_t key;
    long code = -1;
    int ok = key_from(&key, &key_bytes) == 0 && table_from(&t, &slots, &hashes) == 0;
    if (ok) {
        uint64_t h[2], at;
        hash_bytes(&key, (const uint8_t *)value.buf, value.len, (const uint8_t *)value.buf + value.len, h);
        code = probe(&t, h, &at);
    }
    PyBuffer_Release(&key_bytes);
    PyBuffer_Release(&value);
    PyBuffer_Release(&slots);
    PyBuffer_Release(&hashes);
    return ok ? PyLong_FromLong(code) : NULL;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "Codes of a batch of strings, assigning new ones."},
    {"place", place, METH_VARARGS, "Put known-distinct codes into a table."},
    {"hash_into", hash_into, METH_VARARGS, "Hashes of every string of an array."},
    {"find", find, METH_VARARGS, "The code of one value, or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dictionary", NULL, -1, methods};

PyMODINIT_FUNC PyInit__dictionary(void) { return PyModule_Create(&module); }
