"""The C reader of NDJSON event lines (`clients/_ndjson.c`) agrees with the line-by-line reader
(Python's json and `typed_event`, which words every problem) on every input: each line it takes
has the same values, and every line it leaves is read the slow way."""

from __future__ import annotations

import datetime as dt
import io
import json
import random

import numpy as np
import pyarrow as pa
import pytest
from abstream.clients import _ndjson, files
from hypothesis import given, settings
from hypothesis import strategies as st

EVENT = {"timestamp": "2025-04-28 18:42:22", "user_id": "user_455", "test_id": "test_5", "variant": "variant_a",
         "event_type": "click", "conversion": 1, "revenue": 84.55, "session_id": "session_3455", "device": "desktop",
         "country": "AU"}


def fast(body: bytes) -> tuple[dict[int, dict], dict[int, tuple[str, str]], int]:
    """(rows by line, problems by line, lines) as `_ndjson_block` reads the body."""
    table, numbers, problems, count = files._ndjson_block(body, 0)
    return dict(zip(numbers.tolist(), table.to_pylist())), {n: (f, why) for n, f, why in problems}, count


def slow(body: bytes) -> tuple[dict[int, dict], dict[int, tuple[str, str]]]:
    """The same, read line by line (what the fast reader must agree with)."""
    lines = [(n + 1, line) for n, line in enumerate(body.split(b"\n")) if line.strip()]
    chunk = files._ndjson_chunk(lines, 0)
    return dict(zip(chunk.lines.tolist(), chunk.table.to_pylist())), {n: (f, why) for n, f, why in chunk.problems}


def agree(body: bytes) -> tuple[dict[int, dict], dict[int, tuple[str, str]]]:
    rows, problems, count = fast(body)
    assert (rows, problems) == slow(body)
    assert count == body.count(b"\n") + (not body.endswith(b"\n") and bool(body))
    return rows, problems


def test_the_readers_longest_string_is_the_servers():
    """clients/files.py keeps its own copy (the core loads pyarrow.compute, which reading a file
    never needs): a reader that let longer strings through would send rows the server rejects,
    and one that held them back would refuse rows the server takes."""
    from abstream.core import events

    assert files.MAX_STRING_BYTES == events.MAX_STRING_BYTES


def test_the_tutorials_event_is_read_with_every_field():
    rows, problems = agree((json.dumps(EVENT) + "\n").encode())
    assert problems == {}
    assert rows == {1: {**EVENT, "timestamp": dt.datetime(2025, 4, 28, 18, 42, 22, tzinfo=dt.timezone.utc)}}


def test_timestamps_keep_nanoseconds_and_offsets():
    body = "".join(json.dumps({**EVENT, "timestamp": t}) + "\n" for t in (
        "2025-04-28 18:42:22.123456789", "2025-04-28T18:42:22Z", "2025-04-28T20:42:22.5+02:00",
        "2025-04-28 16:42:22-02:00", "2024-02-29 23:59:59")).encode()
    table, numbers, problems, _ = files._ndjson_block(body, 0)
    assert problems == [] and numbers.tolist() == [1, 2, 3, 4, 5]
    base = 1_745_865_742 * 10**9
    assert table.column("timestamp").cast(pa.int64()).to_pylist() == [
        base + 123_456_789, base, base + 500_000_000, base, 1_709_251_199 * 10**9]


