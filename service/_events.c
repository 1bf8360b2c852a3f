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
 * What a request may cost is known before anything is allocated for it: a first walk over the
 * request's top level counts its events, so that a request of more than `max_events` (millions
 * of empty events, say) is refused having allocated nothing; a second sizes the string columns;
 * only the third writes. A string longer than `max_string` bytes is not copied: its first bytes (cut
 * at a character) stand in for it and it is reported with its length, as is a string that is
 * not UTF-8 (stored empty), so that only its event is rejected. What is allocated is therefore
 * at most 53 bytes per event plus max_string bytes per string, whatever the request holds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

enum { N_STRINGS = 7, MAX_DEPTH = 100 };
enum { NOT_UTF8 = 0, TOO_LONG = 1 }; /* kinds of problems, as returned */
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

static inline uint64_t varint(reader_t *r) {
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

static inline int string_slot(int field) {
    for (int s = 0; s < N_STRINGS; s++)
        if (F.strings[s] == field)
            return s;
    return -1;
}

typedef struct {
    int64_t *ts;
    uint8_t *ts_set;
    int64_t *conversion;
    double *revenue;
    int32_t *offsets[N_STRINGS];
    uint8_t *data[N_STRINGS];
    int32_t cursor[N_STRINGS];
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
    int64_t sizes[N_STRINGS];
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

/* One Event into row i of `c`; when c is NULL (sizing), only adds its strings' kept bytes. */
static void event(reader_t *outer, const uint8_t *p, int64_t len, Py_ssize_t i, columns_t *c, request_t *q) {
    reader_t r = {p, p + len, NULL, NULL};
    int64_t seconds = 0, nanos = 0, kept[N_STRINGS] = {0}, too_long[N_STRINGS] = {0};
    int has_ts = 0, not_utf8[N_STRINGS] = {0}, wire, field;
    if (c) {
        c->conversion[i] = 0;
        c->revenue[i] = 0.0;
    }
    while ((field = tag(&r, &wire))) {
        int s = string_slot(field);
        if (s >= 0 && wire == 2) {
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
            if (!c) { /* room for the longest of a repeated field's values: each is written in turn */
                kept[s] = keep > kept[s] ? keep : kept[s];
                continue;
            }
            if (!utf8_valid(bytes, n)) {
                not_utf8[s] = 1;
                keep = 0;
            } else if (too_long[s]) {
                keep = utf8_cut(bytes, keep);
            }
            memcpy(c->data[s] + c->offsets[s][i], bytes, (size_t)keep);
            kept[s] = keep;
        } else if (field == F.timestamp && wire == 2) {
            const uint8_t *bytes;
            int64_t n = delimited(&r, &bytes);
            if (r.error)
                break;
            has_ts = 1;
            if (c)
                timestamp(&r, bytes, n, &seconds, &nanos, 2);
        } else if (field == F.conversion && wire == 0) {
            uint64_t v = varint(&r);
            if (c) c->conversion[i] = (int64_t)(uint32_t)v;
        } else if (field == F.revenue && wire == 1) {
            if (r.end - r.p < 8) {
                fail(&r, "truncated fixed64 field");
            } else {
                if (c) memcpy(&c->revenue[i], r.p, 8);
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
    if (!c) {
        for (int s = 0; s < N_STRINGS; s++)
            q->sizes[s] += kept[s];
        return;
    }
    if (seconds > MAX_SECONDS) seconds = MAX_SECONDS;
    if (seconds < -MAX_SECONDS) seconds = -MAX_SECONDS;
    c->ts[i] = seconds * NS + nanos;
    c->ts_set[i] = (uint8_t)has_ts;
    for (int s = 0; s < N_STRINGS; s++) {
        c->offsets[s][i + 1] = c->offsets[s][i] + (int32_t)kept[s];
        if (not_utf8[s])
            add_problem(c, i, s, NOT_UTF8, 0);
        else if (too_long[s])
            add_problem(c, i, s, TOO_LONG, too_long[s]);
    }
}

/* Walks the request's top level. pass 0 counts events without looking into them, pass 1 sizes
 * the string columns, pass 2 fills `c`. */
static void request(reader_t *r, int pass, columns_t *c, request_t *q) {
    int wire, field;
    Py_ssize_t i = 0;
    while ((field = tag(r, &wire))) {
        if (field == F.events && wire == 2) {
            const uint8_t *bytes;
            int64_t n = delimited(r, &bytes);
            if (r->error)
                break;
            if (pass == 0) {
                i++;
                continue;
            }
            event(r, bytes, n, i++, pass == 2 ? c : NULL, q);
        } else if (field == F.arrow_ipc && wire == 2) {
            q->ipc_len = delimited(r, &q->ipc);
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
    q->n_events = i;
}

static PyObject *bytes_of(Py_ssize_t size, char **buf) {
    PyObject *b = PyBytes_FromStringAndSize(NULL, size);
    if (b)
        *buf = PyBytes_AS_STRING(b);
    return b;
}

static PyObject *wire_error(reader_t *r, const uint8_t *base) {
    return PyErr_Format(PyExc_ValueError, "%s at byte %zd", r->error, (Py_ssize_t)(r->error_at - base));
}

static PyStructSequence_Field decoded_fields[] = {
    {"events", "number of events"},
    {"timestamp", "int64 ns per event (bytes)"},
    {"timestamp_set", "uint8 per event: 1 when the event had a timestamp (bytes)"},
    {"conversion", "int64 per event (bytes)"},
    {"revenue", "float64 per event (bytes)"},
    {"strings", "per string field, in `configure` order: (int32 offsets, data) bytes"},
    {"problems", "int64 quadruples (event, string field, kind, length): 0 not UTF-8, 1 too long"},
    {"arrow_ipc", "(start, length) of arrow_ipc within the request, or None"},
    {"producer_id", "bytes"},
    {"sequence", "int"},
    {NULL, NULL},
};
static PyStructSequence_Desc decoded_desc = {"abstream.service._events.Decoded",
                                             "An IngestEventsRequest read into columns.", decoded_fields, 10};

/* decode(raw: bytes, max_events, max_string) -> Decoded
 * Raises BatchTooLarge(events, max_events) past max_events events, before allocating anything
 * for them, and ValueError("<why> at byte <k>") when the bytes are not an IngestEventsRequest. */
static PyObject *decode(PyObject *self, PyObject *args) {
    PyObject *raw_obj;
    request_t q;
    memset(&q, 0, sizeof q);
    q.ipc_len = -1;
    if (!PyArg_ParseTuple(args, "O!nL", &PyBytes_Type, &raw_obj, &q.max_events, &q.max_string))
        return NULL;
    if (!F.configured) {
        PyErr_SetString(PyExc_RuntimeError, "_events.configure has not been called");
        return NULL;
    }
    if (q.max_events < 0 || q.max_string < 0) {
        PyErr_SetString(PyExc_ValueError, "max_events and max_string must not be negative");
        return NULL;
    }
    /* bytes are immutable: the sizes pass 1 finds are still true in pass 2. */
    const uint8_t *base = (const uint8_t *)PyBytes_AS_STRING(raw_obj);
    Py_ssize_t raw_len = PyBytes_GET_SIZE(raw_obj);
    reader_t r = {base, base + raw_len, NULL, NULL};
    PyObject *result = NULL, *items[4 + 2 * N_STRINGS] = {NULL}, *problems = NULL;
    columns_t c;
    memset(&c, 0, sizeof c);

    Py_BEGIN_ALLOW_THREADS
    request(&r, 0, NULL, &q);
    Py_END_ALLOW_THREADS
    if (r.error)
        return wire_error(&r, base);
    if (q.n_events > q.max_events) {
        PyObject *why = Py_BuildValue("(nn)", q.n_events, q.max_events);
        if (why) {
            PyErr_SetObject(BatchTooLarge, why);
            Py_DECREF(why);
        }
        return NULL;
    }
    r.p = base;
    Py_BEGIN_ALLOW_THREADS
    request(&r, 1, NULL, &q);
    Py_END_ALLOW_THREADS
    if (r.error)
        return wire_error(&r, base);
    Py_ssize_t n = q.n_events;
    for (int s = 0; s < N_STRINGS; s++) {
        if (q.sizes[s] > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "the values of string field %d in one request exceed 2 GiB", F.strings[s]);
            return NULL;
        }
    }
    int k = 0;
    if (!(items[k++] = bytes_of(n * 8, (char **)&c.ts)) || !(items[k++] = bytes_of(n, (char **)&c.ts_set)) ||
        !(items[k++] = bytes_of(n * 8, (char **)&c.conversion)) || !(items[k++] = bytes_of(n * 8, (char **)&c.revenue)))
        goto done;
    for (int s = 0; s < N_STRINGS; s++) {
        if (!(items[k++] = bytes_of((n + 1) * 4, (char **)&c.offsets[s])) ||
            !(items[k++] = bytes_of(q.sizes[s], (char **)&c.data[s])))
            goto done;
        c.offsets[s][0] = 0;
    }

    r.p = base;
    Py_BEGIN_ALLOW_THREADS
    request(&r, 2, &c, &q);
    Py_END_ALLOW_THREADS
    if (r.error) { /* only the last pass reads inside timestamps */
        wire_error(&r, base);
        goto done;
    }
    if (c.out_of_memory) {
        PyErr_NoMemory();
        goto done;
    }
    if (!(problems = PyBytes_FromStringAndSize((const char *)c.problems, c.n_problems * 4 * (Py_ssize_t)sizeof(int64_t))))
        goto done;
    PyObject *strings = PyTuple_New(N_STRINGS);
    if (!strings)
        goto done;
    for (int s = 0; s < N_STRINGS; s++) {
        PyObject *pair = PyTuple_Pack(2, items[4 + 2 * s], items[5 + 2 * s]);
        if (!pair) {
            Py_DECREF(strings);
            goto done;
        }
        PyTuple_SET_ITEM(strings, s, pair);
    }
    PyObject *values[10] = {
        PyLong_FromSsize_t(n), Py_NewRef(items[0]), Py_NewRef(items[1]), Py_NewRef(items[2]), Py_NewRef(items[3]),
        strings, Py_NewRef(problems),
        q.ipc_len >= 0 ? Py_BuildValue("(nn)", (Py_ssize_t)(q.ipc - base), (Py_ssize_t)q.ipc_len) : Py_NewRef(Py_None),
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
    for (size_t j = 0; j < sizeof items / sizeof items[0]; j++)
        Py_XDECREF(items[j]);
    Py_XDECREF(problems);
    PyMem_RawFree(c.problems);
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
    F.configured = 1;
    Py_RETURN_NONE;
}

/* count(raw: bytes) -> (events, (start, length) of arrow_ipc or None): the first walk alone,
 * which allocates nothing: what admitting the request will cost is known from it. */
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
    Py_BEGIN_ALLOW_THREADS
    request(&r, 0, NULL, &q);
    Py_END_ALLOW_THREADS
    if (r.error)
        return wire_error(&r, base);
    if (q.ipc_len < 0)
        return Py_BuildValue("(nO)", q.n_events, Py_None);
    return Py_BuildValue("(n(nn))", q.n_events, (Py_ssize_t)(q.ipc - base), (Py_ssize_t)q.ipc_len);
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
    BatchTooLarge = PyErr_NewExceptionWithDoc("abstream.service._events.BatchTooLarge",
                                              "A request holds more events than allowed: (events, limit).",
                                              PyExc_ValueError, NULL);
    if (!DecodedType || !BatchTooLarge || PyModule_AddObjectRef(m, "BatchTooLarge", BatchTooLarge) < 0 ||
        PyModule_AddObjectRef(m, "Decoded", (PyObject *)DecodedType) < 0 ||
        PyModule_AddIntConstant(m, "NOT_UTF8", NOT_UTF8) < 0 || PyModule_AddIntConstant(m, "TOO_LONG", TOO_LONG) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
