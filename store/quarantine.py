"""The quarantine: the newest rejected events as they were sent, with why, kept as Arrow chunks.

One chunk per batch with rejections (per namespace: `Quarantine`), in arrival order; past the
limit, the oldest rows of the namespaces holding the most are dropped. Kept columnar because a
batch can reject 100,000 events at once: as Python objects that was ~1 KB per event created
under the ingest lock; as Arrow it is the events' own bytes. A string
too long to be accepted is kept cut to its first MAX_STRING_BYTES characters, so that no rejected
event holds more memory than an accepted one could.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from typing import Callable, Iterable

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


def fair_shares(rows: dict[str, int], limit: int, newest: dict[str, int]) -> dict[str, int]:
    """How many rows each namespace keeps of `rows`, `limit` in all: each all it has up to a
    level (max-min fair: those holding the most lose rows first), and the rows the level leaves
    over one each to those above it whose newest rows came last (`newest`: arrival numbers)."""
    remaining, by_size = limit, sorted(rows, key=lambda k: (rows[k], newest[k]))
    for i, namespace in enumerate(by_size):
        above = len(by_size) - i
        level = remaining // above
        if rows[namespace] > level:  # it and all after it are cut to the level, some to one more
            left_over = remaining - level * above
            latest = sorted(by_size[i:], key=newest.get)[above - left_over:]
            return {**rows, **{k: level for k in by_size[i:]}, **{k: level + 1 for k in latest}}
        remaining -= rows[namespace]
    return dict(rows)


#: A horizon nothing was received before.
_NEVER = int(np.iinfo(np.int64).min)


def _received_before(chunk: pa.Table, horizons: dict[str, int], others: int | None) -> np.ndarray:
    """Which rows were received before their test's horizon (`horizons`, else `others`)."""
    received = chunk.column("received_ns").to_numpy()
    default = _NEVER if others is None else others
    if not horizons:
        return received < default
    ids = pc.dictionary_encode(chunk.column("test_id").combine_chunks())
    thresholds = np.array([horizons.get(t, default) for t in ids.dictionary.to_pylist()] + [default], np.int64)
    return received < thresholds[ids.indices.fill_null(len(ids.dictionary)).to_numpy(zero_copy_only=False)]


def _latest(horizons: dict[str, int], others: int | None) -> int:
    """The latest of the horizons: no entry received at or after it is past its test's."""
    return max([*horizons.values(), _NEVER if others is None else others])


