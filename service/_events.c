/* Reads a serialized IngestEventsRequest straight into columns.
 *
 * Parsing with the protobuf runtime is fast, but reading its messages field by field from Python
 * costs ~2 µs per event while holding the GIL: row ingest capped near 150k events/s and slowed
 * every query meanwhile. This walks the wire format (GIL released) and writes each Event field
 * into its column: int64 timestamps with a presence flag, conversion, revenue, and per string
 * field Arrow offsets (int32) and bytes.
 *
 * Semantics follow the protobuf wire format: a repeated field's later value wins, the nested
 * Timestamp merges, unknown fields (or known ones with another wire type, groups included) are
 * skipped, groups nest at most MAX_DEPTH deep, as in the protobuf runtime.
 *
 * Requests that are stored together are read together, in one call, into one set of columns.
 *
 * What a request may cost is known before anything is allocated for it: a first walk over the
 * request's top level counts its events, so that a request of more than `max_events` (millions
 * of empty events, say) is refused having allocated nothing; a second reads every event once,
 * writing its numbers and noting where its strings are; then the strings are copied into
 * columns of the sizes found. A string longer than `max_string` bytes is not copied: its first
 * bytes (cut at a character) stand in for it and it is reported with its length, as is a string
 * that is not UTF-8 (stored empty), so that only its event is rejected. What is allocated is
 * therefore at most 109 bytes per event (56 of them freed on return) plus max_string bytes per
 * string, whatever the request holds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

enum { N_STRINGS = 7, MAX_DEPTH = 100 };
enum { NOT_UTF8 = 0, TOO_LONG = 1, BAD_NANOS = 2 }; /* kinds of problems, as returned */
static const int64_t MAX_SECONDS = 9000000000LL, NS = 1000000000LL;

/* The contract's field numbers, set once from the generated descriptors (`configure`). */
static struct {
    int events, arrow_ipc, producer_id, sequence;                    /* IngestEventsRequest */
    int timestamp, conversion, revenue, strings[N_STRINGS];           /* Event */
    int seconds, nanos;                                               /* google.protobuf.Timestamp */
    int configured;
} F;

static PyObject *BatchTooLarge; /* raised with (events in the request, the limit) */
static PyTypeObject *DecodedType;

typedef struct {
    const uint8_t *p, *end;
    const char *error; /* set once; parsing stops */
    const uint8_t *error_at;
} reader_t;

static inline void fail(reader_t *r, const char *why) {
    if (!r->error) {
        r->error = why;
        r->error_at = r->p;
    }
    r->p = r->end;
}

static uint64_t varint_long(reader_t *r) {
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->p >= r->end) {
            fail(r, "truncated varint");
            return 0;
        }
        uint8_t b = *r->p++;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80))
            return v;
    }
    fail(r, "varint longer than 10 bytes");
    return 0;
}

/* Tags, lengths and most numbers of an event take one byte. */
static inline uint64_t varint(reader_t *r) {
    if (r->p < r->end && *r->p < 0x80)
        return *r->p++;
    return varint_long(r);
}

/* A length-delimited field's bytes: [*start, *start + len); *start is NULL on error. */
static inline int64_t delimited(reader_t *r, const uint8_t **start) {
    *start = NULL;
    uint64_t len = varint(r);
    if (r->error)
        return 0;
    if (len > (uint64_t)(r->end - r->p)) {
        fail(r, "length-delimited field runs past the end of its message");
        return 0;
    }
    *start = r->p;
    r->p += len;
    return (int64_t)len;
}

/* The field number and wire type of the next tag, or 0 at the end / on error. */
static inline int tag(reader_t *r, int *wire) {
    if (r->p >= r->end)
        return 0;
    uint64_t t = varint(r);
    if (r->error)
        return 0;
    if ((t >> 3) == 0 || (t >> 3) > 536870911) {
        fail(r, "invalid field number");
        return 0;
    }
    *wire = (int)(t & 7);
    return (int)(t >> 3);
}

static void skip(reader_t *r, int field, int wire, int depth);