def test_lines_it_leaves_are_read_the_slow_way_with_their_messages():
    lines = [
        {**EVENT, "timestamp": "2025-04-28"},  # a date alone: the slow way's form
        {**EVENT, "timestamp": 1745865742},  # seconds since the epoch
        {**EVENT, "user_id": 455},  # a number where a string goes: sent as its text
        {**EVENT, "conversion": "yes"},
        {**EVENT, "conversion": 1.0},
        {**EVENT, "conversion": True},
        {**EVENT, "revenue": "12.5"},
        {**EVENT, "user_id": "\ud800"},  # a lone surrogate
        {**EVENT, "timestamp": "2025-02-29 00:00:00"},  # no such day
    ]
    text = [json.dumps(x) for x in lines] + [
        '{"revenue": NaN, "user_id": "a"}', '{"revenue": 1e999}', "not json", "[1, 2]", '{"user_id": "a",}',
        '{"user_id": "a"} {"user_id": "b"}', '{"user_id": "a", "user_id": "b"}', '{"revenue": 007}',
        '{"extra": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"conversion": 1180591620717411303424}', '{"conversion": "' + "9" * 5000 + '"}', '{"conversion": 1e400}',
        '{"revenue": "1_000"}',
    ]
    body = ("\n".join(text) + "\n").encode()
    rows, problems = agree(body)
    assert sorted(rows) == [1, 2, 3, 5, 6, 7, 16]
    assert rows[3]["user_id"] == "455" and rows[5]["conversion"] == 1 and rows[7]["revenue"] == 12.5
    assert rows[16]["user_id"] == "b"  # the last of a repeated field, as JSON readers take it
    assert problems == {
        4: ("conversion", 'conversion must be 0 or 1, got "yes"'),
        8: ("user_id", 'user_id is not valid UTF-8 (it holds a lone surrogate, "\\ud800")'),
        9: ("timestamp", "timestamp must be 'YYYY-MM-DD HH:MM:SS' (UTC), RFC 3339 or seconds since the Unix epoch, "
                         'got "2025-02-29 00:00:00"'),
        10: ("revenue", "revenue must be a finite number, got NaN"),
        11: ("revenue", "revenue must be a finite number, got Infinity"),
        12: ("line", "is not valid JSON: Expecting value"),
        13: ("line", "is not a JSON object (one event per line)"),
        14: ("line", "is not valid JSON: Expecting property name enclosed in double quotes"),
        15: ("line", "is not valid JSON: Extra data"),
        17: ("line", "is not valid JSON: Expecting ',' delimiter"),
        18: ("line", "is nested too deeply to read"),
        19: ("conversion", "conversion must be 0 or 1, got 1180591620717411303424"),
        20: ("conversion", 'conversion must be 0 or 1, got "' + "9" * 63),
        21: ("conversion", "conversion must be 0 or 1, got Infinity"),
        22: ("revenue", 'revenue must be a finite number, got "1_000"'),  # Python's own spelling of 1000
    }


def test_a_date_followed_by_what_reads_as_an_offset_is_refused_not_taken_for_a_time():
    """Python reads any character between a date and a time: '2024-01-01+02:00' was the day's
    02:00 (a date alone has no UTC offset), and '2024-01-01x10:00' its 10:00."""
    from abstream.clients.client import parse_time
    from abstream.core.errors import InvalidArgument
    from abstream.rest.pipes import parse_datetime

    for text in ("2024-01-01+02:00", "2024-01-01-05:00", "2024-01-01x10:00", "2024-01-01Z"):
        rows, problems = agree((json.dumps({**EVENT, "timestamp": text}) + "\n").encode())
        assert rows == {} and problems[1][0] == "timestamp", (text, rows)
        with pytest.raises(ValueError, match="is not a date and time"):
            parse_time(text)
        with pytest.raises(InvalidArgument, match="is not a DateTime"):
            parse_datetime("start_date", text)
    # What ISO 8601 writes stays read: basic and week dates, a 'T' or a space, offsets after a time.
    assert parse_time("20250501") == parse_time("2025-W18-4") == dt.datetime(2025, 5, 1, tzinfo=dt.timezone.utc)
    assert parse_time("2025-05-01t10:00+02:00") == dt.datetime(2025, 5, 1, 8, tzinfo=dt.timezone.utc)
    assert parse_datetime("end_date", "2025-05-01 10:00:00-02:00") == 1_746_100_800


def test_blank_lines_carriage_returns_and_a_last_line_without_newline():
    line = json.dumps(EVENT).encode()
    body = b"\n  \n" + line + b"\r\n\t\n" + line
    rows, problems = agree(body)
    assert sorted(rows) == [3, 5] and problems == {}