class Quarantine:
    """Bounded, thread-safe: one writer (the ingest lock's holder), any number of readers.

    Entries are kept by namespace: the longest of `namespaces` (the test-id prefixes tokens are
    limited to) that an entry's test id starts with, "" for the rest. Past the limit, the
    namespaces holding the most lose their oldest entries first, down to a level at which all
    fit: a token sending bad events without end pushes out its own entries, not another's.
    """

    def __init__(self, limit: int, namespaces: Iterable[str] = ()) -> None:
        self.limit = limit
        self._prefixes = sorted({p for p in namespaces if p}, key=len)  # a longer match is applied later: it wins
        self._lock = threading.Lock()
        # (arrival number, rows, when the oldest of them was received at the latest), oldest first
        self._chunks: dict[str, deque[tuple[int, pa.Table, int]]] = {}
        self._rows_of: dict[str, int] = {}
        self._rows = 0
        self._arrived = 0

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
        self._append(chunk, received_ns)

    def _by_namespace(self, chunk: pa.Table) -> list[tuple[str, pa.Table]]:
        """The chunk cut into runs of rows of one namespace, in order (slices: no copy). A
        snapshot's entries come back in runs as they went, whatever their namespaces."""
        if not self._prefixes:
            return [("", chunk)]
        tests, codes = chunk.column("test_id"), np.zeros(chunk.num_rows, dtype=np.int32)
        for k, prefix in enumerate(self._prefixes, 1):
            codes[pc.starts_with(tests, prefix).fill_null(False).to_numpy(zero_copy_only=False)] = k
        starts = [0, *(np.flatnonzero(np.diff(codes)) + 1).tolist()]
        return [(self._prefixes[codes[lo] - 1] if codes[lo] else "", chunk.slice(lo, hi - lo))
                for lo, hi in zip(starts, [*starts[1:], chunk.num_rows])]

    def _append(self, chunk: pa.Table, received_ns: int | None = None) -> None:
        """Keeps a chunk's rows, each run of them with its arrival number and when its oldest row
        was received (`received_ns`, when every row was received then)."""
        runs = [(namespace, run, received_ns if received_ns is not None else pc.min(run.column("received_ns")).as_py())
                for namespace, run in self._by_namespace(chunk)]
        with self._lock:
            for namespace, run, oldest in runs:
                self._chunks.setdefault(namespace, deque()).append((self._arrived, run, oldest))
                self._arrived += 1
                self._rows_of[namespace] = self._rows_of.get(namespace, 0) + run.num_rows
                self._rows += run.num_rows
            if self._rows > self.limit:
                newest = {namespace: chunks[-1][0] for namespace, chunks in self._chunks.items()}
                for namespace, keep in fair_shares(self._rows_of, self.limit, newest).items():
                    if keep < self._rows_of[namespace]:
                        self._drop_oldest(namespace, self._rows_of[namespace] - keep)

    def _drop_oldest(self, namespace: str, n: int) -> None:
        chunks = self._chunks[namespace]
        self._rows_of[namespace] -= n
        self._rows -= n
        while n:
            arrived, first, received = chunks[0]
            if first.num_rows <= n:
                chunks.popleft()
                n -= first.num_rows
            else:
                chunks[0] = (arrived, first.slice(n), received)  # received no later: a bound still
                n = 0
        if not chunks:
            del self._chunks[namespace], self._rows_of[namespace]

    def _held(self) -> dict[str, list[tuple[int, pa.Table, int]]]:
        """Each namespace's chunks as they are now: copies of the lists only, the writer waits
        for no more."""
        with self._lock:
            return {namespace: list(chunks) for namespace, chunks in self._chunks.items()}

    def _in_order(self) -> list[pa.Table]:
        """Every chunk, oldest first: each namespace's are, and they are merged by arrival."""
        held = list(self._held().values())
        if len(held) <= 1:
            return [t for chunks in held for _, t, _ in chunks]
        return [t for _, t, _ in heapq.merge(*held, key=lambda e: e[0])]

    def table(self) -> pa.Table:
        """Every entry, oldest first (SCHEMA)."""
        chunks = self._in_order()
        return pa.concat_tables(chunks) if chunks else SCHEMA.empty_table()

    def remove(self, column: str, values: list[str], tests: list[str] | None = None) -> int:
        """Drops every entry whose `column` (test_id, user_id) is one of `values` (of `tests`
        only, if given); how many."""
        wanted, of = pa.array(values, pa.string()), None if tests is None else pa.array(tests, pa.string())

        def hit(chunk: pa.Table) -> pa.Array:
            matches = pc.fill_null(pc.is_in(chunk.column(column), value_set=wanted), False)
            if of is None:
                return matches
            return pc.and_(matches, pc.fill_null(pc.is_in(chunk.column("test_id"), value_set=of), False))

        return self._drop_where(hit)

    def received_before(self, horizons: dict[str, int], others: int | None) -> tuple[int, set[str | None]]:
        """How many entries were received before their test's horizon (ns since the epoch):
        `horizons[test id]`, else `others` (None: never); and the test ids of every entry that
        may be (of chunks whose oldest row came before the latest horizon: the others are
        skipped, a comparison each)."""
        latest = _latest(horizons, others)
        due, tests = 0, set()
        for _, chunk, oldest in (entry for chunks in self._held().values() for entry in chunks):
            if oldest < latest:
                due += int(np.count_nonzero(_received_before(chunk, horizons, others)))
                tests.update(chunk.column("test_id").unique().to_pylist())
        return due, tests

    def remove_received_before(self, horizons: dict[str, int], others: int | None) -> int:
        """Drops the entries `received_before` counts (past their test's retention); how many."""
        latest = _latest(horizons, others)
        return self._drop_where(lambda chunk: pa.array(_received_before(chunk, horizons, others)),
                                lambda oldest: oldest < latest)

    def _drop_where(self, hit: Callable[[pa.Table], pa.Array],
                    may_hit: Callable[[int], bool] = lambda oldest: True) -> int:
        """Drops the rows `hit` selects (a boolean array per chunk; only in the chunks whose oldest
        row's time `may_hit`); how many. By the one writer: the lists are rebuilt outside the
        lock, which readers take only to copy them."""
        rebuilt, removed_of = {}, {}
        for namespace, chunks in self._held().items():
            kept, removed = deque(), 0
            for arrived, chunk, oldest in chunks:
                if may_hit(oldest):
                    selected = hit(chunk)
                    if n := pc.sum(selected).as_py() or 0:
                        chunk, removed = chunk.filter(pc.invert(selected)), removed + n
                if chunk.num_rows:
                    kept.append((arrived, chunk, oldest))  # received no later: a bound still
            if removed:
                rebuilt[namespace], removed_of[namespace] = kept, removed
        with self._lock:
            for namespace, kept in rebuilt.items():
                self._rows_of[namespace] -= removed_of[namespace]
                if kept:
                    self._chunks[namespace] = kept
                else:
                    del self._chunks[namespace], self._rows_of[namespace]
            self._rows -= sum(removed_of.values())
        return sum(removed_of.values())

    def restore(self, table: pa.Table) -> None:
        """Puts back what `table` returned (from a snapshot)."""
        if table.num_rows:
            self._append(table.cast(SCHEMA))

    def newest(self, test_id: str = "", limit: int = 100, test_prefix: str = "") -> tuple[list[QuarantinedEvent], int]:
        """Up to `limit` entries, newest first, and how many match in all (of one test when
        `test_id` is given, of tests starting with `test_prefix`)."""
        chunks = self._in_order()
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