/* Skips a group's fields up to its end tag (the start tag has been read). */
static void skip_group(reader_t *r, int field, int depth) {
    if (depth >= MAX_DEPTH) {
        fail(r, "groups nested too deeply");
        return;
    }
    int wire, inner;
    while ((inner = tag(r, &wire))) {
        if (wire == 4) {
            if (inner != field)
                fail(r, "a group ends with another field's end tag");
            return;
        }
        skip(r, inner, wire, depth + 1);
    }
    fail(r, "a group is not closed");
}

static void skip(reader_t *r, int field, int wire, int depth) {
    const uint8_t *ignored;
    switch (wire) {
    case 0: varint(r); break;
    case 1:
        if (r->end - r->p < 8) fail(r, "truncated fixed64 field"); else r->p += 8;
        break;
    case 2: delimited(r, &ignored); break;
    case 3: skip_group(r, field, depth); break;
    case 5:
        if (r->end - r->p < 4) fail(r, "truncated fixed32 field"); else r->p += 4;
        break;
    case 4: fail(r, "an end-group tag without its group"); break;
    default: fail(r, "invalid wire type");
    }
}

static int utf8_valid(const uint8_t *s, int64_t n) {
    int64_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int len;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
        else return 0;
        if (i + len > n)
            return 0;
        for (int k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        i += len;
    }
    return 1;
}

/* What each Event field number < KINDS is, set by `configure`: the Event's fields are read through
 * this table rather than compared one by one. */
enum { KINDS = 128 };
enum { K_UNKNOWN = 0, K_TIMESTAMP, K_CONVERSION, K_REVENUE, K_STRING /* + the string's slot */ };
static uint8_t KIND[KINDS];

/* Whether s[0..n) is UTF-8: short ASCII strings (most ids) from two word loads when the buffer
 * they lie in (ending at `limit`) has room for them, else character by character. */
static inline int utf8_text(const uint8_t *s, int64_t n, const uint8_t *limit) {
    if (n <= 16 && limit - s >= 16) {
        uint64_t w0, w1;
        memcpy(&w0, s, 8);
        memcpy(&w1, s + 8, 8);
        if (n < 8) {
            w0 = n ? w0 & (~0ULL >> (64 - 8 * n)) : 0;
            w1 = 0;
        } else if (n < 16) {
            w1 = n > 8 ? w1 & (~0ULL >> (64 - 8 * (n - 8))) : 0;
        }
        if (!((w0 | w1) & 0x8080808080808080ULL))
            return 1;
    }
    return utf8_valid(s, n);
}

typedef struct {
    Py_ssize_t n; /* events */
    int64_t *ts;
    uint8_t *ts_set;
    int64_t *conversion;
    double *revenue;
    /* Each event's kept string bytes, column by column ([slot * n + event]): where they start in
     * their request (`from`) and how many (`kept`). Strings are copied into their columns once
     * every event is read and the columns' sizes are known, so requests are parsed once. */
    uint32_t *from, *kept;
    int64_t sizes[N_STRINGS];
    /* (event, string column, kind, length) of strings that were not UTF-8 or too long; grows as
     * found, so that its size follows the problems, not the events */
    int64_t *problems;
    Py_ssize_t n_problems, problem_room;
    int out_of_memory;
} columns_t;

typedef struct {
    Py_ssize_t max_events;
    int64_t max_string;
    Py_ssize_t n_events;
    const uint8_t *ipc, *producer;
    int64_t ipc_len, producer_len;
    uint64_t sequence;
} request_t;

static void add_problem(columns_t *c, Py_ssize_t i, int s, int kind, int64_t length) {
    if (c->n_problems == c->problem_room) {
        Py_ssize_t room = c->problem_room ? 2 * c->problem_room : 64;
        int64_t *grown = PyMem_RawRealloc(c->problems, (size_t)room * 4 * sizeof(int64_t));
        if (!grown) {
            c->out_of_memory = 1;
            return;
        }
        c->problems = grown;
        c->problem_room = room;
    }
    int64_t *p = c->problems + 4 * c->n_problems++;
    p[0] = i, p[1] = s, p[2] = kind, p[3] = length;
}

