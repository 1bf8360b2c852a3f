/* Reads a block of NDJSON events straight into columns.
 *
 * Arrow's JSON reader parses an event line in ~1.7 µs on this kind of machine, most of it
 * generic work (type inference machinery, per-field builders, threads for small blocks): for a
 * request of 1,000 lines that is most of what the request costs, and a file of a million lines
 * took four times as long to read as to store. This knows the event: ten fields, strings,
 * one integer, one number, one timestamp. Each line is one JSON object; its known fields go to
 * their columns and every other member is checked and skipped.
 *
 * A line this does not take as it is (not JSON, a known field of another type, a timestamp in
 * another form, a duplicate field, a string that is not UTF-8 or holds a lone surrogate) is not
 * guessed at: its span is returned, and the caller reads it the slow way, with the messages users
 * see. So what this accepts is a subset of what the slow way accepts, with the same values.
 *
 * Memory: fixed columns sized by the block's line count (~70 bytes a line), string bytes never
 * more than the block's own. Time: one pass, linear in the block; nesting in skipped members is
 * bounded by MAX_DEPTH (deeper lines go the slow way, which refuses them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { N_STRINGS = 7, MAX_DEPTH = 64, MAX_NUMBER = 64 };
/* The fields: the strings first, in the order parse returns them. */
enum { F_TIMESTAMP = N_STRINGS, F_CONVERSION, F_REVENUE, N_FIELDS };

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static int grow(buf_t *b, size_t more) {
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

typedef struct {
    Py_ssize_t n;             /* rows written */
    int64_t *line;            /* the 1-based line of each row */
    int64_t *ts, *conversion;
    double *revenue;
    uint8_t *valid[N_FIELDS]; /* Arrow validity bitmaps */
    Py_ssize_t nulls[N_FIELDS];
    int32_t *offsets[N_STRINGS];
    buf_t data[N_STRINGS];
    int64_t *slow;            /* (line, start, end) of each line left to the slow way */
    Py_ssize_t n_slow;
    int out_of_memory;
    /* Low-cardinality columns dictionary-encoded: each row's index, and the distinct values. */
    int32_t *index[N_STRINGS];
    int32_t *dict_offsets[N_STRINGS];
    buf_t dict_data[N_STRINGS];
    int32_t distinct[N_STRINGS];
} out_t;

typedef struct {
    const uint8_t *p, *end;
} cur_t;

static inline void ws(cur_t *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\r'))
        c->p++;
}

static inline int hex4(const uint8_t *p, uint32_t *out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t h = p[i];
        v <<= 4;
        if (h >= '0' && h <= '9')
            v |= h - '0';
        else if (h >= 'a' && h <= 'f')
            v |= h - 'a' + 10;
        else if (h >= 'A' && h <= 'F')
            v |= h - 'A' + 10;
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* Bytes of a valid UTF-8 sequence starting at p (RFC 3629: no overlongs, no surrogates, at most
 * U+10FFFF), or 0. */
static inline int utf8_length(const uint8_t *p, const uint8_t *end) {
    uint8_t b = p[0];
    if (b >= 0xC2 && b <= 0xDF)
        return end - p >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
    if (b >= 0xE0 && b <= 0xEF) {
        if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80)
            return 0;
        if ((b == 0xE0 && p[1] < 0xA0) || (b == 0xED && p[1] >= 0xA0))
            return 0;
        return 3;
    }
    if (b >= 0xF0 && b <= 0xF4) {
        if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80)
            return 0;
        if ((b == 0xF0 && p[1] < 0x90) || (b == 0xF4 && p[1] >= 0x90))
            return 0;
        return 4;
    }
    return 0;
}

/* Bytes that stand for themselves inside a JSON string: printable ASCII but the quote and the
 * backslash (set by PyInit). */
static uint8_t PLAIN[256];

/* A JSON string at c->p (its opening quote), decoded into `into` when given (else checked only).
 * 0, or -1 when it is not one this takes. */
