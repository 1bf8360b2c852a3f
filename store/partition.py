"""The physical layout: per test, immutable timestamp-sorted Arrow parts; for all tests, one tail.

Appends go to the tail, shared by every test, in arrival order: one copy per column per batch
whatever the number of tests in it, and no sorting on the ingest path. A full tail is split by
test and each test's rows are sorted once into a part; a test's parts of equal size are merged
like a binary counter, so a test of n events has O(log n) parts and each event is copied
O(log n) times in its life. A query binary-searches each of its test's parts for its time range
and scans only the tail.

Readers never lock: every change publishes a new immutable `StoreView`; arrays a published
view refers to are never written again, except the tail's, and those only past the length the
view can see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from abstream.store import kernels
from abstream.store.schema import STORED_SCHEMA

COLUMNS = STORED_SCHEMA.names
#: Columns held as numpy arrays; the others (session_id) stay Arrow strings no query reads.
NUMERIC = [f.name for f in STORED_SCHEMA if not pa.types.is_string(f.type)]
STRINGS = [f.name for f in STORED_SCHEMA if pa.types.is_string(f.type)]
DTYPES = {name: np.dtype(STORED_SCHEMA.field(name).type.to_pandas_dtype()) for name in NUMERIC}
DTYPES["test"] = np.dtype(np.int32)


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
    """One test's sealed events and their running totals; never changes after it is published."""

    parts: tuple[Part, ...] = ()
    variants: frozenset[int] = frozenset()
    events: int = 0
    users: int = 0
    first_ns: int = np.iinfo(np.int64).max
    last_ns: int = np.iinfo(np.int64).min
    user_bits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))  # bitset of user codes

    def select(self, start_ns: int, end_ns: int, names: list[str]) -> list[list[np.ndarray]]:
        """Pieces (one list of columns per part) of the events with start_ns <= timestamp <= end_ns."""
        return [p.rows_between(start_ns, end_ns, names) for p in self.parts
                if not (p.cols["timestamp"][-1] < start_ns or p.cols["timestamp"][0] > end_ns)]

    def with_rows(self, cols: dict[str, np.ndarray | pa.Array]) -> PartitionView:
        """A new view holding these rows (sorted by timestamp) too, equal-sized parts merged."""
        parts = [*self.parts, Part(cols)]
        while len(parts) >= 2 and parts[-2].num_rows <= parts[-1].num_rows:
            parts[-2:] = [Part.merge(parts[-2:])]
        ts, users = cols["timestamp"], kernels.distinct_values(cols["user_id"])
        bits = self.user_bits
        top = int(users.max()) // 8 + 1
        bits = np.concatenate([bits, np.zeros(max(0, top - len(bits)), np.uint8)])  # always a copy
        new = np.count_nonzero((bits[users >> 3] & (1 << (users & 7)).astype(np.uint8)) == 0)
        np.bitwise_or.at(bits, users >> 3, (1 << (users & 7)).astype(np.uint8))
        return PartitionView(
            parts=tuple(parts),
            variants=self.variants | frozenset(kernels.distinct_values(cols["variant"]).tolist()),
            events=self.events + len(ts),
            users=self.users + int(new),
            first_ns=min(self.first_ns, int(ts.min())),
            last_ns=max(self.last_ns, int(ts.max())),
            user_bits=bits,
        )

    def has_users(self, users: np.ndarray) -> np.ndarray:
        """Which of these user codes already have events in this view's parts."""
        inside = (users >> 3) < len(self.user_bits)
        seen = np.zeros(len(users), dtype=bool)
        u = users[inside]
        seen[inside] = (self.user_bits[u >> 3] & (1 << (u & 7)).astype(np.uint8)) != 0
        return seen


class Tail:
    """The newest events of every test, unsorted, in arrival order. Callers serialize writes."""

    def __init__(self) -> None:
        self._cols = {c: np.empty(4096, dtype=DTYPES[c]) for c in ["test", *NUMERIC]}
        self._strings: dict[str, list[pa.Array]] = {c: [] for c in STRINGS}
        self.rows = 0

    def append(self, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array]) -> None:
        end = self.rows + len(test_codes)
        capacity = len(self._cols["test"])
        if end > capacity:
            # A new array: views already published keep the old one, which is never written again.
            size = max(end, 2 * capacity)
            self._cols = {c: np.concatenate([a[: self.rows], np.empty(size - self.rows, a.dtype)])
                          for c, a in self._cols.items()}
        self._cols["test"][self.rows:end] = test_codes
        for c in NUMERIC:
            self._cols[c][self.rows:end] = cols[c]
        for c in STRINGS:
            self._strings[c].append(cols[c])
        self.rows = end

    def view(self) -> dict[str, np.ndarray]:
        return {c: a[: self.rows] for c, a in self._cols.items()}

    def drain(self) -> tuple[np.ndarray, dict[str, np.ndarray | pa.Array]]:
        """(test codes, columns) of every row, and an empty tail in new arrays."""
        cols: dict[str, np.ndarray | pa.Array] = {c: a[: self.rows] for c, a in self._cols.items()}
        for c, chunks in self._strings.items():
            cols[c] = pa.concat_arrays(chunks) if chunks else pa.array([], STORED_SCHEMA.field(c).type)
        self.__init__()
        return cols.pop("test"), cols


@dataclass(frozen=True)
class StoreView:
    """Everything a query may see: sealed parts per test, and the tail as it was when published."""

    partitions: dict[int, PartitionView]
    tail: dict[str, np.ndarray]

    def select(self, test: int, start_ns: int, end_ns: int, names: list[str]) -> dict[str, np.ndarray]:
        """The named columns of one test's events with start_ns <= timestamp <= end_ns."""
        partition = self.partitions.get(test)
        pieces = partition.select(start_ns, end_ns, names) if partition else []
        ts = self.tail["timestamp"]
        if len(ts):
            mask = (self.tail["test"] == test) & (ts >= start_ns) & (ts <= end_ns)
            if mask.any():
                pieces.append([self.tail[c][mask] for c in names])
        if not pieces:
            return {c: np.zeros(0, dtype=DTYPES[c]) for c in names}
        if len(pieces) == 1:
            return dict(zip(names, pieces[0]))
        return {c: np.concatenate([piece[i] for piece in pieces]) for i, c in enumerate(names)}