static void timestamp(reader_t *outer, const uint8_t *p, int64_t len, int64_t *seconds, int64_t *nanos, int depth) {
    reader_t r = {p, p + len, NULL, NULL};
    int wire, field;
    while ((field = tag(&r, &wire))) {
        if (field == F.seconds && wire == 0) *seconds = (int64_t)varint(&r);
        else if (field == F.nanos && wire == 0) *nanos = (int32_t)varint(&r);
        else skip(&r, field, wire, depth);
    }
    if (r.error && !outer->error) {
        outer->error = r.error;
        outer->error_at = r.error_at;
    }
}

/* The longest prefix of a valid UTF-8 string, at most `limit` bytes, that ends at a character. */
static inline int64_t utf8_cut(const uint8_t *s, int64_t limit) {
    while (limit > 0 && (s[limit] & 0xC0) == 0x80)
        limit--;
    return limit;
}

/* One Event into row i of `c`: its numbers, and where its strings' kept bytes are in the request
 * (which starts at `base`). */
static void event(reader_t *outer, const uint8_t *base, const uint8_t *p, int64_t len, Py_ssize_t i, columns_t *c,
                  const request_t *q) {
    reader_t r = {p, p + len, NULL, NULL};
    int64_t seconds = 0, nanos = 0, conversion = 0, too_long[N_STRINGS] = {0};
    uint32_t from[N_STRINGS] = {0}, kept[N_STRINGS] = {0};
    double revenue = 0.0;
    int has_ts = 0, not_utf8[N_STRINGS] = {0}, wire, field;
    while ((field = tag(&r, &wire))) {
        int kind = field < KINDS ? KIND[field] : K_UNKNOWN;
        if (kind >= K_STRING && wire == 2) {
            int s = kind - K_STRING;
            const uint8_t *bytes;
            int64_t n = delimited(&r, &bytes);
            if (r.error)
                break;
            /* A repeated field: the last value wins, except that any value that is not UTF-8
             * fails its event, as the protobuf runtime fails the whole message for it. */
            int64_t keep = n;
            too_long[s] = 0;
            if (n > q->max_string) {
                too_long[s] = n;
                keep = q->max_string;
            }
            if (!utf8_text(bytes, n, outer->end)) {
                not_utf8[s] = 1;
                keep = 0;
            } else if (too_long[s]) {
                keep = utf8_cut(bytes, keep);
            }
            from[s] = (uint32_t)(bytes - base);
            kept[s] = (uint32_t)keep;
        } else if (kind == K_TIMESTAMP && wire == 2) {
            const uint8_t *bytes;
            int64_t n = delimited(&r, &bytes);
            if (r.error)
                break;
            has_ts = 1;
            timestamp(&r, bytes, n, &seconds, &nanos, 2);
        } else if (kind == K_CONVERSION && wire == 0) {
            conversion = (int64_t)(uint32_t)varint(&r);
        } else if (kind == K_REVENUE && wire == 1) {
            if (r.end - r.p < 8) {
                fail(&r, "truncated fixed64 field");
            } else {
                memcpy(&revenue, r.p, 8);
                r.p += 8;
            }
        } else {
            skip(&r, field, wire, 1);
        }
    }
    if (r.error && !outer->error) {
        outer->error = r.error;
        outer->error_at = r.error_at;
    }
    if (seconds > MAX_SECONDS) seconds = MAX_SECONDS;
    if (seconds < -MAX_SECONDS) seconds = -MAX_SECONDS;
    c->ts[i] = seconds * NS + nanos;
    c->ts_set[i] = (uint8_t)has_ts;
    if (has_ts && (nanos < 0 || nanos >= NS)) /* a Timestamp's nanos are 0 to 999,999,999 */
        add_problem(c, i, -1, BAD_NANOS, nanos);
    c->conversion[i] = conversion;
    c->revenue[i] = revenue;
    for (int s = 0; s < N_STRINGS; s++) {
        c->from[s * c->n + i] = from[s];
        c->kept[s * c->n + i] = kept[s];
        c->sizes[s] += kept[s];
        if (not_utf8[s])
            add_problem(c, i, s, NOT_UTF8, 0);
        else if (too_long[s])
            add_problem(c, i, s, TOO_LONG, too_long[s]);
    }
}

/* Walks a request's top level from row `i` on: with `c` NULL, counts its events without looking
 * into them; else reads each into `c`. Returns the row after its last event. */
