"""Event files read into Arrow batches: NDJSON and CSV as users send them today, Parquet and Arrow.

Each file is read in chunks of up to `lines` events. NDJSON lines are read into columns by
`_ndjson.c`, CSV by Arrow's reader (the fast paths); the lines a fast path does not take (a
malformed line, a value of another type) are read again one by one, to find and word the lines
that cannot be sent, in the server's words, naming their field. What can be sent goes to the server, which judges the rest (a missing
required field, a value out of range) and quarantines what it rejects.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from abstream.clients import _ndjson as _ndjson_c
from abstream.v1 import analytics_pb2 as pb

STRINGS = tuple(f.name for f in pb.Event.DESCRIPTOR.fields if f.type == f.TYPE_STRING)
REQUIRED = ("timestamp", "user_id", "test_id", "variant")
#: The columns a file's events are read into (timestamps in UTC).
FILE_SCHEMA = pa.schema([pa.field("timestamp", pa.timestamp("ns", tz="UTC"))]
                        + [pa.field(f.name, pa.int64() if f.name == "conversion" else pa.float64()
                                    if f.name == "revenue" else pa.string())
                           for f in pb.Event.DESCRIPTOR.fields if f.name != "timestamp"])
FORMATS = ("ndjson", "csv", "parquet", "arrow")


class FileProblem(Exception):
    """A file that cannot be read at all (missing, unreadable, a CSV without the columns needed)."""


class Problem(tuple):
    """(line, field, why) of a line that cannot be sent, and what of its event could be read
    (`partial`: the fields before the one refused), for the quarantine to show."""

    def __new__(cls, line: int, name: str, why: str, partial: dict[str, Any] | None = None) -> Problem:
        problem = super().__new__(cls, (line, name, why))
        problem.partial = partial or {}
        return problem


@dataclass
class Chunk:
    """Up to `lines` events of one file: what can be sent, and the lines that cannot."""

    table: pa.Table  # FILE_SCHEMA (its low-cardinality strings may come dictionary-encoded)
    lines: np.ndarray  # the line (or row) number of each of `table`'s rows
    problems: list[tuple[int, str, str]] = field(default_factory=list)  # (line, field, why)
    last: int = 0  # the last line the chunk covers: its sequence number when sent exactly once
    ipc: bytes = b""  # `table` as sent (arrow_ipc), once encoded


def format_of(path: str, requested: str = "auto") -> str:
    """A file's format, by its name's suffix (before a `.gz`: NDJSON and CSV are read gzipped)."""
    if requested != "auto":
        return requested
    name = path[:-3] if path.lower().endswith(".gz") else path
    suffix = Path(name).suffix.lower()
    return {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}.get(
        suffix, "ndjson")


def _warn(message: str) -> None:
    print(f"abstream ingest: {message}", file=sys.stderr)


def read(path: str, fmt: str, lines: int, warn: Callable[[str], None] = _warn) -> Iterator[Chunk]:
    """The file's events in chunks; `path` "-" is standard input (NDJSON or CSV); `warn` hears
    what is read past (columns that are not event fields)."""
    try:
        if fmt in ("ndjson", "csv"):
            with _open(path) as f:
                yield from read_stream(f, fmt, lines, path, warn)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            names = _event_columns(parquet.schema_arrow.names, path, warn)  # the others are not even read
            yield from _columnar(parquet.iter_batches(batch_size=lines, columns=names), path)
        else:
            with pa.memory_map(path) as source:
                try:
                    reader = pa.ipc.open_file(source)
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                except pa.ArrowInvalid:
                    source.seek(0)
                    reader = pa.ipc.open_stream(source)
                    batches = iter(reader)
                names = _event_columns(reader.schema.names, path, warn)
                yield from _columnar((batch.select(names) for batch in batches), path)
    except OSError as error:
        raise FileProblem(f"cannot read {path}: {error.strerror or error}") from None
    except EOFError:
        raise FileProblem(f"cannot read {path}: it ends inside its gzip data (cut short?)") from None
    except pa.ArrowInvalid as error:
        raise FileProblem(f"{path} is not a readable {fmt} file: {error}") from None


def read_stream(f: BinaryIO, fmt: str, lines: int, name: str, warn: Callable[[str], None] = _warn
                ) -> Iterator[Chunk]:
    """NDJSON or CSV events from a buffered binary stream (a file, standard input, a request
    body), in chunks; `name` is what messages call it."""
    try:
        yield from (_ndjson(f, lines) if fmt == "ndjson" else _csv(f, name, lines, warn))
    except pa.ArrowInvalid as error:
        raise FileProblem(f"{name} is not a readable {fmt} file: {error}") from None


#: How a gzip member begins: files, bodies and objects are told gzip by it, whatever their names.
GZIP_MAGIC = b"\x1f\x8b"


def _open(path: str) -> BinaryIO:
    """The file (or standard input), inflated as it is read when it is gzip (by its first bytes,
    whatever its name: log shippers and `gzip` write NDJSON so)."""
    f = sys.stdin.buffer if path == "-" else open(path, "rb")
    if f.peek(2)[:2] != GZIP_MAGIC:
        return f
    import gzip

    if path != "-" and os.path.isfile(path):
        f.close()
        return io.BufferedReader(gzip.open(path, "rb"), 1 << 20)
    return io.BufferedReader(gzip.GzipFile(fileobj=f, mode="rb"), 1 << 20)  # a pipe cannot be opened again



def finite(value):
    """A value to write as JSON as ClickHouse does: a number that is not finite (a sum past the
    largest double, a ratio of infinities) is null, never the Infinity or NaN parsers refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value

