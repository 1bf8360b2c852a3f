"""The event as users send it, the limits every event is checked against, and the checks.

Incoming batches are Arrow tables with `EVENT_SCHEMA` (plain strings, timestamps in nanoseconds
since the Unix epoch, UTC), whichever transport they came by. Every engine stores what this
module accepts and nothing else; each event is checked in vectorized passes and every rejection
is explained.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from abstream.core.errors import InvalidArgument

EVENT_SCHEMA = pa.schema(
    [
        pa.field("timestamp", pa.int64()),  # ns since epoch, UTC; null when absent
        pa.field("user_id", pa.string()),
        pa.field("test_id", pa.string()),
        pa.field("variant", pa.string()),
        pa.field("event_type", pa.string()),
        pa.field("conversion", pa.int64()),
        pa.field("revenue", pa.float64()),
        pa.field("session_id", pa.string()),
        pa.field("device", pa.string()),
        pa.field("country", pa.string()),
    ]
)

#: Fields an event cannot do without; an empty string counts as missing.
REQUIRED_STRINGS = ("test_id", "variant", "user_id")
#: Fields that may be empty.
OPTIONAL_STRINGS = ("event_type", "session_id", "device", "country")
#: Longest accepted value of any string field, in UTF-8 bytes.
MAX_STRING_BYTES = 256
#: The most one valid event can take in any Arrow layout a sender may use: three 8-byte numbers,
#: seven strings with 8-byte offsets, validity bits. Bounds what a columnar batch may decompress to.
MAX_EVENT_BYTES = 3 * 8 + 7 * (8 + MAX_STRING_BYTES) + 2
#: The most one value of a string column's dictionary can take and be of use (an 8-byte offset
#: and an accepted string): a longer one can only reject the events that refer to it.
MAX_VALUE_BYTES = 8 + MAX_STRING_BYTES

NS_PER_SECOND = 1_000_000_000
#: Earliest accepted event time: 2000-01-01T00:00:00Z.
MIN_TIMESTAMP_NS = 946_684_800 * NS_PER_SECOND
#: How far past the server's clock an event may be (clock skew of producers).
MAX_FUTURE_SKEW_NS = 24 * 3600 * NS_PER_SECOND

#: Distinct values a test may have per field (the embedded engine's 16-bit codes; README).
MAX_DISTINCT = {"variant": 65_535, "event_type": 65_535, "device": 65_535, "country": 65_535,
                "user_id": 2**31 - 1}


class Rejection(NamedTuple):
    """Why one event of a batch was not stored (a tuple: a batch may reject 100,000 events)."""

    index: int
    field: str
    message: str
    #: False for an event its sender may not write (a test outside its token's prefix): said in
    #: the ack, not kept in the quarantine, whose entries each token sees by their test ids.
    quarantined: bool = True


def string_buffers(values: pa.Array) -> tuple[np.ndarray, pa.Buffer | bytes]:
    """(int32 offsets[n+1], data) of a string array, nulls read as ''."""
    if values.type != pa.string():
        values = values.cast(pa.string())
    if values.null_count:
        values = values.fill_null("")
    n = len(values)
    buffers = values.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[values.offset: values.offset + n + 1]
    return offsets, buffers[2] if buffers[2] is not None else b""


#: Fields in the order of the Event message: an event is rejected for the first failing one.
_FIELD_ORDER = [f.name for f in EVENT_SCHEMA]


def format_ns(ns: int) -> str:
    """An instant as RFC 3339 UTC, for messages."""
    seconds, nanos = divmod(ns, NS_PER_SECOND)
    try:
        text = dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{seconds} seconds since the Unix epoch"
    return f"{text}.{nanos:09d}Z".replace(".000000000Z", "Z")


def normalize(batch: pa.Table) -> tuple[pa.Table, list[Rejection]]:
    """The batch with EVENT_SCHEMA's columns and types, except that string columns may stay
    dictionary-encoded (dictionary<int, string>): their dictionaries are encoded once, not
    every row; and a Rejection for each event with a value that cannot be converted (a uint64
    past int64, seconds past what nanoseconds hold), that value taken as absent.

    Absent or null optional columns take their defaults; absent required ones become nulls, which
    `validate` rejects row by row. A column of a type that cannot be converted at all (a list
    where a number goes), or an event field twice, fails the whole batch.
    """
    names = batch.column_names
    if twice := [n for n in EVENT_SCHEMA.names if names.count(n) > 1]:
        raise InvalidArgument(twice[0], "is a column the batch has twice")
    columns, refused = {}, []
    for f in EVENT_SCHEMA:
        if f.name in names:
            col = batch.column(f.name)
        else:
            col = pa.nulls(batch.num_rows, f.type)
        if pa.types.is_dictionary(col.type) and f.type != pa.string():  # timestamps, numbers
            col, unreadable = _by_values(col, f)
            refused += unreadable
        elif col.type != f.type and not is_dictionary_string(col.type):
            col, unreadable = _convert(col, f)
            refused += unreadable
        if col.null_count and f.name in OPTIONAL_STRINGS:
            col = col.fill_null("")
        elif col.null_count and f.name in ("conversion", "revenue"):
            col = col.fill_null(0)
        columns[f.name] = col
    return pa.table(columns), sorted(refused, key=lambda r: r.index)


def is_dictionary_string(t: pa.DataType) -> bool:
    return pa.types.is_dictionary(t) and t.value_type == pa.string()


def _cast(col: pa.ChunkedArray | pa.Array, f: pa.Field) -> pa.ChunkedArray | pa.Array:
    if f.name == "timestamp" and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        try:  # 'YYYY-MM-DD HH:MM:SS' (UTC), as the tutorial sends it
            col = col.cast(pa.timestamp("ns"))
        except pa.ArrowInvalid:  # RFC 3339, with its offset
            col = col.cast(pa.timestamp("ns", tz="UTC"))
    if f.name == "timestamp" and pa.types.is_timestamp(col.type):
        return col.cast(pa.timestamp("ns", tz=col.type.tz)).cast(pa.int64())
    return col.cast(f.type)


#: Why a value could not be converted, in the words of the rule it would have broken.
_UNREADABLE = {
    "timestamp": "timestamp {value} is no instant in nanoseconds since the Unix epoch: send 'YYYY-MM-DD HH:MM:SS' "
                 "(UTC), RFC 3339 or a timestamp column, within the accepted window",
    "conversion": "conversion must be 0 or 1, got {value}",
    "revenue": "revenue must be a finite number, got {value}",
}


def _convert(col: pa.ChunkedArray | pa.Array, f: pa.Field) -> tuple[pa.Array, list[Rejection]]:
    """The column as `f.type`; when some of its values cannot be, those are found by halving the
    column (a few casts per value refused, not one per row), each a Rejection and absent in the
    column (its neighbours kept)."""
    try:
        return _cast(col, f), []
    except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
        raise InvalidArgument(f.name, f"column of type {col.type} cannot be read as {f.type}: {error}") from error
    except pa.ArrowInvalid:
        pass
    pieces: list[tuple[int, pa.Array | pa.ChunkedArray]] = []  # (first row, converted), in any order
    refused: list[Rejection] = []
    halves = [(0, len(col))]
    while halves:
        lo, hi = halves.pop()
        piece = col.slice(lo, hi - lo)  # its own type: far timestamps have no Python datetime
        try:
            pieces.append((lo, _cast(piece, f)))
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError):
            pass
        if hi - lo > 1:
            mid = (lo + hi) // 2
            halves += [(mid, hi), (lo, mid)]
            continue
        pieces.append((lo, pa.nulls(1, f.type)))
        value = (f"{piece.cast(pa.int64())[0].as_py()} ({piece.type.unit})" if pa.types.is_timestamp(piece.type)
                 else str(piece[0].as_py())[:64])
        refused.append(Rejection(lo, f.name, _UNREADABLE.get(f.name, "{name} {value} cannot be read as a string")
                                 .format(name=f.name, value=value)))
    arrays = [a for _, p in sorted(pieces, key=lambda x: x[0])
              for a in (p.chunks if isinstance(p, pa.ChunkedArray) else [p])]
    return pa.concat_arrays([a.cast(f.type) for a in arrays]), refused


def _by_values(col: pa.ChunkedArray | pa.Array, f: pa.Field) -> tuple[pa.ChunkedArray, list[Rejection]]:
    """A dictionary column of a field that is no string (timestamps as text, say), converted value
    by value and then given to its rows: casting it to its values first gave every row its own
    copy (one 20 KB value in 100,000 rows, 2 GB), and each unreadable row was found by halving."""
    arrays, refused, at = [], [], 0
    for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
        values, unreadable = _convert(chunk.dictionary, f)
        arrays.append(values.take(chunk.indices))
        if unreadable:
            why = {r.index: r.message for r in unreadable}
            indices = chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False)
            for row in np.flatnonzero(np.isin(indices, list(why))).tolist():
                refused.append(Rejection(at + row, f.name, why[int(indices[row])]))
        at += len(chunk)
    return pa.chunked_array(arrays, f.type), refused


def cut_to_limit(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A string column (or a dictionary of strings) with each value cut to its first
    MAX_STRING_BYTES, as rejected events are kept: a dictionary's values are cut before its rows
    take their copies of them (one 20 KB value in 5,000 rows is 20 KB, not 100 MB)."""
    if not pa.types.is_dictionary(col.type):
        return pc.utf8_slice_codeunits(col, 0, MAX_STRING_BYTES)
    cut = [pa.DictionaryArray.from_arrays(c.indices, pc.utf8_slice_codeunits(c.dictionary, 0, MAX_STRING_BYTES))
           for c in (col.chunks if isinstance(col, pa.ChunkedArray) else [col])]
    return pa.chunked_array(cut) if isinstance(col, pa.ChunkedArray) else cut[0]