def test_revenue_is_the_nearest_double_of_its_text():
    rng = random.Random(7)
    values = [rng.uniform(-1e6, 1e6) for _ in range(3000)] + [rng.random() * 10**rng.randint(-12, 20) for _ in range(3000)]
    texts = [repr(v) for v in values] + [f"{v:.2f}" for v in values] + ["0", "-0.0", "1E2", "123456789012345678901234",
                                                                        "0.1", "0.30000000000000004", "5e-324"]
    body = "".join(f'{{"revenue": {t}}}\n' for t in texts).encode()
    table, numbers, problems, _ = files._ndjson_block(body, 0)
    assert problems == [] and len(numbers) == len(texts)
    assert table.column("revenue").to_pylist() == [float(t) for t in texts]


def test_strings_decode_escapes_and_utf8_as_json_does():
    values = ["café", "日本語", "emoji 😀", 'quote " backslash \\ slash /', "tab\tnewline\ncr\r", "\x00\x01\x1f", "é"]
    body = b"".join(json.dumps({"user_id": v}, ensure_ascii=ascii).encode() + b"\n" for v in values for ascii in (True, False))
    rows, problems = agree(body)
    assert problems == {} and [rows[n]["user_id"] for n in sorted(rows)] == [v for v in values for _ in (0, 1)]
    for raw in (b'{"user_id": "\xff"}', b'{"user_id": "\xc0\xaf"}', b'{"user_id": "\xed\xa0\x80"}',
                b'{"user_id": "a\x01b"}', b'{"user_id": "\\x"}', b'{"user_id": "\\ud83d"}'):
        _, numbers, _, _ = files._ndjson_block(raw + b"\n", 0)
        assert len(numbers) == 0, raw  # each left to the slow way, which refuses or reads it


def test_files_of_many_blocks_number_every_line_once():
    rng = random.Random(3)
    text = []
    for i in range(30_000):
        text.append("" if rng.random() < 0.01 else "oops" if rng.random() < 0.01 else json.dumps({**EVENT, "user_id": f"u{i}"}))
    body = ("\n".join(text) + "\n").encode()
    chunks = list(files.read_stream(io.BytesIO(body), "ndjson", 1_000, "f"))
    lines = [n for c in chunks for n in c.lines.tolist()]
    bad = [p[0] for c in chunks for p in c.problems]
    assert lines == sorted(lines) and not set(lines) & set(bad)
    assert sorted(lines + bad) == [n + 1 for n, t in enumerate(text) if t]
    assert all(c.table.num_rows <= 1_000 for c in chunks)
    assert [c.last for c in chunks] == sorted(c.last for c in chunks) and chunks[-1].last == len(text)
    users = [u for c in chunks for u in c.table.column("user_id").to_pylist()]
    assert users == [json.loads(t)["user_id"] for t in text if t and t != "oops"]


_text = st.text(st.characters(codec="utf-8"), max_size=12)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), _text)
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                      max_leaves=6)
_timestamp = st.one_of(
    st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 12, 31)).map(
        lambda d: d.strftime("%Y-%m-%d %H:%M:%S") + (f".{d.microsecond:06d}" if d.microsecond % 3 else "")),
    st.datetimes(min_value=dt.datetime(1901, 1, 2), max_value=dt.datetime(2199, 12, 30),
                 timezones=st.just(dt.timezone(dt.timedelta(hours=-5)))).map(lambda d: d.isoformat()),
    _value)
_field = {"timestamp": _timestamp, "conversion": st.one_of(st.integers(-5, 5), _value),
          "revenue": st.one_of(st.floats(-1e9, 1e9), st.integers(-10**6, 10**6), _value)}


@st.composite
def events(draw) -> str:
    event = {}
    for name in ("timestamp", *files.STRINGS, "conversion", "revenue"):
        if draw(st.booleans()):
            event[name] = draw(_field.get(name, st.one_of(_text, _value)))
    for key in draw(st.lists(_text, max_size=2)):
        event.setdefault(key, draw(_value))
    keys = draw(st.permutations(list(event)))
    text = json.dumps({k: event[k] for k in keys}, ensure_ascii=draw(st.booleans()),
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")])))
    if draw(st.integers(0, 9)) == 0:  # a broken line: cut short, or a byte changed
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["", "}", '"', "\\", ",", "\x01", "]"])) + text[at + 1:]
    return text