# ---- NDJSON ------------------------------------------------------------------------------

#: Bytes per line expected in the first block; then the file's own average so far, a little
#: less, so that a block holds about `lines` lines (a block of more is cut).
_BYTES_PER_LINE = 256
#: A block is at most this many bytes however long the lines so far: after a 12 MB line, the
#: average asked a reader for 5,000 lines of 3 MB at once (a MemoryError).
_MOST_BLOCK_BYTES = 16 << 20
#: The line a block cuts is read to its end up to this: a longer one is skipped unread, said to be
#: too long, so that a line without end (a 4 GiB upload of one line) costs no more memory than a
#: block does.
_MOST_LINE_BYTES = 4 << 20
_FIXED = {"timestamp": pa.timestamp("ns", tz="UTC"), "conversion": pa.int64(), "revenue": pa.float64()}


def _ndjson(f: BinaryIO, lines: int) -> Iterator[Chunk]:
    """Whole lines, a block of bytes at a time, read into columns by `_ndjson.c`; the lines it
    leaves (anything but a plain event line) are read one by one, to find and word the ones
    that cannot be sent."""
    number, per_line = 0, float(_BYTES_PER_LINE)
    while True:
        body = f.read(min(max(int(lines * per_line * 0.98), 1), _MOST_BLOCK_BYTES))
        if not body:
            return
        too_long = False
        if not body.endswith(b"\n"):  # to the end of the line the block cut, unless it is far longer than any event
            rest = f.readline(_MOST_LINE_BYTES)
            start = body.rfind(b"\n") + 1
            if len(body) - start + len(rest) >= _MOST_LINE_BYTES and not rest.endswith(b"\n"):
                body, too_long = body[:start], True
                while rest and not rest.endswith(b"\n"):  # the rest of it, skipped a piece at a time
                    rest = f.readline(_MOST_LINE_BYTES)
            else:
                body += rest
        table, numbers, problems, count = _ndjson_block(body, number) if body else (
            FILE_SCHEMA.empty_table(), np.zeros(0, np.int64), [], 0)
        if too_long:
            count += 1
            problems = [*problems, (number + count, "line", f"is longer than {_MOST_LINE_BYTES >> 20} MiB, far more "
                                                             "than an event takes: it was skipped")]
        per_line = (len(body) or _MOST_LINE_BYTES) / count
        number += count
        at = 0
        for start in range(0, max(table.num_rows, 1), lines):
            piece, rows = table.slice(start, lines), numbers[start:start + lines]
            last = number if start + lines >= table.num_rows else int(rows[-1])
            here = [p for p in problems[at:] if p[0] <= last]
            at += len(here)
            if piece.num_rows or here:
                yield Chunk(piece, rows, here, last)