static Py_ssize_t request(reader_t *r, Py_ssize_t i, columns_t *c, request_t *q) {
    const uint8_t *base = r->p;
    int wire, field;
    while ((field = tag(r, &wire))) {
        if (field == F.events && wire == 2) {
            const uint8_t *bytes;
            int64_t n = delimited(r, &bytes);
            if (r->error)
                break;
            if (c)
                event(r, base, bytes, n, i, c, q);
            i++;
        } else if (field == F.arrow_ipc && wire == 2) {
            q->ipc_len = delimited(r, &q->ipc);
            if (q->ipc_len == 0)
                q->ipc_len = -1; /* empty bytes are proto3's default: no arrow_ipc, as protobuf reads it */
        } else if (field == F.producer_id && wire == 2) {
            /* Repeated, the last wins, but one that is not UTF-8 stays: protobuf refuses the
             * message for it, and the caller refuses the producer id it is handed. */
            const uint8_t *bytes;
            int64_t n = delimited(r, &bytes);
            if (!r->error && (!q->producer || utf8_valid(q->producer, q->producer_len))) {
                q->producer = bytes;
                q->producer_len = n;
            }
        } else if (field == F.sequence && wire == 0) {
            q->sequence = varint(r);
        } else {
            skip(r, field, wire, 0);
        }
    }
    return i;
}

/* Each column's strings, copied from where `event` found them: Arrow offsets and bytes. */
static void copy_strings(columns_t *c, const uint8_t *const *bases, const Py_ssize_t *firsts, Py_ssize_t n_raws,
                         int32_t *const *offsets, uint8_t *const *data) {
    for (int s = 0; s < N_STRINGS; s++) {
        const uint32_t *from = c->from + s * c->n, *kept = c->kept + s * c->n;
        int32_t *off = offsets[s], at = 0;
        uint8_t *out = data[s];
        off[0] = 0;
        for (Py_ssize_t k = 0; k < n_raws; k++) {
            const uint8_t *base = bases[k];
            for (Py_ssize_t i = firsts[k]; i < firsts[k + 1]; i++) {
                memcpy(out + at, base + from[i], kept[i]);
                at += (int32_t)kept[i];
                off[i + 1] = at;
            }
        }
    }
}

/* Memory the decoder filled without the GIL, handed to Python (numpy, Arrow) through the buffer
 * protocol and freed with its last reference. */
typedef struct {
    PyObject_HEAD
    void *data;
    Py_ssize_t size;
} buffer_t;

static PyTypeObject *BufferType;

static int buffer_get(PyObject *self, Py_buffer *view, int flags) {
    buffer_t *b = (buffer_t *)self;
    return PyBuffer_FillInfo(view, self, b->data, b->size, 1, flags);
}

static void buffer_dealloc(PyObject *self) {
    PyMem_RawFree(((buffer_t *)self)->data);
    PyTypeObject *type = Py_TYPE(self);
    type->tp_free(self);
    Py_DECREF(type);
}

static PyType_Slot buffer_slots[] = {
    {Py_bf_getbuffer, buffer_get},
    {Py_tp_dealloc, buffer_dealloc},
    {Py_tp_doc, "Bytes read from a request, owned by the decoder's result."},
    {0, NULL},
};
static PyType_Spec buffer_spec = {"abstream.service._events.Buffer", sizeof(buffer_t), 0, Py_TPFLAGS_DEFAULT, buffer_slots};

/* A buffer object owning `data` (freed if the object cannot be made). */
static PyObject *owned(void *data, Py_ssize_t size) {
    buffer_t *b = PyObject_New(buffer_t, BufferType);
    if (!b) {
        PyMem_RawFree(data);
        return NULL;
    }
    b->data = data;
    b->size = size;
    return (PyObject *)b;
}

static PyObject *wire_error(reader_t *r, const uint8_t *base, Py_ssize_t k, Py_ssize_t n_raws) {
    if (n_raws > 1)
        return PyErr_Format(PyExc_ValueError, "%s at byte %zd of request %zd", r->error,
                            (Py_ssize_t)(r->error_at - base), k);
    return PyErr_Format(PyExc_ValueError, "%s at byte %zd", r->error, (Py_ssize_t)(r->error_at - base));
}