def _bad_string_masks(batch: pa.Table) -> dict[str, np.ndarray]:
    """Per string field, the rows too long; per required one ('<field>:missing'), the rows empty or absent."""
    masks = {}
    for name in REQUIRED_STRINGS + OPTIONAL_STRINGS:
        lengths = _lengths(batch.column(name))
        if name in REQUIRED_STRINGS:
            masks[name + ":missing"] = lengths == 0
        masks[name] = lengths > MAX_STRING_BYTES
    return masks


def _lengths(col: pa.ChunkedArray) -> np.ndarray:
    """Byte length of every string (0 for nulls), read from the offsets; a dictionary-encoded
    column's lengths are its values' lengths, looked up by index."""
    lengths = []
    for chunk in col.chunks:
        if is_dictionary_string(chunk.type) and not chunk.null_count:
            lengths.append(np.diff(string_buffers(chunk.dictionary)[0])[chunk.indices.to_numpy()])
        else:
            lengths.append(np.diff(string_buffers(chunk)[0]))
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int32)


def validate(batch: pa.Table, now_ns: int) -> tuple[np.ndarray, list[Rejection]]:
    """(mask of valid rows, one Rejection per invalid row, by index) for a normalized batch.

    The masks are computed column by column; only rejected rows are visited one by one, to word
    their message.
    """
    n = batch.num_rows
    ts_col = batch.column("timestamp")
    if ts_col.null_count:
        ts_missing = pc.is_null(ts_col).to_numpy(zero_copy_only=False)
        ts = ts_col.fill_null(MIN_TIMESTAMP_NS).to_numpy()
    else:
        ts_missing, ts = np.zeros(n, dtype=bool), ts_col.to_numpy()
    max_ns = now_ns + MAX_FUTURE_SKEW_NS
    conversion = batch.column("conversion").to_numpy()
    revenue = batch.column("revenue").to_numpy()
    strings = _bad_string_masks(batch)

    # (field, mask) pairs in field order; "timestamp" appears twice: absent, then out of window.
    checks: list[tuple[str, np.ndarray]] = []
    for name in _FIELD_ORDER:
        if name == "timestamp":
            checks.append(("timestamp:missing", ts_missing))
            checks.append(("timestamp", (ts < MIN_TIMESTAMP_NS) | (ts > max_ns)))
        elif name == "conversion":
            checks.append((name, (conversion != 0) & (conversion != 1)))
        elif name == "revenue":
            checks.append((name, ~np.isfinite(revenue)))
        else:
            if name + ":missing" in strings:
                checks.append((name + ":missing", strings[name + ":missing"]))
            checks.append((name, strings[name]))

    stacked = np.stack([mask for _, mask in checks]) if n else np.zeros((len(checks), 0), dtype=bool)
    bad = stacked.any(axis=0)
    if not bad.any():
        return ~bad, []

    rows = np.flatnonzero(bad)
    first = np.argmax(stacked[:, rows], axis=0)  # each bad row's first failing check, in field order
    messages: list = [None] * len(rows)
    for k in np.unique(first).tolist():
        key = checks[k][0]
        at = np.flatnonzero(first == k)
        if key.endswith(":missing"):  # one message for every row: no per-row work
            text = _message(key, batch, -1, 0, max_ns)
            for j in at.tolist():
                messages[j] = text
        else:
            for j, i in zip(at.tolist(), rows[at].tolist()):
                messages[j] = _message(key, batch, i, ts[i], max_ns)
    names = [key.split(":")[0] for key, _ in checks]
    rejections = [Rejection(i, names[k], m) for i, k, m in zip(rows.tolist(), first.tolist(), messages)]
    return ~bad, rejections