@settings(max_examples=300, deadline=None)
@given(st.lists(events(), min_size=1, max_size=20), st.sampled_from([b"\n", b"\r\n"]))
def test_random_lines_are_read_as_the_slow_way_reads_them(lines, newline):
    agree(newline.join(line.encode("utf-8", "surrogatepass") for line in lines) + newline)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_are_read_or_left_never_misread(raw):
    rows, problems, _ = fast(raw)
    reference_rows, reference_problems = slow(raw)
    assert rows == reference_rows and problems == reference_problems


def test_a_block_costs_memory_in_proportion_to_its_size():
    body = b"{}\n" * 200_000  # the most rows a block of this size can hold
    n, *_ = _ndjson.parse(body, 0)
    assert n == 200_000
    big = b'{"user_id": "' + b"x" * (8 << 20) + b'"}\n'
    table, numbers, problems, _ = files._ndjson_block(big, 0)
    assert numbers.tolist() == [1] and len(table.column("user_id")[0].as_py()) == 8 << 20


def _fnv1a(words: np.ndarray) -> np.ndarray:
    """32-bit FNV-1a of each row of a uint8 matrix (the reader's hash of dictionary values)."""
    h = np.full(len(words), 2166136261, dtype=np.uint32)
    for column in words.T:
        h = (h ^ column.astype(np.uint32)) * np.uint32(16777619)
    return h


def test_low_cardinality_strings_come_as_dictionaries_unless_many_or_colliding():
    few = b"".join(json.dumps({**EVENT, "variant": f"v{i % 3}"}).encode() + b"\n" for i in range(300))
    table, _, _, _ = files._ndjson_block(few, 0)
    assert pa.types.is_dictionary(table.schema.field("variant").type)
    assert table.column("variant").to_pylist() == [f"v{i % 3}" for i in range(300)]
    many = b"".join(json.dumps({**EVENT, "variant": f"v{i}"}).encode() + b"\n" for i in range(5000))
    table, _, _, _ = files._ndjson_block(many, 0)
    assert table.schema.field("variant").type == pa.string()  # too many distinct values: plain
    assert table.column("variant").to_pylist() == [f"v{i}" for i in range(5000)]
    # Values crafted to share one slot of the reader's table: plain after a bounded number of probes.
    rng = np.random.default_rng(1)
    words = rng.integers(97, 123, size=(1 << 21, 6), dtype=np.uint8)
    slot = _fnv1a(words) % 8192
    crafted = [bytes(w).decode() for w in words[slot == slot[0]][:64]]
    body = b"".join(json.dumps({**EVENT, "device": d}).encode() + b"\n" for d in crafted * 50)
    table, _, _, _ = files._ndjson_block(body, 0)
    assert table.schema.field("device").type == pa.string()
    assert table.column("device").to_pylist() == crafted * 50
    assert pa.types.is_dictionary(table.schema.field("variant").type)  # the other columns still are


def chunks_of(body: bytes, fmt: str, lines: int = 3) -> tuple[dict[int, dict], dict[int, tuple[str, str]], list[int]]:
    """(rows by line, problems by line, each chunk's last line) as a body of `fmt` is read."""
    rows, problems, lasts = {}, {}, []
    for chunk in files.read_stream(io.BufferedReader(io.BytesIO(body)), fmt, lines, "body", lambda _: None):
        rows.update(zip(chunk.lines.tolist(), chunk.table.to_pylist()))
        problems.update({n: (f, why) for n, f, why in chunk.problems})
        lasts.append(chunk.last)
    return rows, problems, lasts