def _ndjson_block(body: bytes, number: int) -> tuple[pa.Table, np.ndarray, list[tuple[int, str, str]], int]:
    """(the block's events, their lines, the lines that cannot be sent, the block's lines), the
    events in line order."""
    n, line_numbers, timestamp, conversion, revenue, strings, valid, nulls, slow, count = _ndjson_c.parse(body, number)
    validity = dict(zip((*_ndjson_c.STRINGS, *_FIXED), zip(valid, nulls)))

    def bits(name: str) -> pa.Buffer | None:
        bitmap, missing = validity[name]
        return pa.py_buffer(bitmap) if missing else None

    columns = {name: pa.Array.from_buffers(kind, n, [bits(name), pa.py_buffer(data)], validity[name][1])
               for (name, kind), data in zip(_FIXED.items(), (timestamp, conversion, revenue))}
    for name, buffers in zip(_ndjson_c.STRINGS, strings):
        if len(buffers) == 2:
            offsets, data = buffers
            columns[name] = pa.Array.from_buffers(pa.string(), n, [bits(name), pa.py_buffer(offsets),
                                                                   pa.py_buffer(data)], validity[name][1])
        else:  # few distinct values: as a dictionary, which the server and arrow_ipc take as it is
            offsets, data, index = buffers
            values = pa.Array.from_buffers(pa.string(), len(offsets) // 4 - 1, [None, pa.py_buffer(offsets),
                                                                                 pa.py_buffer(data)])
            columns[name] = pa.DictionaryArray.from_arrays(pa.Array.from_buffers(
                pa.int32(), n, [bits(name), pa.py_buffer(index)], validity[name][1]), values)
    table = pa.table({f.name: columns[f.name] for f in FILE_SCHEMA})
    numbers = np.frombuffer(line_numbers, dtype=np.int64)
    if not slow:
        return table, numbers, [], count
    spans = np.frombuffer(slow, dtype=np.int64).reshape(-1, 3).tolist()
    read = _ndjson_chunk([(line, bytes(body[a:b])) for line, a, b in spans if body[a:b].strip()], 0)
    if read.table.num_rows:
        numbers = np.concatenate([numbers, read.lines])
        order = np.argsort(numbers, kind="stable")
        table, numbers = pa.concat_tables([table.cast(FILE_SCHEMA), read.table]).take(order), numbers[order]
    return table, numbers, read.problems, count


def _ndjson_chunk(piece: list[tuple[int, bytes]], last: int) -> Chunk:
    """Lines one by one: what each can be sent as, or why it cannot."""
    rows, kept, problems = [], [], []
    for n, line in piece:
        try:
            value = json.loads(line)
        except ValueError as error:
            problems.append((n, "line", f"is not valid JSON: {str(error).split(':')[0]}"))
            continue
        except RecursionError:
            problems.append((n, "line", "is nested too deeply to read"))
            continue
        if not isinstance(value, dict):
            problems.append((n, "line", "is not a JSON object (one event per line)"))
            continue
        row, why = typed_event(value)
        if why:
            problems.append(Problem(n, *why, row))
        else:
            rows.append(row)
            kept.append(n)
    return Chunk(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), np.array(kept, dtype=np.int64), problems, last)