static int string(cur_t *c, buf_t *into) {
    const uint8_t *p = c->p + 1, *end = c->end;
    while (p < end) {
        const uint8_t *run = p;
        while (p < end && PLAIN[*p])
            p++;
        if (into && p > run) {
            if (grow(into, p - run))
                return -2;
            memcpy(into->p + into->len, run, p - run);
            into->len += p - run;
        }
        if (p >= end)
            return -1;
        uint8_t b = *p;
        if (b == '"') {
            c->p = p + 1;
            return 0;
        }
        if (b < 0x20)
            return -1; /* a control character must be escaped */
        if (b >= 0x80) {
            int k = utf8_length(p, end);
            if (!k)
                return -1;
            if (into) {
                if (grow(into, k))
                    return -2;
                memcpy(into->p + into->len, p, k);
                into->len += k;
            }
            p += k;
            continue;
        }
        /* an escape */
        if (end - p < 2)
            return -1;
        uint8_t e = p[1], ch;
        p += 2;
        switch (e) {
        case '"': ch = '"'; break;
        case '\\': ch = '\\'; break;
        case '/': ch = '/'; break;
        case 'b': ch = '\b'; break;
        case 'f': ch = '\f'; break;
        case 'n': ch = '\n'; break;
        case 'r': ch = '\r'; break;
        case 't': ch = '\t'; break;
        case 'u': {
            uint32_t u, low;
            if (end - p < 4 || hex4(p, &u))
                return -1;
            p += 4;
            if (u >= 0xDC00 && u <= 0xDFFF)
                return -1; /* a lone low surrogate */
            if (u >= 0xD800 && u <= 0xDBFF) {
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &low) || low < 0xDC00 || low > 0xDFFF)
                    return -1; /* a high surrogate not followed by a low one */
                p += 6;
                u = 0x10000 + ((u - 0xD800) << 10) + (low - 0xDC00);
            }
            if (into) {
                uint8_t tmp[4];
                int k;
                if (u < 0x80) {
                    tmp[0] = (uint8_t)u;
                    k = 1;
                } else if (u < 0x800) {
                    tmp[0] = 0xC0 | (u >> 6);
                    tmp[1] = 0x80 | (u & 0x3F);
                    k = 2;
                } else if (u < 0x10000) {
                    tmp[0] = 0xE0 | (u >> 12);
                    tmp[1] = 0x80 | ((u >> 6) & 0x3F);
                    tmp[2] = 0x80 | (u & 0x3F);
                    k = 3;
                } else {
                    tmp[0] = 0xF0 | (u >> 18);
                    tmp[1] = 0x80 | ((u >> 12) & 0x3F);
                    tmp[2] = 0x80 | ((u >> 6) & 0x3F);
                    tmp[3] = 0x80 | (u & 0x3F);
                    k = 4;
                }
                if (grow(into, k))
                    return -2;
                memcpy(into->p + into->len, tmp, k);
                into->len += k;
            }
            continue;
        }
        default:
            return -1;
        }
        if (into) {
            if (grow(into, 1))
                return -2;
            into->p[into->len++] = (char)ch;
        }
    }
    return -1;
}

