"""A pipe's answer in the format its extension names: .json (the platform's shape, ClickHouse's
JSON format), .csv (CSVWithNames), .ndjson (JSONEachRow) or .parquet."""

from __future__ import annotations

import json
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from abstream.clients import files
from abstream.core.errors import InvalidArgument
from abstream.rest.pipes import Answer

CONTENT_TYPES = {"json": "application/json", "csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson",
                 "parquet": "application/vnd.apache.parquet"}
_ARROW = {"String": pa.string(), "UInt64": pa.uint64(), "UInt8": pa.uint8(), "Int64": pa.int64(),
          "Float64": pa.float64(), "DateTime": pa.string(), "Array(String)": pa.list_(pa.string())}


def _base(t: str) -> str:
    """A column's type without Nullable(...): nulls are what every Arrow type and CSV cell can hold."""
    return t[len("Nullable("):-1] if t.startswith("Nullable(") else t


def _dumps(value) -> str:
    """JSON as ClickHouse writes it: a number that is not finite (a sum past the largest double,
    a ratio of infinities) is null, never the Infinity or NaN that JSON parsers refuse."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(files.finite(value), ensure_ascii=False, allow_nan=False)


#: Rows written by one call of the JSON encoder: it holds the GIL throughout, and a million
#: rows at once held every other thread (the event loop among them) for two seconds.
PIECE = 10_000


def json_array(rows: list, dumps: Callable[[Any], str] = json.dumps) -> str:
    """`dumps(rows)`, written PIECE rows per call of the encoder."""
    return "[" + ", ".join(dumps(rows[i:i + PIECE])[1:-1] for i in range(0, len(rows), PIECE)) + "]"


def _json(answer: Answer) -> bytes:
    rows = answer.rows
    rest = _dumps({"rows": len(rows), "rows_before_limit_at_least": len(rows),
                   "statistics": {"elapsed": answer.elapsed_s, "rows_read": answer.rows_read, "bytes_read": 0}})
    meta = _dumps([{"name": n, "type": t} for n, t in answer.columns])
    return f'{{"meta": {meta}, "data": {json_array(rows, _dumps)}, {rest[1:]}'.encode()


def _csv(answer: Answer) -> bytes:
    """Strings and times quoted, numbers bare, a header of quoted names, as ClickHouse writes it."""
    quoted = {n: _base(t) in ("String", "DateTime", "Array(String)") for n, t in answer.columns}

    def cell(name: str, value) -> str:
        if value is None:
            return "\\N"
        if isinstance(value, list):  # an array as ClickHouse writes one: ['a','b'], quoted as a whole
            value = "[" + ",".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in value) + "]"
        if quoted[name]:
            return '"' + str(value).replace('"', '""') + '"'
        return repr(value) if isinstance(value, float) else str(value)

    lines = [",".join('"' + n + '"' for n, _ in answer.columns)]
    lines += [",".join(cell(n, row[n]) for n, _ in answer.columns) for row in answer.rows]
    return ("\n".join(lines) + "\n").encode()


def _ndjson(answer: Answer) -> bytes:
    return "".join(_dumps(row) + "\n" for row in answer.rows).encode()


def _parquet(answer: Answer) -> bytes:
    table = pa.table({n: pa.array([r[n] for r in answer.rows], _ARROW[_base(t)]) for n, t in answer.columns})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


WRITERS = {"json": _json, "csv": _csv, "ndjson": _ndjson, "parquet": _parquet}


def check(fmt: str) -> None:
    if fmt not in WRITERS:
        raise InvalidArgument("format", f"pipes answer as .json, .csv, .ndjson or .parquet, not .{fmt[:16]}")


def render(answer: Answer, fmt: str) -> tuple[bytes, str]:
    check(fmt)
    return WRITERS[fmt](answer), CONTENT_TYPES[fmt]
