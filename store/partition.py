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


class PackedStrings:
    """A string column no query reads, kept LZ4-compressed: lengths (uint16) and bytes.

    Session ids take ~18 bytes per event as Arrow strings and ~6 packed; they are unpacked only
    to merge parts or to hand the events out whole.
    """

    __slots__ = ("length", "_lengths", "_data", "_raw_sizes")
    CODEC = "lz4"

    def __init__(self, values: pa.Array) -> None:
        values = values.cast(pa.string()) if values.type != pa.string() else values
        n = len(values)
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset: values.offset + n + 1]
        lengths = np.diff(offsets).astype(np.uint16)  # strings are at most 256 bytes (schema.py)
        data = values.buffers()[2]
        data = pa.py_buffer(b"") if data is None else data.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        self.length = n
        self._raw_sizes = (lengths.nbytes, data.size)
        self._lengths = pa.compress(lengths, codec=self.CODEC, asbytes=False)
        self._data = pa.compress(data, codec=self.CODEC, asbytes=False)

    @property
    def nbytes(self) -> int:
        return self._lengths.size + self._data.size

    def array(self) -> pa.Array:
        lengths = np.frombuffer(pa.decompress(self._lengths, self._raw_sizes[0], codec=self.CODEC), np.uint16)
        offsets = np.zeros(self.length + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        data = pa.decompress(self._data, self._raw_sizes[1], codec=self.CODEC)
        return pa.StringArray.from_buffers(self.length, pa.py_buffer(offsets), data)


class Part:
    """Immutable events of one test, sorted by timestamp: numpy columns, some of them compacted.

    `revenue`, zero for most events, is kept sparse (positions and values) when that is smaller;
    string columns are packed. `column` and `batch` give them back whole.
    """

    __slots__ = ("cols", "num_rows", "_revenue_at", "_revenue", "_strings")

    def __init__(self, cols: dict[str, np.ndarray | pa.Array]) -> None:
        self.num_rows = len(cols["timestamp"])
        self.cols = {c: np.ascontiguousarray(cols[c]) for c in NUMERIC if c != "revenue"}
        revenue = np.asarray(cols["revenue"])
        nonzero = np.flatnonzero(revenue)
        if len(nonzero) * 12 < revenue.nbytes:
            self._revenue_at, self._revenue = nonzero.astype(np.int32), revenue[nonzero]
        else:
            self._revenue_at, self._revenue = None, np.ascontiguousarray(revenue)
        self._strings = {c: PackedStrings(cols[c]) for c in STRINGS}

    @classmethod
    def sorted_from(cls, cols: dict[str, np.ndarray | pa.Array]) -> Part:
        order = np.argsort(cols["timestamp"], kind="stable")
        return cls({c: take(cols[c], order) for c in COLUMNS})

    @classmethod
    def merge(cls, parts: list[Part]) -> Part:
        # Stable sort of concatenated sorted runs: timsort finds the runs, so this is ~linear.
        cols: dict[str, np.ndarray | pa.Array] = {c: np.concatenate([p.column(c) for p in parts]) for c in NUMERIC}
        for c in STRINGS:
            cols[c] = pa.concat_arrays([p._strings[c].array() for p in parts])
        return cls.sorted_from(cols)

    @property
    def nbytes(self) -> int:
        return (sum(a.nbytes for a in self.cols.values()) + self._revenue.nbytes
                + (0 if self._revenue_at is None else self._revenue_at.nbytes)
                + sum(p.nbytes for p in self._strings.values()))

    def column(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """One numeric column (or rows of it), dense."""
        if name != "revenue":
            return self.cols[name][rows]
        if self._revenue_at is None:
            return self._revenue[rows]
        lo, hi, _ = rows.indices(self.num_rows)
        dense = np.zeros(max(hi - lo, 0), dtype=np.float64)
        a, b = np.searchsorted(self._revenue_at, [lo, hi])
        dense[self._revenue_at[a:b] - lo] = self._revenue[a:b]
        return dense

    def batch(self) -> pa.RecordBatch:
        """The events as one Arrow record batch with STORED_SCHEMA."""
        arrays = [pa.array(self.column(c)) if c in DTYPES else self._strings[c].array() for c in COLUMNS]
        return pa.RecordBatch.from_arrays(arrays, schema=STORED_SCHEMA)

    def rows_between(self, start_ns: int, end_ns: int, names: list[str]) -> list[np.ndarray]:
        s = kernels.time_slice(self.cols["timestamp"], start_ns, end_ns)
        return [self.column(c, s) for c in names]


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
        ts, bits = cols["timestamp"], add_users(self.user_bits, cols["user_id"])
        return PartitionView(
            parts=tuple(parts),
            variants=self.variants | frozenset(kernels.distinct_values(cols["variant"]).tolist()),
            events=self.events + len(ts),
            users=int(np.bitwise_count(bits).sum()),
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


def add_users(bits: np.ndarray, users: np.ndarray) -> np.ndarray:
    """A new bitset (little-endian bits over user codes): `bits` with `users` set."""
    top = int(users.max()) + 1
    size = max(len(bits), (top + 7) // 8)
    out = np.zeros(size, dtype=np.uint8)
    out[: len(bits)] = bits
    if len(users) * 64 > top:  # many users: flag them all, pack once
        flags = np.zeros(size * 8, dtype=bool)
        flags[users] = True
        out |= np.packbits(flags, bitorder="little")
    else:
        users = kernels.distinct_values(users)
        np.bitwise_or.at(out, users >> 3, (1 << (users & 7)).astype(np.uint8))
    return out


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

    def copy(self) -> tuple[np.ndarray, dict[str, np.ndarray | pa.Array]]:
        """(test codes, columns) of every row, leaving the tail as it is."""
        cols: dict[str, np.ndarray | pa.Array] = {c: a[: self.rows].copy() for c, a in self._cols.items()}
        for c, chunks in self._strings.items():
            cols[c] = pa.concat_arrays(chunks) if chunks else pa.array([], STORED_SCHEMA.field(c).type)
        return cols.pop("test"), cols

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