static PyStructSequence_Field decoded_fields[] = {
    {"events", "number of events"},
    {"timestamp", "int64 ns per event (bytes)"},
    {"timestamp_set", "uint8 per event: 1 when the event had a timestamp (bytes)"},
    {"conversion", "int64 per event (bytes)"},
    {"revenue", "float64 per event (bytes)"},
    {"strings", "per string field, in `configure` order: (int32 offsets, data) bytes"},
    {"problems", "int64 quadruples (event, string field, kind, length): 0 not UTF-8, 1 too long, 2 a timestamp's nanos out of range (field -1, length the nanos)"},
    {"arrow_ipc", "(start, length) of arrow_ipc within the request, or None"},
    {"producer_id", "bytes"},
    {"sequence", "int"},
    {NULL, NULL},
};
static PyStructSequence_Desc decoded_desc = {"abstream.service._events.Decoded",
                                             "An IngestEventsRequest read into columns.", decoded_fields, 10};

enum { MAX_RAWS = 1024 };
enum { N_OUT = 4 + 2 * N_STRINGS }; /* ts, ts_set, conversion, revenue, then offsets and data per string */

/* What one decode allocates and fills, all without the GIL. */
typedef struct {
    void *ptr[N_OUT];
    Py_ssize_t size[N_OUT];
    int too_many, no_memory, ipc_with_others, too_big; /* why it stopped, besides a reader's error */
    Py_ssize_t failed; /* the request a reader's error is in */
} decoding_t;

static int allocate(decoding_t *d, int k, Py_ssize_t size) {
    d->size[k] = size;
    d->ptr[k] = PyMem_RawMalloc(size ? (size_t)size : 1);
    return d->ptr[k] != NULL;
}

/* The three walks of `decode`: count, read each event, copy the strings. */
static void decode_all(decoding_t *d, columns_t *c, request_t *q, reader_t *r, const uint8_t *const *bases,
                       const Py_ssize_t *lengths, Py_ssize_t *firsts, Py_ssize_t n_raws) {
    firsts[0] = 0;
    for (Py_ssize_t k = 0; k < n_raws; k++) {
        *r = (reader_t){bases[k], bases[k] + lengths[k], NULL, NULL};
        firsts[k + 1] = request(r, firsts[k], NULL, q);
        if (r->error || (n_raws > 1 && q->ipc_len >= 0)) {
            d->failed = k;
            d->ipc_with_others = !r->error;
            return;
        }
    }
    Py_ssize_t n = c->n = q->n_events = firsts[n_raws];
    if (n > q->max_events) {
        d->too_many = 1;
        return;
    }
    if (!allocate(d, 0, n * 8) || !allocate(d, 1, n) || !allocate(d, 2, n * 8) || !allocate(d, 3, n * 8) ||
        !(c->from = PyMem_RawMalloc((size_t)(n ? n : 1) * N_STRINGS * sizeof(uint32_t))) ||
        !(c->kept = PyMem_RawMalloc((size_t)(n ? n : 1) * N_STRINGS * sizeof(uint32_t)))) {
        d->no_memory = 1;
        return;
    }
    c->ts = d->ptr[0], c->ts_set = d->ptr[1], c->conversion = d->ptr[2], c->revenue = d->ptr[3];
    q->producer = q->ipc = NULL;
    q->producer_len = 0;
    q->sequence = 0;
    q->ipc_len = -1;
    for (Py_ssize_t k = 0; k < n_raws; k++) {
        *r = (reader_t){bases[k], bases[k] + lengths[k], NULL, NULL};
        request(r, firsts[k], c, q);
        if (r->error) { /* only this walk reads inside events */
            d->failed = k;
            return;
        }
    }
    if (c->out_of_memory) {
        d->no_memory = 1;
        return;
    }
    int32_t *offsets[N_STRINGS];
    uint8_t *data[N_STRINGS];
    for (int s = 0; s < N_STRINGS; s++) {
        if (c->sizes[s] > INT32_MAX) {
            d->too_big = F.strings[s];
            return;
        }
        if (!allocate(d, 4 + 2 * s, (n + 1) * 4) || !allocate(d, 5 + 2 * s, c->sizes[s])) {
            d->no_memory = 1;
            return;
        }
        offsets[s] = d->ptr[4 + 2 * s];
        data[s] = d->ptr[5 + 2 * s];
    }
    copy_strings(c, bases, firsts, n_raws, offsets, data);
}