/* A JSON number at c->p; *integer says whether it has no fraction or exponent. 0 or -1. */
static int number(cur_t *c, const uint8_t **start, int *integer) {
    const uint8_t *p = c->p, *end = c->end;
    *start = p;
    *integer = 1;
    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return -1;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    else
        return -1;
    if (p < end && *p == '.') {
        *integer = 0;
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return -1;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        *integer = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return -1;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    c->p = p;
    return 0;
}

static int literal(cur_t *c, const char *word) {
    size_t k = strlen(word);
    if ((size_t)(c->end - c->p) < k || memcmp(c->p, word, k))
        return -1;
    c->p += k;
    return 0;
}

/* Any JSON value, checked and skipped. */
static int skip(cur_t *c, int depth) {
    if (c->p >= c->end || depth > MAX_DEPTH)
        return -1;
    const uint8_t *start;
    int integer;
    switch (*c->p) {
    case '"':
        return string(c, NULL);
    case 't':
        return literal(c, "true");
    case 'f':
        return literal(c, "false");
    case 'n':
        return literal(c, "null");
    case '[':
    case '{': {
        uint8_t close = *c->p == '[' ? ']' : '}';
        int object = close == '}';
        c->p++;
        ws(c);
        if (c->p < c->end && *c->p == close) {
            c->p++;
            return 0;
        }
        for (;;) {
            if (object) {
                if (c->p >= c->end || *c->p != '"' || string(c, NULL))
                    return -1;
                ws(c);
                if (c->p >= c->end || *c->p != ':')
                    return -1;
                c->p++;
                ws(c);
            }
            if (skip(c, depth + 1))
                return -1;
            ws(c);
            if (c->p >= c->end)
                return -1;
            if (*c->p == close) {
                c->p++;
                return 0;
            }
            if (*c->p != ',')
                return -1;
            c->p++;
            ws(c);
        }
    }
    default:
        return number(c, &start, &integer);
    }
}

static inline int digits(const uint8_t *p, int k, int *out) {
    int v = 0;
    for (int i = 0; i < k; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    *out = v;
    return 0;
}

/* Days from 1970-01-01 to a civil date (proleptic Gregorian). */
static int64_t days_from_civil(int y, int m, int d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* 'YYYY-MM-DD HH:MM:SS' or with a 'T', up to nine digits of fraction, and 'Z' or a '+HH:MM'
 * offset (UTC when there is none): nanoseconds since the epoch. Any other form is -1 (the slow
 * way reads it). */
static int timestamp(const uint8_t *s, size_t len, int64_t *out) {
    static const int MONTH_DAYS[12] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int y, mo, d, h, mi, se;
    if (len < 19 || s[4] != '-' || s[7] != '-' || (s[10] != ' ' && s[10] != 'T') || s[13] != ':' || s[16] != ':')
        return -1;
    if (digits(s, 4, &y) || digits(s + 5, 2, &mo) || digits(s + 8, 2, &d) || digits(s + 11, 2, &h) ||
        digits(s + 14, 2, &mi) || digits(s + 17, 2, &se))
        return -1;
    if (y < 1900 || y > 2200 || mo < 1 || mo > 12 || d < 1 || d > MONTH_DAYS[mo - 1] || h > 23 || mi > 59 || se > 59)
        return -1;
    if (mo == 2 && d == 29 && !((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
        return -1;
    size_t at = 19;
    int64_t fraction = 0;
    if (at < len && s[at] == '.') {
        at++;
        int k = 0;
        while (at < len && s[at] >= '0' && s[at] <= '9') {
            if (++k > 9)
                return -1;
            fraction = fraction * 10 + (s[at++] - '0');
        }
        if (!k)
            return -1;
        for (; k < 9; k++)
            fraction *= 10;
    }
    int64_t offset = 0;
    if (at < len && (s[at] == 'Z' || s[at] == 'z')) {
        at++;
    } else if (at < len && (s[at] == '+' || s[at] == '-')) {
        int oh, om;
        if (len - at != 6 || s[at + 3] != ':' || digits(s + at + 1, 2, &oh) || digits(s + at + 4, 2, &om) ||
            oh > 23 || om > 59)
            return -1;
        offset = (int64_t)(oh * 60 + om) * 60 * (s[at] == '+' ? 1 : -1);
        at += 6;
    }
    if (at != len)
        return -1;
    int64_t seconds = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset;
    *out = seconds * 1000000000LL + fraction;
    return 0;
}

static inline void set_valid(uint8_t *bits, Py_ssize_t i) { bits[i >> 3] |= (uint8_t)(1u << (i & 7)); }

static const char *FIELD_NAMES[N_FIELDS] = {"user_id", "test_id", "variant", "event_type", "session_id", "device",
                                            "country", "timestamp", "conversion", "revenue"};
static size_t FIELD_LENGTHS[N_FIELDS];

/* The field a key names, or -1; `hint` is the field the previous key named, since lines
 * written by one program list their fields in one order. */
static inline int field_of(const buf_t *key, int hint) {
    int next = hint + 1 < N_FIELDS ? hint + 1 : 0;
    for (int k = 0; k < N_FIELDS; k++) {
        int f = (next + k) % N_FIELDS;
        if (FIELD_LENGTHS[f] == key->len && !memcmp(FIELD_NAMES[f], key->p, key->len))
            return f;
    }
    return -1;
}

/* A plain decimal (at most 15 significant digits, no exponent) as the nearest double, exactly:
 * an integer below 2^53 divided by a power of ten up to 10^22 rounds once (Clinger's fast
 * path). 0, or -1 for anything else (strtod reads it). */
static inline int decimal(const uint8_t *p, const uint8_t *end, double *out) {
    static const double POW10[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                                   1e12, 1e13, 1e14, 1e15, 1e16};
    int negative = *p == '-';
    p += negative;
    uint64_t m = 0;
    int n = 0, scale = -1;
    for (; p < end; p++) {
        if (*p == '.') {
            scale = 0;
            continue;
        }
        if (*p < '0' || *p > '9' || ++n > 15)
            return -1;
        m = m * 10 + (*p - '0');
        scale += scale >= 0;
    }
    double v = (double)m / POW10[scale < 0 ? 0 : scale];
    *out = negative ? -v : v;
    return 0;
}

/* One line into row o->n: 1 taken, 0 blank, -1 for the slow way, -2 out of memory. */
static int line(cur_t *c, out_t *o, buf_t *key, buf_t *scratch) {
    Py_ssize_t i = o->n;
    size_t mark[N_STRINGS];
    for (int s = 0; s < N_STRINGS; s++)
        mark[s] = o->data[s].len;
    ws(c);
    if (c->p >= c->end)
        return 0;
    if (*c->p != '{')
        goto slow;
    c->p++;
    ws(c);
    unsigned seen = 0;
    int hint = N_FIELDS - 1;
    if (c->p < c->end && *c->p == '}') {
        c->p++;
    } else {
        for (;;) {
            if (c->p >= c->end || *c->p != '"')
                goto slow;
            int f, r, next = hint + 1 < N_FIELDS ? hint + 1 : 0;
            size_t k = FIELD_LENGTHS[next];
            if ((size_t)(c->end - c->p) > k + 1 && c->p[k + 1] == '"' && !memcmp(c->p + 1, FIELD_NAMES[next], k)) {
                f = next; /* the key the previous one's order predicts, as plain bytes */
                c->p += k + 2;
            } else {
                key->len = 0;
                r = string(c, key);
                if (r == -2)
                    return -2;
                if (r)
                    goto slow;
                f = field_of(key, hint);
            }
            ws(c);
            if (c->p >= c->end || *c->p != ':')
                goto slow;
            c->p++;
            ws(c);
            if (c->p >= c->end)
                goto slow;
            hint = f >= 0 ? f : hint;
            if (f >= 0 && (seen & (1u << f)))
                goto slow; /* which one counts is the slow way's to say */
            if (f >= 0)
                seen |= 1u << f;
            int null = f >= 0 && *c->p == 'n';
            if (null) {
                if (literal(c, "null"))
                    goto slow;
            } else if (f < 0) {
                if (skip(c, 1))
                    goto slow;
            } else if (f < N_STRINGS) {
                if (*c->p != '"')
                    goto slow;
                r = string(c, &o->data[f]);
                if (r == -2)
                    return -2;
                if (r)
                    goto slow;
                if (o->data[f].len > INT32_MAX)
                    goto slow;
            } else if (f == F_TIMESTAMP) {
                if (*c->p != '"')
                    goto slow;
                const uint8_t *text = c->p + 1, *close = text;
                while (close < c->end && PLAIN[*close])
                    close++;
                if (close < c->end && *close == '"') { /* no escapes: read in place */
                    c->p = close + 1;
                    if (timestamp(text, close - text, &o->ts[i]))
                        goto slow;
                } else {
                    scratch->len = 0;
                    r = string(c, scratch);
                    if (r == -2)
                        return -2;
                    if (r || timestamp((const uint8_t *)scratch->p, scratch->len, &o->ts[i]))
                        goto slow;
                }
            } else {
                const uint8_t *start;
                int integer;
                if (number(c, &start, &integer))
                    goto slow;
                size_t k = c->p - start;
                if (f == F_CONVERSION) {
                    if (!integer || k > 18)
                        goto slow;
                    int64_t v = 0;
                    for (const uint8_t *q = start + (*start == '-'); q < c->p; q++)
                        v = v * 10 + (*q - '0');
                    o->conversion[i] = *start == '-' ? -v : v;
                } else if (decimal(start, c->p, &o->revenue[i])) {
                    char text[MAX_NUMBER + 1];
                    if (k > MAX_NUMBER)
                        goto slow;
                    memcpy(text, start, k);
                    text[k] = 0;
                    double v = strtod(text, NULL);
                    if (!(v - v == 0))
                        goto slow; /* inf: the slow way says it is not finite */
                    o->revenue[i] = v;
                }
            }
            if (f >= 0 && !null)
                set_valid(o->valid[f], i);
            ws(c);
            if (c->p < c->end && *c->p == ',') {
                c->p++;
                ws(c);
                continue;
            }
            if (c->p < c->end && *c->p == '}') {
                c->p++;
                break;
            }
            goto slow;
        }
    }
    ws(c);
    if (c->p != c->end)
        goto slow;
    for (int f = 0; f < N_FIELDS; f++)
        if (!(o->valid[f][i >> 3] & (1u << (i & 7))))
            o->nulls[f]++;
    if (!(o->valid[F_TIMESTAMP][i >> 3] & (1u << (i & 7))))
        o->ts[i] = 0;
    if (!(o->valid[F_CONVERSION][i >> 3] & (1u << (i & 7))))
        o->conversion[i] = 0;
    if (!(o->valid[F_REVENUE][i >> 3] & (1u << (i & 7))))
        o->revenue[i] = 0;
    for (int s = 0; s < N_STRINGS; s++)
        o->offsets[s][i + 1] = (int32_t)o->data[s].len;
    o->n++;
    return 1;
slow:
    for (int s = 0; s < N_STRINGS; s++)
        o->data[s].len = mark[s];
    for (int f = 0; f < N_FIELDS; f++)
        o->valid[f][i >> 3] &= (uint8_t) ~(1u << (i & 7));
    return -1;
}

/* Strings with few distinct values (tests, variants, event types, devices, countries): sent as
 * dictionaries, each value hashed once here instead of again by Arrow before sending. */
enum { MAX_DICTIONARY = 4096, MAX_PROBES = 32 };
static const int LOW_CARDINALITY[N_STRINGS] = {0, 1, 1, 1, 0, 1, 1};

/* Column s as (index per row, distinct values): 0, 1 when it has too many distinct values to
 * be worth it, or values that collide more than MAX_PROBES times (left plain: crafted values
 * cost no more than MAX_PROBES comparisons each), -1 out of memory. */
static int dictionary(out_t *o, int s) {
    enum { SLOTS = 2 * MAX_DICTIONARY };
    int32_t slot_of[SLOTS];
    memset(slot_of, -1, sizeof slot_of);
    Py_ssize_t n = o->n;
    int32_t m = 0;
    int32_t *index = malloc((size_t)n * 4 + 4), *offsets = malloc((MAX_DICTIONARY + 1) * 4);
    buf_t values = {0};
    if (!index || !offsets) {
        free(index);
        free(offsets);
        return -1;
    }
    offsets[0] = 0;
    const char *data = o->data[s].p;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *v = data + o->offsets[s][i];
        int32_t len = o->offsets[s][i + 1] - o->offsets[s][i];
        uint32_t h = 2166136261u;
        for (int32_t k = 0; k < len; k++)
            h = (h ^ (uint8_t)v[k]) * 16777619u;
        uint32_t at = h % SLOTS;
        for (int probes = 0;; probes++) {
            int32_t d = slot_of[at];
            if (d < 0 || probes == MAX_PROBES) {
                if (m == MAX_DICTIONARY || d >= 0) {
                    free(index);
                    free(offsets);
                    free(values.p);
                    return 1;
                }
                if (grow(&values, (size_t)len)) {
                    free(index);
                    free(offsets);
                    free(values.p);
                    return -1;
                }
                memcpy(values.p + values.len, v, (size_t)len);
                values.len += (size_t)len;
                offsets[m + 1] = (int32_t)values.len;
                slot_of[at] = d = m++;
                index[i] = d;
                break;
            }
            if (offsets[d + 1] - offsets[d] == len && !memcmp(values.p + offsets[d], v, (size_t)len)) {
                index[i] = d;
                break;
            }
            at = (at + 1) % SLOTS;
        }
    }
    o->index[s] = index;
    o->dict_offsets[s] = offsets;
    o->dict_data[s] = values;
    o->distinct[s] = m;
    return 0;
}

static PyObject *bytes_of(const void *p, size_t n) { return PyBytes_FromStringAndSize(p ? p : "", (Py_ssize_t)n); }

/* parse(block, first_line) -> (rows, lines, timestamp, conversion, revenue, strings, valid, nulls,
 * slow, count): the rows' 1-based line numbers (from first_line + 1), the fixed columns and
 * per string field (offsets, data), or for one with few distinct values (values' offsets, values'
 * data, each row's int32 index), as bytes; the validity bitmaps of every field (strings first,
 * then timestamp, conversion, revenue) and their null counts; (line, start, end) of each line
 * for the slow way, as int64 triples; the block's lines. */
static PyObject *parse(PyObject *self, PyObject *args) {
    Py_buffer view;
    long long first_line;
    if (!PyArg_ParseTuple(args, "y*L", &view, &first_line))
        return NULL;
    const uint8_t *base = view.buf, *end = base + view.len;
    Py_ssize_t lines = 0;
    for (const uint8_t *p = base; p < end && (p = memchr(p, '\n', end - p)); p++)
        lines++;
    if (view.len && base[view.len - 1] != '\n')
        lines++;
    out_t o;
    memset(&o, 0, sizeof o);
    buf_t key = {0}, scratch = {0};
    size_t rows = (size_t)lines, bitmap = (rows + 7) / 8 + 1;
    PyObject *result = NULL;
    o.line = malloc(rows * 8 + 8);
    o.ts = malloc(rows * 8 + 8);
    o.conversion = malloc(rows * 8 + 8);
    o.revenue = malloc(rows * 8 + 8);
    o.slow = malloc(rows * 24 + 24);
    int ok = o.line && o.ts && o.conversion && o.revenue && o.slow;
    for (int f = 0; f < N_FIELDS && ok; f++)
        ok = (o.valid[f] = calloc(bitmap, 1)) != NULL;
    for (int s = 0; s < N_STRINGS && ok; s++) {
        ok = (o.offsets[s] = malloc(rows * 4 + 4)) != NULL;
        if (ok)
            o.offsets[s][0] = 0;
    }
    if (!ok) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *p = base;
    for (Py_ssize_t k = 0; p < end; k++) {
        const uint8_t *nl = memchr(p, '\n', end - p), *stop = nl ? nl : end;
        cur_t c = {p, stop};
        int r = line(&c, &o, &key, &scratch);
        if (r == -2) {
            o.out_of_memory = 1;
            break;
        }
        if (r == 1)
            o.line[o.n - 1] = first_line + k + 1;
        else if (r == -1) {
            o.slow[3 * o.n_slow] = first_line + k + 1;
            o.slow[3 * o.n_slow + 1] = p - base;
            o.slow[3 * o.n_slow + 2] = stop - base;
            o.n_slow++;
        }
        p = nl ? nl + 1 : end;
    }
    for (int s = 0; s < N_STRINGS && !o.out_of_memory; s++)
        if (LOW_CARDINALITY[s] && dictionary(&o, s) < 0)
            o.out_of_memory = 1;
    Py_END_ALLOW_THREADS
    if (o.out_of_memory) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t n = o.n;
    PyObject *strings = PyTuple_New(N_STRINGS), *valid = PyTuple_New(N_FIELDS), *nulls = PyTuple_New(N_FIELDS);
    int built = strings && valid && nulls;
    for (int s = 0; s < N_STRINGS && built; s++) {
        int32_t m = o.distinct[s];
        PyObject *pair = o.index[s]
            ? Py_BuildValue("(NNN)", bytes_of(o.dict_offsets[s], ((size_t)m + 1) * 4),
                            bytes_of(o.dict_data[s].p, o.dict_data[s].len), bytes_of(o.index[s], (size_t)n * 4))
            : Py_BuildValue("(NN)", bytes_of(o.offsets[s], (n + 1) * 4), bytes_of(o.data[s].p, o.data[s].len));
        built = pair != NULL;
        if (built)
            PyTuple_SET_ITEM(strings, s, pair);
    }
    for (int f = 0; f < N_FIELDS && built; f++) {
        PyObject *bits = bytes_of(o.valid[f], (n + 7) / 8), *count = PyLong_FromSsize_t(o.nulls[f]);
        built = bits && count;
        if (bits)
            PyTuple_SET_ITEM(valid, f, bits);
        if (count)
            PyTuple_SET_ITEM(nulls, f, count);
    }
    if (built) {
        result = Py_BuildValue("(nNNNNOOONn)", n, bytes_of(o.line, n * 8), bytes_of(o.ts, n * 8),
                               bytes_of(o.conversion, n * 8), bytes_of(o.revenue, n * 8), strings, valid, nulls,
                               bytes_of(o.slow, o.n_slow * 24), lines);
    }
    Py_XDECREF(strings);
    Py_XDECREF(valid);
    Py_XDECREF(nulls);
done:
    PyBuffer_Release(&view);
    free(o.line);
    free(o.ts);
    free(o.conversion);
    free(o.revenue);
    free(o.slow);
    for (int f = 0; f < N_FIELDS; f++)
        free(o.valid[f]);
    for (int s = 0; s < N_STRINGS; s++) {
        free(o.offsets[s]);
        free(o.data[s].p);
        free(o.index[s]);
        free(o.dict_offsets[s]);
        free(o.dict_data[s].p);
    }
    free(key.p);
    free(scratch.p);
    return result;
}

static PyMethodDef methods[] = {
    {"parse", parse, METH_VARARGS, "Columns of a block of NDJSON event lines, and the lines left to the slow way."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ndjson", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ndjson(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    for (int b = 0x20; b < 0x80; b++)
        PLAIN[b] = b != '"' && b != '\\';
    for (int f = 0; f < N_FIELDS; f++)
        FIELD_LENGTHS[f] = strlen(FIELD_NAMES[f]);
    PyObject *names = PyTuple_New(N_STRINGS);
    if (!names) {
        Py_DECREF(m);
        return NULL;
    }
    for (int s = 0; s < N_STRINGS; s++)
        PyTuple_SET_ITEM(names, s, PyUnicode_FromString(FIELD_NAMES[s]));
    if (PyModule_AddObject(m, "STRINGS", names) < 0) {
        Py_DECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