def test_a_timestamp_no_nanosecond_instant_holds_rejects_its_line_alone():
    far = ['"2263-01-01 00:00:00"', '"1677-01-01T00:00:00Z"', "1e11", '"9999-12-31 23:59:59"']
    text = [json.dumps({**EVENT, "user_id": "ok1"})]
    text += [json.dumps({**EVENT, "user_id": "bad"})[:-1] + f', "timestamp": {t}}}' for t in far]
    text += [json.dumps({**EVENT, "user_id": "ok2"})]
    rows, problems, _ = chunks_of(("\n".join(text) + "\n").encode(), "ndjson", lines=100)
    assert [r["user_id"] for _, r in sorted(rows.items())] == ["ok1", "ok2"]
    assert problems == {n: ("timestamp", f"timestamp {json.dumps(json.loads(t))} is outside the accepted window "
                                         "(from 2000-01-01 to the server's time + 24h)") for n, t in zip(range(2, 6), far)}
    body = ("timestamp,user_id,test_id,variant\n2023-07-06 10:00:00,c1,tc,a\n2263-01-01 00:00:00,c2,tc,a\n"
            "2023-07-06 10:00:01,c3,tc,a\n").encode()
    rows, problems, _ = chunks_of(body, "csv")
    assert sorted((n, r["user_id"]) for n, r in rows.items()) == [(2, "c1"), (4, "c3")]
    assert problems == {3: ("timestamp", 'timestamp "2263-01-01 00:00:00" is outside the accepted window (from '
                                         "2000-01-01 to the server's time + 24h)")}


def test_a_csv_row_of_another_width_or_not_utf8_rejects_that_row_alone():
    rows_in = ["2023-07-06 10:00:00,c1,tc,a", "broken", '2023-07-06 10:00:02,"c,3",tc,a', "1,2,3,4,5",
               '2023-07-06 10:00:04,"c\n5",tc,b', "", "2023-07-06 10:00:05,c6,tc,\xe9"]
    body = ("timestamp,user_id,test_id,variant\n" + "\n".join(rows_in) + "\n").encode("utf-8")
    body = body.replace("c6".encode(), b"c\xff6")
    rows, problems, lasts = chunks_of(body, "csv", lines=2)
    assert {n: r["user_id"] for n, r in rows.items()} == {2: "c1", 4: "c,3", 6: "c\n5"}
    assert rows[6]["variant"] == "b"
    assert problems == {3: ("line", "has 1 fields where the header names 4"),
                        5: ("line", "has 5 fields where the header names 4"),
                        7: ("user_id", 'user_id is not valid UTF-8 (it holds a lone surrogate, "c\\udcff6")')}
    assert lasts == sorted(lasts) and lasts[-1] == 7
    many = "timestamp,user_id,test_id,variant\n" + "".join(
        f"2023-07-06 10:00:00,u{i},tc,a\n" if i != 90_000 else "broken\n" for i in range(100_000))
    rows, problems, _ = chunks_of(many.encode(), "csv", lines=5_000)
    assert (len(rows), problems) == (99_999, {90_002: ("line", "has 1 fields where the header names 4")})
    assert rows[90_001]["user_id"] == "u89999" and rows[90_003]["user_id"] == "u90001"


def test_a_clean_csv_block_without_some_columns_is_read_by_arrow_alone(monkeypatch):
    """Checking revenue for NaN sent every block of a file without a revenue column row by row
    (its column of nulls could not be viewed as numbers)."""
    def row_by_row(*args):
        raise AssertionError("read row by row")
    monkeypatch.setattr(files, "_csv_rows", row_by_row)
    monkeypatch.setattr(files, "typed_event", row_by_row)
    rows, problems, _ = chunks_of(b"timestamp,user_id,test_id,variant\n2025-04-28 18:42:22,u1,t,a\n", "csv")
    assert problems == {} and rows[2]["revenue"] is None and rows[2]["user_id"] == "u1"