/* decode(raw: bytes | sequence of bytes, max_events, max_string) -> Decoded
 * Requests given together are read as one: their concatenation, which protobuf reads as one
 * message (events follow one another; for producer_id and sequence the last wins). None of them
 * may carry arrow_ipc. Raises BatchTooLarge(events, max_events) past max_events events, before
 * allocating anything for them, and ValueError("<why> at byte <k>[ of request <j>]") when the
 * bytes are not an IngestEventsRequest. The GIL is released once, for all of the work. */
static PyObject *decode(PyObject *self, PyObject *args) {
    PyObject *raws_obj;
    request_t q;
    memset(&q, 0, sizeof q);
    q.ipc_len = -1;
    if (!PyArg_ParseTuple(args, "OnL", &raws_obj, &q.max_events, &q.max_string))
        return NULL;
    if (!F.configured) {
        PyErr_SetString(PyExc_RuntimeError, "_events.configure has not been called");
        return NULL;
    }
    if (q.max_events < 0 || q.max_string < 0 || q.max_string > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "max_events and max_string must be within 0 and 2^31 - 1");
        return NULL;
    }
    /* bytes are immutable: what the counting walk finds is still true in the reading one. */
    PyObject *raws = PyBytes_Check(raws_obj) ? PyTuple_Pack(1, raws_obj) : PySequence_Tuple(raws_obj);
    if (!raws)
        return NULL;
    Py_ssize_t n_raws = PyTuple_GET_SIZE(raws);
    if (n_raws < 1 || n_raws > MAX_RAWS) {
        Py_DECREF(raws);
        return PyErr_Format(PyExc_ValueError, "between 1 and %d requests are read at once", MAX_RAWS);
    }
    const uint8_t *bases[MAX_RAWS];
    Py_ssize_t firsts[MAX_RAWS + 1], lengths[MAX_RAWS];
    for (Py_ssize_t k = 0; k < n_raws; k++) {
        PyObject *raw = PyTuple_GET_ITEM(raws, k);
        if (!PyBytes_Check(raw)) {
            Py_DECREF(raws);
            return PyErr_Format(PyExc_TypeError, "requests must be bytes, not %.100s", Py_TYPE(raw)->tp_name);
        }
        bases[k] = (const uint8_t *)PyBytes_AS_STRING(raw);
        lengths[k] = PyBytes_GET_SIZE(raw);
        if (lengths[k] > UINT32_MAX) {
            Py_DECREF(raws);
            return PyErr_Format(PyExc_ValueError, "a request of %zd bytes is more than 4 GiB", lengths[k]);
        }
    }
    PyObject *result = NULL, *items[N_OUT] = {NULL}, *problems = NULL, *strings = NULL;
    decoding_t d;
    memset(&d, 0, sizeof d);
    columns_t c;
    memset(&c, 0, sizeof c);
    reader_t r = {NULL, NULL, NULL, NULL};

    Py_BEGIN_ALLOW_THREADS
    decode_all(&d, &c, &q, &r, bases, lengths, firsts, n_raws);
    Py_END_ALLOW_THREADS
    for (int k = 0; k < N_OUT; k++) { /* owned by Python objects from here on */
        if (d.ptr[k] && !(items[k] = owned(d.ptr[k], d.size[k])))
            d.no_memory = 1;
        d.ptr[k] = NULL;
    }
    if (r.error) {
        wire_error(&r, bases[d.failed], d.failed, n_raws);
        goto done;
    }
    if (d.ipc_with_others) {
        PyErr_SetString(PyExc_ValueError, "a request with arrow_ipc is read on its own");
        goto done;
    }
    if (d.too_many) {
        PyObject *why = Py_BuildValue("(nn)", q.n_events, q.max_events);
        if (why) {
            PyErr_SetObject(BatchTooLarge, why);
            Py_DECREF(why);
        }
        goto done;
    }
    if (d.too_big) {
        PyErr_Format(PyExc_ValueError, "the values of string field %d read at once exceed 2 GiB", d.too_big);
        goto done;
    }
    if (d.no_memory) {
        PyErr_NoMemory();
        goto done;
    }
    if (!(problems = PyBytes_FromStringAndSize((const char *)c.problems, c.n_problems * 4 * (Py_ssize_t)sizeof(int64_t))))
        goto done;
    if (!(strings = PyTuple_New(N_STRINGS)))
        goto done;
    for (int s = 0; s < N_STRINGS; s++) {
        PyObject *pair = PyTuple_Pack(2, items[4 + 2 * s], items[5 + 2 * s]);
        if (!pair)
            goto done;
        PyTuple_SET_ITEM(strings, s, pair);
    }
    PyObject *values[10] = {
        PyLong_FromSsize_t(c.n), Py_NewRef(items[0]), Py_NewRef(items[1]), Py_NewRef(items[2]), Py_NewRef(items[3]),
        Py_NewRef(strings), Py_NewRef(problems),
        q.ipc_len >= 0 ? Py_BuildValue("(nn)", (Py_ssize_t)(q.ipc - bases[0]), (Py_ssize_t)q.ipc_len)
                       : Py_NewRef(Py_None),
        PyBytes_FromStringAndSize(q.producer ? (const char *)q.producer : "", (Py_ssize_t)q.producer_len),
        PyLong_FromUnsignedLongLong((unsigned long long)q.sequence),
    };
    result = PyStructSequence_New(DecodedType);
    for (int j = 0; j < 10; j++) {
        if (!values[j] || !result) {
            for (int m = 0; m < 10; m++)
                Py_XDECREF(values[m]);
            Py_CLEAR(result);
            goto done;
        }
    }
    for (int j = 0; j < 10; j++)
        PyStructSequence_SET_ITEM(result, j, values[j]);
