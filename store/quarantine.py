"""The quarantine: the newest rejected events as they were sent, with why, kept as Arrow chunks.

One chunk per batch with rejections, in arrival order; the oldest rows are dropped past the
limit. Kept columnar because a batch can reject 100,000 events at once: as Python objects that
was ~1 KB per event created under the ingest lock; as Arrow it is the events' own bytes. A string
too long to be accepted is kept cut to its first MAX_STRING_BYTES characters, so that no rejected
event holds more memory than an accepted one could.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from abstream.core.events import EVENT_SCHEMA, MAX_STRING_BYTES, Rejection, cut_to_limit
from abstream.core.types import QuarantinedEvent

SCHEMA = pa.schema([pa.field("received_ns", pa.int64()), pa.field("index", pa.int64()),
                    pa.field("field", pa.string()), pa.field("message", pa.string()), *EVENT_SCHEMA])


def _as_sent(rejected: pa.Table) -> list[pa.Array]:
    """The rejected rows' EVENT_SCHEMA columns as plain arrays, long strings cut."""
    columns = []
    for f in EVENT_SCHEMA:
        col = rejected.column(f.name).combine_chunks() if f.name in rejected.column_names else pa.nulls(
            rejected.num_rows, f.type)
        strings = pa.types.is_dictionary(col.type) and pa.types.is_string(col.type.value_type)
        if col.type != f.type and not strings:
            col = col.cast(f.type)
        values = col.dictionary if strings else col  # a dictionary's values are cut before rows copy them
        if pa.types.is_string(f.type) and len(values) and (pc.max(pc.binary_length(values)).as_py() or 0) \
                > MAX_STRING_BYTES:
            col = cut_to_limit(col)
        columns.append(col.cast(f.type) if col.type != f.type else col)
    return columns


class Quarantine:
    """Bounded, thread-safe: one writer (the ingest lock's holder), any number of readers."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._chunks: deque[pa.Table] = deque()
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def add(self, received_ns: int, rejections: list[Rejection], rejected: pa.Table) -> None:
        """Keeps the rejected rows (`rejected`, in the order of `rejections`) with their reasons."""
        if not all(r.quarantined for r in rejections):
            kept = [i for i, r in enumerate(rejections) if r.quarantined]
            rejected, rejections = rejected.take(pa.array(kept, pa.int64())), [rejections[i] for i in kept]
        if not rejections or self.limit <= 0:
            return
        if len(rejections) > self.limit:  # only the newest can stay
            rejected, rejections = rejected.slice(len(rejections) - self.limit), rejections[-self.limit:]
        n = len(rejections)
        chunk = pa.Table.from_arrays([
            pa.array(np.full(n, received_ns, dtype=np.int64)),
            pa.array([r.index for r in rejections], pa.int64()),
            pa.array([r.field for r in rejections], pa.string()),
            pa.array([r.message for r in rejections], pa.string()),
            *_as_sent(rejected),
        ], schema=SCHEMA)
        self._append(chunk)

    def _append(self, chunk: pa.Table) -> None:
        with self._lock:
            self._chunks.append(chunk)
            self._rows += chunk.num_rows
            while self._rows > self.limit:
                oldest = self._chunks[0]
                extra = self._rows - self.limit
                if oldest.num_rows <= extra:
                    self._chunks.popleft()
                    self._rows -= oldest.num_rows
                else:
                    self._chunks[0] = oldest.slice(extra)
                    self._rows -= extra

    def table(self) -> pa.Table:
        """Every entry, oldest first (SCHEMA)."""
        with self._lock:
            chunks = list(self._chunks)
        return pa.concat_tables(chunks) if chunks else SCHEMA.empty_table()

    def remove(self, column: str, values: list[str], tests: list[str] | None = None) -> int:
        """Drops every entry whose `column` (test_id, user_id) is one of `values` (of `tests`
        only, if given); how many."""
        wanted = pa.array(values, pa.string())
        with self._lock:
            kept, removed = deque(), 0
            for chunk in self._chunks:
                hit = pc.fill_null(pc.is_in(chunk.column(column), value_set=wanted), False)
                if tests is not None:
                    hit = pc.and_(hit, pc.fill_null(pc.is_in(chunk.column("test_id"),
                                                             value_set=pa.array(tests, pa.string())), False))
                n = pc.sum(hit).as_py() or 0
                if n:
                    chunk = chunk.filter(pc.invert(hit))
                    removed += n
                if chunk.num_rows:
                    kept.append(chunk)
            self._chunks, self._rows = kept, self._rows - removed
        return removed

    def restore(self, table: pa.Table) -> None:
        """Puts back what `table` returned (from a snapshot)."""
        if table.num_rows:
            self._append(table.cast(SCHEMA))

    def newest(self, test_id: str = "", limit: int = 100, test_prefix: str = "") -> tuple[list[QuarantinedEvent], int]:
        """Up to `limit` entries, newest first, and how many match in all (of one test when
        `test_id` is given, of tests starting with `test_prefix`)."""
        with self._lock:
            chunks = list(self._chunks)
        picked: list[pa.Table] = []
        total = wanted = 0
        for chunk in reversed(chunks):
            tests = chunk.column("test_id").fill_null("")
            mask = pc.starts_with(tests, test_prefix) if test_prefix else None
            if test_id:
                mask = pc.equal(tests, test_id) if mask is None else pc.and_(mask, pc.equal(tests, test_id))
            matching = chunk if mask is None else chunk.filter(mask)
            total += matching.num_rows
            if wanted < limit and matching.num_rows:
                take = matching.slice(max(matching.num_rows - (limit - wanted), 0))
                picked.append(take)
                wanted += take.num_rows
        entries = []
        for chunk in picked:
            for row in reversed(chunk.to_pylist()):
                entries.append(QuarantinedEvent(row.pop("received_ns"), row.pop("index"), row.pop("field"),
                                                row.pop("message"), row))
        return entries, total