def test_csv_values_are_read_as_written_whichever_reading_takes_them():
    """Arrow's reader took "NA", "null" and "N/A" for missing (Namibia's country dropped, a user
    named null refused); "1.0" (pandas' float column) was no conversion, seconds since the epoch
    in text no timestamp, and a lowercase `z` no UTC; "NaN" revenue went to the server. Each row
    is read alike by Arrow (a clean block) and row by row (a block with a row Arrow refuses)."""
    header = "timestamp,user_id,test_id,variant,conversion,revenue,country\n"
    good = ["1714329742,null,t,a,1.0,1,NA", "2025-04-28t18:42:22z,u2,t,NA,0.00,3,null",
            "1714329742.5,u3,t,a,1,,N/A"]
    read = {0: ("null", "a", "NA", 1, 1.0, "2024-04-28T18:42:22+00:00"),
            1: ("u2", "NA", "null", 0, 3.0, "2025-04-28T18:42:22+00:00"),
            2: ("u3", "a", "N/A", 1, None, "2024-04-28T18:42:22.500000+00:00")}
    for broken in ("", "broken\n"):  # Arrow's reading, then row by row
        rows, problems, _ = chunks_of((header + broken + "\n".join(good) + "\n").encode(), "csv", lines=100)
        at = 3 if broken else 2
        assert {n - at: (r["user_id"], r["variant"], r["country"], r["conversion"], r["revenue"],
                         r["timestamp"].isoformat()) for n, r in rows.items()} == read
        assert len(problems) == bool(broken)
    for bad, problem in (("2025-04-28 18:42:22,u4,t,a,1.5,2,AU", ("conversion", 'conversion must be 0 or 1, got "1.5"')),
                         ("2025-04-28 18:42:22,u5,t,a,1,NaN,AU", ("revenue", 'revenue must be a finite number, got "NaN"')),
                         ("2025,u6,t,a,1,2,AU", ("timestamp", "timestamp must be 'YYYY-MM-DD HH:MM:SS' (UTC), RFC 3339 "
                                                              'or seconds since the Unix epoch, got "2025"'))):
        rows, problems, _ = chunks_of((header + good[0] + "\n" + bad + "\n").encode(), "csv", lines=100)
        assert (sorted(rows), problems) == ([2], {3: problem})


def test_a_long_line_does_not_make_the_next_blocks_long():
    long_line = json.dumps({**EVENT, "user_id": "x" * (12 << 20)})
    body = "\n".join([long_line] + [json.dumps({**EVENT, "user_id": f"u{i}"}) for i in range(3)]) + "\n"
    asked = []

    class Counted(io.BytesIO):
        def readinto(self, buffer):
            asked.append(len(buffer))
            return super().readinto(buffer)

    chunks = list(files.read_stream(io.BufferedReader(Counted(body.encode())), "ndjson", 5_000, "body", lambda _: None))
    got = {n: r["user_id"] for c in chunks for n, r in zip(c.lines.tolist(), c.table.to_pylist())}
    assert got == {2: "u0", 3: "u1", 4: "u2"}
    assert [p[:2] for c in chunks for p in c.problems] == [(1, "line")]  # too long: below
    assert max(asked) <= 16 << 20, asked  # 5,000 lines of the long one's average were 15 GB


def test_a_line_far_longer_than_an_event_is_skipped_unread_and_the_lines_around_it_kept():
    """Memory stays that of a block: a line without end (here 64 MiB without a newline) is not
    read whole; it is reported by its number, and the lines before and after it are events."""
    def lines(*middle: bytes) -> bytes:
        return b"\n".join([json.dumps({**EVENT, "user_id": "before"}).encode(), *middle,
                           json.dumps({**EVENT, "user_id": "after"}).encode()]) + b"\n"

    class Counted(io.BytesIO):
        most = 0

        def read(self, size=-1):
            piece = super().read(size)
            Counted.most = max(Counted.most, len(piece))
            return piece

        def readline(self, size=-1):
            piece = super().readline(size)
            Counted.most = max(Counted.most, len(piece))
            return piece

    for long_line, skipped in [(b"x" * (64 << 20), True), (json.dumps({**EVENT, "user_id": "y" * (3 << 20)}).encode(),
                                                           False)]:
        Counted.most = 0
        chunks = list(files._ndjson(Counted(lines(long_line)), 1_000))
        got = {n: r["user_id"][:8] for c in chunks for n, r in zip(c.lines.tolist(), c.table.to_pylist())}
        problems = [p for c in chunks for p in c.problems]
        if skipped:
            assert got == {1: "before", 3: "after"}
            assert problems == [(2, "line", "is longer than 4 MiB, far more than an event takes: it was skipped")]
            assert Counted.most <= 4 << 20
        else:  # 3 MiB: read, and left to the server's checks
            assert got == {1: "before", 2: "y" * 8, 3: "after"} and not problems