done:
    for (int k = 0; k < N_OUT; k++) {
        Py_XDECREF(items[k]);
        PyMem_RawFree(d.ptr[k]);
    }
    Py_XDECREF(problems);
    Py_XDECREF(strings);
    Py_DECREF(raws);
    PyMem_RawFree(c.problems);
    PyMem_RawFree(c.from);
    PyMem_RawFree(c.kept);
    return result;
}

/* configure(request, event, timestamp): the field numbers, as dicts of name -> number taken from
 * the generated descriptors; `event` also names the string fields in the order decode returns them
 * (its key "strings", a sequence of numbers). */
static int number(PyObject *fields, const char *name, int *out) {
    PyObject *v = PyDict_GetItemString(fields, name);
    if (!v) {
        PyErr_Format(PyExc_KeyError, "no field number for %s", name);
        return -1;
    }
    long x = PyLong_AsLong(v);
    if (x <= 0 || x > 536870911) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "bad field number for %s", name);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *req, *ev, *ts;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyDict_Type, &req, &PyDict_Type, &ev, &PyDict_Type, &ts))
        return NULL;
    if (number(req, "events", &F.events) || number(req, "arrow_ipc", &F.arrow_ipc) ||
        number(req, "producer_id", &F.producer_id) || number(req, "sequence", &F.sequence) ||
        number(ev, "timestamp", &F.timestamp) || number(ev, "conversion", &F.conversion) ||
        number(ev, "revenue", &F.revenue) || number(ts, "seconds", &F.seconds) || number(ts, "nanos", &F.nanos))
        return NULL;
    PyObject *strings = PyDict_GetItemString(ev, "strings");
    PyObject *seq = strings ? PySequence_Fast(strings, "strings must be a sequence") : NULL;
    if (!seq)
        return strings ? NULL : PyErr_Format(PyExc_KeyError, "no string field numbers");
    if (PySequence_Fast_GET_SIZE(seq) != N_STRINGS) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "Event must have %d string fields", N_STRINGS);
    }
    for (int s = 0; s < N_STRINGS; s++) {
        long x = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, s));
        if (x <= 0 || x > 536870911) {
            Py_DECREF(seq);
            return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_ValueError, "bad string field number");
        }
        F.strings[s] = (int)x;
    }
    Py_DECREF(seq);
    int numbered[3 + N_STRINGS] = {F.timestamp, F.conversion, F.revenue};
    memset(KIND, K_UNKNOWN, sizeof KIND);
    for (int s = 0; s < N_STRINGS; s++)
        numbered[3 + s] = F.strings[s];
    for (int j = 0; j < 3 + N_STRINGS; j++) {
        if (numbered[j] >= KINDS || KIND[numbered[j]] != K_UNKNOWN)
            return PyErr_Format(PyExc_ValueError, "Event's fields must have distinct numbers below %d", KINDS);
        KIND[numbered[j]] = (uint8_t)(j < 3 ? K_TIMESTAMP + j : K_STRING + (j - 3));
    }
    F.configured = 1;
    Py_RETURN_NONE;
}

