"""One test's events: immutable timestamp-sorted Arrow parts plus a small unsorted tail.

Appends go to the tail (amortized O(batch) copies, no sorting on the ingest path). A full tail
is sorted once into a part; parts of equal size are merged like a binary counter, so a test of
n events has O(log n) parts and each event is copied O(log n) times in its life. A query
binary-searches each part for its time range and scans only the tail.

Readers never lock: every change publishes a new immutable `PartitionView`, and the tail's
arrays are only written past the length a published view can see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from abstream.store import kernels
from abstream.store.schema import STORED_SCHEMA

COLUMNS = STORED_SCHEMA.names
#: Columns held as numpy arrays; the others (session_id) stay Arrow strings no query reads.
NUMERIC = [f.name for f in STORED_SCHEMA if not pa.types.is_string(f.type)]
STRINGS = [f.name for f in STORED_SCHEMA if pa.types.is_string(f.type)]
DTYPES = {name: np.dtype(STORED_SCHEMA.field(name).type.to_pandas_dtype()) for name in NUMERIC}


def take(values: np.ndarray | pa.Array, index: np.ndarray) -> np.ndarray | pa.Array:
    """values[index] for a numpy array or an Arrow array alike."""
    if isinstance(values, np.ndarray):
        return values[index]
    return values.take(pa.array(index, type=pa.int64()))


class Part:
    """An immutable record batch sorted by timestamp, with zero-copy numpy views of its numeric columns."""

    __slots__ = ("batch", "cols", "num_rows")

    def __init__(self, cols: dict[str, np.ndarray | pa.Array]) -> None:
        self.batch = pa.RecordBatch.from_arrays([pa.array(cols[c]) if c in DTYPES else cols[c] for c in COLUMNS],
                                                schema=STORED_SCHEMA)
        self.cols = {c: self.batch.column(c).to_numpy() for c in NUMERIC}
        self.num_rows = self.batch.num_rows

    @classmethod
    def sorted_from(cls, cols: dict[str, np.ndarray | pa.Array]) -> Part:
        order = np.argsort(cols["timestamp"], kind="stable")
        return cls({c: take(cols[c], order) for c in COLUMNS})

    @classmethod
    def merge(cls, parts: list[Part]) -> Part:
        # Stable sort of concatenated sorted runs: timsort finds the runs, so this is ~linear.
        cols: dict[str, np.ndarray | pa.Array] = {c: np.concatenate([p.cols[c] for p in parts]) for c in NUMERIC}
        for c in STRINGS:
            cols[c] = pa.concat_arrays([p.batch.column(c) for p in parts])
        return cls.sorted_from(cols)

    def rows_between(self, start_ns: int, end_ns: int, names: list[str]) -> list[np.ndarray]:
        s = kernels.time_slice(self.cols["timestamp"], start_ns, end_ns)
        return [self.cols[c][s] for c in names]


@dataclass(frozen=True)
class PartitionView:
    """What a reader sees of one test: never changes after it is published."""

    parts: tuple[Part, ...]
    tail: dict[str, np.ndarray]  # views of exactly the visible tail rows
    variants: frozenset[int]
    events: int
    users: int
    first_ns: int
    last_ns: int

    def select(self, start_ns: int, end_ns: int, names: list[str]) -> dict[str, np.ndarray]:
        """The named columns of every event with start_ns <= timestamp <= end_ns."""
        pieces = [p.rows_between(start_ns, end_ns, names) for p in self.parts
                  if p.num_rows and not (p.cols["timestamp"][-1] < start_ns or p.cols["timestamp"][0] > end_ns)]
        ts = self.tail["timestamp"]
        if len(ts):
            mask = (ts >= start_ns) & (ts <= end_ns)
            pieces.append([self.tail[c][mask] for c in names])
        if not pieces:
            return {c: np.zeros(0, dtype=DTYPES[c]) for c in names}
        if len(pieces) == 1:
            return dict(zip(names, pieces[0]))
        return {c: np.concatenate([piece[i] for piece in pieces]) for i, c in enumerate(names)}


class Partition:
    """The writer's side of one test. Callers serialize `append`; `view` is safe to read anytime."""

    def __init__(self, seal_rows: int) -> None:
        self._seal_rows = seal_rows
        self._parts: list[Part] = []
        self._tail = {c: np.empty(1024, dtype=DTYPES[c]) for c in NUMERIC}
        self._tail_strings: dict[str, list[pa.Array]] = {c: [] for c in STRINGS}
        self._tail_len = 0
        self._seen_users = np.zeros(0, dtype=np.uint8)  # bitset over user codes
        self._variants: frozenset[int] = frozenset()
        self._events = 0
        self._users = 0
        self._first_ns = np.iinfo(np.int64).max
        self._last_ns = np.iinfo(np.int64).min
        self.view = self._publish()

    def append(self, cols: dict[str, np.ndarray | pa.Array]) -> None:
        """Add events (every stored column, same length), then publish a new view."""
        n = len(cols["timestamp"])
        if n == 0:
            return
        end = self._tail_len + n
        capacity = len(self._tail["timestamp"])
        if end > capacity:
            # A new array: views already published keep the old one, which is never written again.
            new_capacity = max(end, min(2 * capacity, self._seal_rows))
            self._tail = {c: np.concatenate([a[: self._tail_len], np.empty(new_capacity - self._tail_len, a.dtype)])
                          for c, a in self._tail.items()}
        for c in NUMERIC:
            self._tail[c][self._tail_len:end] = cols[c]
        for c in STRINGS:
            self._tail_strings[c].append(cols[c])
        self._tail_len = end
        self._count(cols)
        if self._tail_len >= self._seal_rows:
            self._seal()
        self.view = self._publish()

    def _count(self, cols: dict[str, np.ndarray]) -> None:
        ts, users = cols["timestamp"], cols["user_id"]
        self._events += len(ts)
        self._first_ns = min(self._first_ns, int(ts.min()))
        self._last_ns = max(self._last_ns, int(ts.max()))
        self._variants = self._variants | frozenset(kernels.distinct_values(cols["variant"]).tolist())
        top = int(users.max()) // 8 + 1
        if top > len(self._seen_users):
            self._seen_users = np.concatenate(
                [self._seen_users, np.zeros(max(top, 2 * len(self._seen_users)) - len(self._seen_users), np.uint8)])
        users = kernels.distinct_values(users)
        byte, bit = users >> 3, (1 << (users & 7)).astype(np.uint8)
        self._users += int(np.count_nonzero((self._seen_users[byte] & bit) == 0))
        np.bitwise_or.at(self._seen_users, byte, bit)

    def _seal(self) -> None:
        cols: dict[str, np.ndarray | pa.Array] = {c: a[: self._tail_len] for c, a in self._tail.items()}
        for c, chunks in self._tail_strings.items():
            cols[c] = pa.concat_arrays(chunks)
        self._parts.append(Part.sorted_from(cols))
        self._tail = {c: np.empty(1024, dtype=a.dtype) for c, a in self._tail.items()}
        self._tail_strings = {c: [] for c in STRINGS}
        self._tail_len = 0
        while len(self._parts) >= 2 and self._parts[-2].num_rows <= self._parts[-1].num_rows:
            self._parts[-2:] = [Part.merge(self._parts[-2:])]

    def _publish(self) -> PartitionView:
        return PartitionView(
            parts=tuple(self._parts),
            tail={c: a[: self._tail_len] for c, a in self._tail.items()},
            variants=self._variants,
            events=self._events,
            users=self._users,
            first_ns=self._first_ns,
            last_ns=self._last_ns,
        )