def _message(key: str, batch: pa.Table, i: int, ts: int, max_ns: int) -> str:
    name = key.split(":")[0]
    if key == "timestamp:missing":
        return "timestamp is required and was absent"
    if key.endswith(":missing"):
        return f"{name} is required and was empty or absent"
    value = batch.column(name)[i].as_py()
    if name == "timestamp":
        return (f"timestamp {format_ns(ts)} is outside the accepted window "
                f"[{format_ns(MIN_TIMESTAMP_NS)}, {format_ns(max_ns)}] (server time + 24h)")
    if name == "conversion":
        return f"conversion must be 0 or 1, got {value}"
    if name == "revenue":
        return f"revenue must be a finite number, got {value}"
    return too_long(name, len(value.encode()))


def check_query_string(field: str, value: str) -> None:
    """Strings a query names (a test, a filter value, a variant) are bounded like events' strings:
    nothing longer can match, and an error never repeats what it refuses."""
    try:
        length = len(value.encode())
    except UnicodeEncodeError:  # an HTTP header's bytes that were not UTF-8, kept as surrogates
        raise InvalidArgument(field, "must be UTF-8 text") from None
    if length > MAX_STRING_BYTES:
        raise InvalidArgument(field, too_long(field, length).split(" ", 1)[1])


def listed(values: list[str], most: int = 10) -> str:
    """Values for an error message, the first `most` of them."""
    shown = ", ".join(map(repr, values[:most]))
    return shown + (f" and {len(values) - most:,} more" if len(values) > most else "")


def too_long(name: str, length: int) -> str:
    """Why a string of `length` bytes was rejected (wherever it was found too long)."""
    return f"{name} is {length:,} bytes long; at most {MAX_STRING_BYTES} are accepted"


def check(batch: pa.Table | pa.RecordBatch, now_ns: int, refuse: Sequence[Rejection] = ()
          ) -> tuple[pa.Table, list[Rejection]]:
    """(the normalized batch, why each rejected event was rejected, by index): every event checked
    against the rules with the server's clock at `now_ns`. Each `refuse` entry rejects its row for
    a reason the caller knows (a string that was not UTF-8, a test the token may not write),
    before the rules; a row's first entry is its reason."""
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    batch, unreadable = normalize(batch)
    refuse = [*refuse, *unreadable]
    _, rejections = validate(batch, now_ns)
    if refuse:
        refused, refusals = np.zeros(batch.num_rows, dtype=bool), []
        for r in refuse:
            if not refused[r.index]:
                refused[r.index] = True
                refusals.append(r)
        rejections = sorted([r for r in rejections if not refused[r.index]] + refusals, key=lambda r: r.index)
    return batch, rejections
