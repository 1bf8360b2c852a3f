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
DTYPES = {f.name: np.dtype(f.type.to_pandas_dtype()) for f in STORED_SCHEMA}


class Part:
    """An immutable record batch sorted by timestamp, with zero-copy numpy views of its columns."""

    __slots__ = ("batch", "cols", "num_rows")

    def __init__(self, cols: dict[str, np.ndarray]) -> None:
        self.batch = pa.RecordBatch.from_arrays([pa.array(cols[c]) for c in COLUMNS], schema=STORED_SCHEMA)
        self.cols = {c: self.batch.column(i).to_numpy() for i, c in enumerate(COLUMNS)}
        self.num_rows = self.batch.num_rows

    @classmethod
    def sorted_from(cls, cols: dict[str, np.ndarray]) -> Part:
        order = np.argsort(cols["timestamp"], kind="stable")
        return cls({c: cols[c][order] for c in COLUMNS})

    @classmethod
    def merge(cls, parts: list[Part]) -> Part:
        # Stable sort of concatenated sorted runs: timsort finds the runs, so this is ~linear.
        return cls.sorted_from({c: np.concatenate([p.cols[c] for p in parts]) for c in COLUMNS})

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
        self._tail = {c: np.empty(1024, dtype=DTYPES[c]) for c in COLUMNS}
        self._tail_len = 0
        self._seen_users = np.zeros(0, dtype=np.uint8)  # bitset over user codes
        self._variants: frozenset[int] = frozenset()
        self._events = 0
        self._users = 0
        self._first_ns = np.iinfo(np.int64).max
        self._last_ns = np.iinfo(np.int64).min
        self.view = self._publish()

    def append(self, cols: dict[str, np.ndarray]) -> None:
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
        for c in COLUMNS:
            self._tail[c][self._tail_len:end] = cols[c]
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
        self._variants = self._variants | frozenset(np.unique(cols["variant"]).tolist())
        top = int(users.max()) // 8 + 1
        if top > len(self._seen_users):
            self._seen_users = np.concatenate(
                [self._seen_users, np.zeros(max(top, 2 * len(self._seen_users)) - len(self._seen_users), np.uint8)])
        users = np.unique(users)
        byte, bit = users >> 3, (1 << (users & 7)).astype(np.uint8)
        self._users += int(np.count_nonzero((self._seen_users[byte] & bit) == 0))
        np.bitwise_or.at(self._seen_users, byte, bit)

    def _seal(self) -> None:
        part = Part.sorted_from({c: a[: self._tail_len] for c, a in self._tail.items()})
        self._parts.append(part)
        self._tail = {c: np.empty(1024, dtype=a.dtype) for c, a in self._tail.items()}
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