/* Requests smaller than this are counted holding the GIL: the walk takes a few microseconds, and
 * on the event loop, letting the GIL go and taking it back cost ~25 more. */
enum { COUNT_WITH_GIL = 256 << 10 };

/* count(raw: bytes) -> (events, (start, length) of arrow_ipc or None, producer_id bytes, sequence):
 * the first walk alone, which allocates nothing: what admitting the request will cost, and
 * whether it may be stored with others, are known from it. */
static PyObject *count(PyObject *self, PyObject *args) {
    PyObject *raw_obj;
    request_t q;
    memset(&q, 0, sizeof q);
    q.ipc_len = -1;
    if (!PyArg_ParseTuple(args, "O!", &PyBytes_Type, &raw_obj))
        return NULL;
    if (!F.configured) {
        PyErr_SetString(PyExc_RuntimeError, "_events.configure has not been called");
        return NULL;
    }
    const uint8_t *base = (const uint8_t *)PyBytes_AS_STRING(raw_obj);
    reader_t r = {base, base + PyBytes_GET_SIZE(raw_obj), NULL, NULL};
    if (PyBytes_GET_SIZE(raw_obj) < COUNT_WITH_GIL) {
        q.n_events = request(&r, 0, NULL, &q);
    } else {
        Py_BEGIN_ALLOW_THREADS
        q.n_events = request(&r, 0, NULL, &q);
        Py_END_ALLOW_THREADS
    }
    if (r.error)
        return wire_error(&r, base, 0, 1);
    const char *producer = q.producer ? (const char *)q.producer : "";
    if (q.ipc_len < 0)
        return Py_BuildValue("(nOy#K)", q.n_events, Py_None, producer, (Py_ssize_t)q.producer_len,
                             (unsigned long long)q.sequence);
    return Py_BuildValue("(n(nn)y#K)", q.n_events, (Py_ssize_t)(q.ipc - base), (Py_ssize_t)q.ipc_len, producer,
                         (Py_ssize_t)q.producer_len, (unsigned long long)q.sequence);
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "Columns of a serialized IngestEventsRequest."},
    {"count", count, METH_VARARGS, "Events in a serialized IngestEventsRequest, and where its arrow_ipc is."},
    {"configure", configure, METH_VARARGS, "Set the contract's field numbers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_events", NULL, -1, methods};

PyMODINIT_FUNC PyInit__events(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    DecodedType = PyStructSequence_NewType(&decoded_desc);
    BufferType = (PyTypeObject *)PyType_FromSpec(&buffer_spec);
    BatchTooLarge = PyErr_NewExceptionWithDoc("abstream.service._events.BatchTooLarge",
                                              "A request holds more events than allowed: (events, limit).",
                                              PyExc_ValueError, NULL);
    if (!DecodedType || !BufferType || !BatchTooLarge || PyModule_AddObjectRef(m, "BatchTooLarge", BatchTooLarge) < 0 ||
        PyModule_AddObjectRef(m, "Decoded", (PyObject *)DecodedType) < 0 ||
        PyModule_AddIntConstant(m, "NOT_UTF8", NOT_UTF8) < 0 || PyModule_AddIntConstant(m, "TOO_LONG", TOO_LONG) < 0 ||
        PyModule_AddIntConstant(m, "BAD_NANOS", BAD_NANOS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