def typed_event(event: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """An event's values in the file's types, or the first field that cannot be, and why, in the
    server's words."""
    row: dict[str, Any] = {}
    for name in STRINGS:
        value = event.get(name)
        if value is None or (isinstance(value, str) and (value.isascii() or _utf8(value))):
            row[name] = value
        elif isinstance(value, str):
            return row, (name, f"{name} is not valid UTF-8 (it holds a lone surrogate, {_shown(value)})")
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # NumPy numbers too
            row[name] = str(value)
        else:
            return row, (name, f"{name} must be a string, got {_shown(value)}")
    moment = parse_time(event.get("timestamp"))
    if moment is _BAD:
        return row, ("timestamp", f"timestamp must be 'YYYY-MM-DD HH:MM:SS' (UTC), RFC 3339 or seconds since the "
                                  f"Unix epoch, got {_shown(event.get('timestamp'))}")
    if moment is not None and not _EARLIEST <= moment <= _LATEST:
        return row, ("timestamp", f"timestamp {_shown(event.get('timestamp'))} is outside the accepted "
                                  "window (from 2000-01-01 to the server's time + 24h)")
    row["timestamp"] = moment
    conversion = event.get("conversion")
    if conversion is not None:
        if (value := _integer(conversion)) is None:
            return row, ("conversion", f"conversion must be 0 or 1, got {_shown(conversion)}")
        row["conversion"] = value
    revenue = event.get("revenue")
    if revenue is not None:
        try:
            row["revenue"] = float(revenue)
            if isinstance(revenue, bool) or not math.isfinite(row["revenue"]) or (
                    isinstance(revenue, str) and "_" in revenue):  # Python's 1_000, which no JSON or CSV writer means
                raise ValueError
        except (TypeError, ValueError, OverflowError):  # an integer past a float's range: 1e309
            return row, ("revenue", f"revenue must be a finite number, got {_shown(revenue)}")
    return row, None


def _shown(value: Any) -> str:
    """A value for a message, as JSON writes it (the text of what JSON cannot hold: a date, a
    NumPy number, a UUID), at most 64 characters."""
    return json.dumps(value, default=str)[:64]


_BAD = object()
#: The instants a timestamp[ns] holds (int64 nanoseconds since the epoch): one outside them cannot
#: be sent at all (Arrow refused the whole chunk of its line), so it is refused here, by line.
_EARLIEST = dt.datetime(1677, 9, 22, tzinfo=dt.timezone.utc)
_LATEST = dt.datetime(2262, 4, 11, tzinfo=dt.timezone.utc)


def _integer(value: Any) -> int | None:
    """An integer as JSON or CSV may hold one (1, 1.0, "1", true), within int64, or None."""
    if isinstance(value, float):
        value = int(value) if math.isfinite(value) and value.is_integer() else None
    elif isinstance(value, str):  # "1", or "1.0" as pandas writes a column of floats
        match = _WHOLE_NUMBER.fullmatch(value.strip())
        value = int(match.group(1)) if match else None
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # a NumPy integer too
    elif not isinstance(value, int):
        return None
    return int(value) if value is not None and -2**63 <= value < 2**63 else None


#: An integer as text, with a fraction of zeros or none; ASCII digits only ("²" is a digit to str.isdigit).
_WHOLE_NUMBER = re.compile(r"(-?[0-9]{1,19})(?:\.0*)?")


def _utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


#: A date in a form ISO 8601 gives one (extended, basic, or a week date), and nothing or a time
#: after 'T' or a space. Python takes any character between a date and a time, so that
#: '2024-01-01+02:00' (a date and what reads as a UTC offset, which a date alone never has) was
#: the day's 02:00.
_DATE_THEN_TIME = re.compile(r"(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4}-?W\d{2}(?:-?\d)?)(?:[Tt ].*)?", re.S)


def from_iso(text: str) -> dt.datetime:
    """A moment written in ISO 8601 (RFC 3339 among its forms), naive when it names no offset;
    ValueError when it is not one."""
    text = text.strip()
    if not _DATE_THEN_TIME.fullmatch(text):
        raise ValueError(f"{text[:64]!r} is not an ISO 8601 date and time")
    if text[-1:] in "Zz":  # RFC 3339 allows a lowercase z, which Python does not read
        text = text[:-1] + "+00:00"
    return dt.datetime.fromisoformat(text)


#: Seconds since the epoch as text: 9 to 12 digits (from 1973), a fraction. Fewer are ISO 8601's
#: basic dates and times ('20250428', '2025') or nothing meant as a time.
_SECONDS = re.compile(r"[0-9]{9,12}(?:\.[0-9]+)?")


def parse_time(value: Any):
    """A timestamp as users send it: 'YYYY-MM-DD HH:MM:SS' (UTC), RFC 3339, or seconds since the
    epoch; None when absent; _BAD when it is none of those."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return dt.datetime.fromtimestamp(value, dt.timezone.utc)
        except (OverflowError, OSError, ValueError):
            return _BAD
    if not isinstance(value, str):
        return _BAD
    if _SECONDS.fullmatch(value.strip()):  # seconds as text (CSV holds nothing else)
        return parse_time(float(value))
    try:
        moment = from_iso(value)
    except ValueError:
        return _BAD
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


# ---- CSV ---------------------------------------------------------------------------------

#: What of a CSV header tells its delimiter: the ten columns' names take ~100.
SNIFF_CHARS = 1024


def csv_columns(header: str, path: str) -> tuple[str, dict[str, str], list[str]]:
    """(delimiter, the file's name of each event field it has, the names it has that are not
    event fields) from a CSV header line; FileProblem when required columns are missing."""
    try:
        # Its first SNIFF_CHARS only: the sniffer's patterns take time in the square of what
        # they read, holding the GIL (a 4 MiB header of `,"` would have stopped the process for hours).
        delimiter = csv.Sniffer().sniff(header[:SNIFF_CHARS], delimiters=",;\t|").delimiter
    except csv.Error:
        delimiter = ","
    try:
        names = next(csv.reader([header], delimiter=delimiter))
    except csv.Error as error:  # a quoted name past the csv module's field limit, among others
        raise FileProblem(f"{path}: the header line cannot be read as CSV ({error})") from None
    fields = [f.name for f in pb.Event.DESCRIPTOR.fields]
    found = {}
    for name in names:
        key = name.strip().lower()
        if key in fields and key not in found:
            found[key] = name
    missing = [name for name in REQUIRED if name not in found]
    if missing:
        raise FileProblem(f"{path}: the header names no {', '.join(missing)} column (found: "
                          f"{', '.join(repr(n) for n in names) or 'nothing'}; separator {delimiter!r}); a CSV needs "
                          f"a header naming at least {', '.join(REQUIRED)}")
    extra = [n for n in names if n.strip().lower() not in fields]
    return delimiter, found, extra


#: What Excel's "CSV UTF-8" and others write before the header: not part of its first name.
_BOM = b"\xef\xbb\xbf"  # U+FEFF in UTF-8
#: A CSV block is cut at a row's end; an open quote (an odd number of them) extends it to the
#: next line's end, up to this many blocks' bytes.
_MOST_BLOCKS_PER_ROW = 16


def _csv(f: BinaryIO, path: str, lines: int, warn: Callable[[str], None]) -> Iterator[Chunk]:
    """Blocks of whole rows, each read by Arrow; a block with a row Arrow cannot take (another
    number of fields than the header's, bytes that are not UTF-8) is read again row by row, so
    that only those rows are refused, each naming its row."""
    header = f.readline(_MOST_LINE_BYTES).removeprefix(_BOM)
    if not header.strip():
        raise FileProblem(f"{path}: is empty; a CSV needs a header line naming its columns")
    if len(header) >= _MOST_LINE_BYTES and not header.endswith(b"\n"):
        raise FileProblem(f"{path}: its first line is longer than {_MOST_LINE_BYTES >> 20} MiB; a CSV's first line "
                          "is a header naming its columns")
    delimiter, found, extra = csv_columns(header.decode("utf-8", "replace").rstrip("\r\n"), path)
    if extra:
        warn(f"{path}: ignoring columns that are not event fields: {', '.join(repr(n) for n in extra)}")
    names = next(csv.reader([header.decode("utf-8", "replace").rstrip("\r\n")], delimiter=delimiter))
    renames = {original: field for field, original in found.items()}
    size = max(lines, 1) * 200
    number = 1  # the header
    while True:
        block, too_long = _csv_block(f, size)
        if not block and not too_long:
            return
        if block:
            number += yield from _csv_read(block, names, found, renames, delimiter, number, lines)
        if too_long:  # the line after the block, skipped
            number += 1
            yield Chunk(FILE_SCHEMA.empty_table(), np.zeros(0, np.int64), [
                (number, "line", f"is longer than {_MOST_LINE_BYTES >> 20} MiB, far more than an event takes: it was "
                                 "skipped")], number)


def _csv_read(block: bytes, names: list[str], found: dict[str, str], renames: dict[str, str], delimiter: str,
              number: int, lines: int) -> Iterator[Chunk]:
    """A block's rows, numbered from `number` + 1, read by Arrow, or row by row when Arrow cannot;
    returns how many rows it had."""
    bad: list = []
    try:
        table = pacsv.read_csv(pa.py_buffer(block), read_options=pacsv.ReadOptions(
            column_names=names, use_threads=False, block_size=len(block) + 1),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=lambda row: bad.append(
                row) or "skip"), convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, include_columns=list(found.values()),
                strings_can_be_null=True, null_values=[""]))  # only an empty field: "NA" is Namibia, "null" a name
    except pa.ArrowInvalid:
        bad.append(None)
    if bad:  # read again row by row: each row that cannot be sent is named, the others sent
        yield from _csv_rows(block, delimiter, names, found, number, lines)
        return _rows_in(block, delimiter)
    table = table.rename_columns([renames[n] for n in table.schema.names])
    for start in range(0, table.num_rows, lines):
        piece = table.slice(start, lines)
        yield _csv_chunk(piece, np.arange(number + 1 + start, number + 1 + start + piece.num_rows, dtype=np.int64))
    return table.num_rows


def _csv_block(f: BinaryIO, size: int) -> tuple[bytes, bool]:
    """About `size` bytes of whole rows: to the end of a line, and on while a quoted field may be
    open (a quote inside an unquoted field, which Arrow takes as it is, only makes it longer);
    and whether a line after them was longer than _MOST_LINE_BYTES (skipped unread, as NDJSON's
    are: a 512 MiB line took 4 GiB to read)."""
    pieces = [f.read(size)]
    if pieces[0] and not pieces[0].endswith(b"\n"):
        pieces.append(f.readline(_MOST_LINE_BYTES))
    odd, length = sum(p.count(b'"') for p in pieces) % 2, sum(map(len, pieces))
    while odd and length <= _MOST_BLOCKS_PER_ROW * size and (more := f.readline(_MOST_LINE_BYTES)):
        pieces.append(more)  # only the new line's quotes counted: a stray quote costs no rescans
        odd, length = (odd + more.count(b'"')) % 2, length + len(more)
    block = b"".join(pieces)
    if len(pieces) == 1 or len(pieces[-1]) < _MOST_LINE_BYTES or pieces[-1].endswith(b"\n"):
        return block, False
    rest = pieces[-1]
    while rest and not rest.endswith(b"\n"):  # the rest of the long line, a piece at a time
        rest = f.readline(_MOST_LINE_BYTES)
    return block[:block.rfind(b"\n") + 1], True


def _csv_records(block: bytes, delimiter: str) -> Iterator[list[str] | str]:
    """A block's rows, or why a row cannot be read (the reader goes on after it). No field is
    longer than its block: the csv module's field limit (131,072 characters by default, for every
    reader in the process) is raised to the block's size, as a field cut there left the reader
    inside a quoted field, taking the rows after it for its lines."""
    if csv.field_size_limit() < len(block):
        csv.field_size_limit(len(block))
    reader = _csv_reader(block, delimiter)
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield f"cannot be read as CSV ({error})"


def _csv_reader(block: bytes, delimiter: str):
    return csv.reader(io.StringIO(block.decode("utf-8", "surrogateescape"), newline=""), delimiter=delimiter)


def _rows_in(block: bytes, delimiter: str) -> int:
    """The rows of a block as `_csv_rows` numbers them (empty lines are no rows, as in Arrow)."""
    return sum(1 for row in _csv_records(block, delimiter) if row)


def _csv_rows(block: bytes, delimiter: str, names: list[str], found: dict[str, str], number: int, lines: int
              ) -> Iterator[Chunk]:
    """A block's rows one by one, numbered from `number` + 1: each row of as many fields as the
    header names in the file's types (bytes that are not UTF-8 refused by field, as
    `typed_event` words it), and why each other row cannot be sent."""
    at = {field: names.index(original) for field, original in found.items()}
    rows, kept, problems = [], [], []
    for row in _csv_records(block, delimiter):
        if not row:
            continue
        number += 1
        if isinstance(row, str):
            problems.append((number, "line", row))
        elif len(row) != len(names):
            problems.append((number, "line", f"has {len(row)} fields where the header names {len(names)}"))
        else:
            event, why = typed_event({field: row[i] for field, i in at.items() if row[i] != ""})
            if why:
                problems.append(Problem(number, *why, event))
            else:
                rows.append(event)
                kept.append(number)
        if len(rows) == lines:
            yield Chunk(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), np.array(kept, dtype=np.int64), problems,
                        number)
            rows, kept, problems = [], [], []
    if rows or problems:
        yield Chunk(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), np.array(kept, dtype=np.int64), problems, number)


def _csv_chunk(strings: pa.Table, numbers: np.ndarray) -> Chunk:
    try:
        columns = {}
        for f in FILE_SCHEMA:
            if f.name not in strings.column_names:
                columns[f.name] = pa.nulls(strings.num_rows, f.type)
            elif f.name == "timestamp":
                columns[f.name] = strings.column(f.name).cast(pa.timestamp("ns")).cast(f.type)
            else:
                columns[f.name] = strings.column(f.name).cast(f.type)
        revenue = columns["revenue"]  # "NaN" and "inf" cast; the row by row reading names them
        if np.count_nonzero(~np.isfinite(revenue.to_numpy(zero_copy_only=False))) == revenue.null_count:
            return Chunk(pa.table(columns, schema=FILE_SCHEMA), numbers, [], int(numbers[-1]) if len(numbers) else 0)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # a value Arrow cannot convert: find which, row by row
    rows, kept, problems = [], [], []
    for n, event in zip(numbers.tolist(), strings.to_pylist()):
        row, why = typed_event({k: v for k, v in event.items() if v is not None})
        if why:
            problems.append(Problem(n, *why, row))
        else:
            rows.append(row)
            kept.append(n)
    return Chunk(pa.Table.from_pylist(rows, schema=FILE_SCHEMA), np.array(kept, dtype=np.int64), problems,
                 int(numbers[-1]) if len(numbers) else 0)


# ---- what one request can carry ----------------------------------------------------------

#: The longest string the server accepts, in UTF-8 bytes: core/events.py's, not imported from
#: there (the core loads pyarrow.compute, which reading a clean file never needs).
MAX_STRING_BYTES = 256
#: The server refuses a whole arrow_ipc batch that decompresses to more than its rows can take
#: as valid events (seven strings of MAX_STRING_BYTES each, and their numbers) and a mebibyte: one
#: line holding a string of 1.5 MB sank its batch, and with it every good line of a small file.
#: A row whose strings take more than this is not sent (the server would reject it anyway); one
#: less long is sent, for the server to reject and quarantine as it does every invalid event.
_MOST_STRING_BYTES_PER_ROW = 7 * MAX_STRING_BYTES
_EVENT_FIELDS = frozenset(FILE_SCHEMA.names)


def sendable(chunk: Chunk) -> Chunk:
    """The chunk without the rows that would have the server refuse its whole request, each of
    them then a line that cannot be sent, naming its longest field and that field's length.
    Each string column's longest value is read from its offsets; rows are looked at one by one
    only when those add up to more than a row may take, which no clean file's do."""
    names = [f.name for f in chunk.table.schema if f.name in _EVENT_FIELDS and _is_text(f.type)]
    if sum(_longest(chunk.table.column(name)) for name in names) <= _MOST_STRING_BYTES_PER_ROW:
        return chunk
    import pyarrow.compute as pc

    table, lengths = chunk.table, []
    for name in names:
        column = table.column(name)
        if pa.types.is_dictionary(column.type):  # plain: its dictionary may hold the values of rows not sent
            column = column.cast(column.type.value_type)
            table = table.set_column(table.schema.get_field_index(name), name, column)
        lengths.append(pc.binary_length(column).fill_null(0).to_numpy())
    lengths = np.stack(lengths)
    over = lengths.sum(axis=0) > _MOST_STRING_BYTES_PER_ROW
    longest = lengths.argmax(axis=0)
    problems = [(int(chunk.lines[i]), names[longest[i]], f"{names[longest[i]]} is {int(lengths[longest[i], i]):,} "
                 f"bytes long; at most {MAX_STRING_BYTES} are accepted") for i in np.flatnonzero(over)]
    return Chunk(table.filter(pa.array(~over)), chunk.lines[~over],
                 sorted([*chunk.problems, *problems], key=lambda p: p[0]), chunk.last)


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _longest(column: pa.ChunkedArray) -> int:
    """The most bytes one value of a string column takes (of a dictionary's values: all of
    them, as all are sent), read from its offsets."""
    most = 0
    for values in column.chunks:
        if pa.types.is_dictionary(values.type):
            values = values.dictionary
        if len(values):
            width = np.dtype(np.int64 if pa.types.is_large_string(values.type) else np.int32)
            offsets = np.frombuffer(values.buffers()[1], width, len(values) + 1, values.offset * width.itemsize)
            most = max(most, int(np.diff(offsets).max()))
    return most


# ---- Parquet and Arrow -------------------------------------------------------------------

def _event_columns(names: list[str], path: str, warn: Callable[[str], None]) -> list[str]:
    """The columns of a columnar file that are event fields, the others said: sent, a wide one
    made every request larger than the server takes, and the whole file was refused."""
    if extra := [n for n in names if n not in _EVENT_FIELDS]:
        warn(f"{path}: ignoring columns that are not event fields: {', '.join(repr(n) for n in extra)}")
    return [n for n in names if n in _EVENT_FIELDS]


def _columnar(batches, path: str) -> Iterator[Chunk]:
    """Columnar files go as they are (the server reads any Arrow types it accepts); rows are
    numbered from 1."""
    number = 0
    for batch in batches:
        table = pa.Table.from_batches([batch])
        numbers = np.arange(number + 1, number + 1 + table.num_rows, dtype=np.int64)
        number += table.num_rows
        yield Chunk(table, numbers, [], number)
