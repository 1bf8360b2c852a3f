"""The physical layout: per test, immutable timestamp-sorted Arrow parts; for all tests, one tail.

Appends go to the tail, shared by every test, in arrival order: one copy per column per batch
whatever the number of tests in it, and no sorting on the ingest path. A full tail is split by
test and each test's rows are sorted once into a part; a test's parts of the same size class are
merged four at a time, so a test of n events has O(log n) parts and each event is copied
O(log4 n) times in its life. A query binary-searches each of its test's parts for its time
range and scans only the tail.

Readers never lock: every change publishes a new immutable `StoreView`; arrays a published
view refers to are never written again, except the tail's, and those only past the length the
view can see (its string chunks are a list only appended to, of which a view sees a prefix).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
from abstream.core.events import NS_PER_SECOND
from abstream.store import kernels
from abstream.store.rollup import COLUMNS as ROLLUP_COLUMNS
from abstream.store.rollup import Rollup, RollupWanted
from abstream.store.schema import STORED_SCHEMA

COLUMNS = STORED_SCHEMA.names
#: Columns held as numpy arrays; the others (session_id) stay Arrow strings, read only by the
#: session metrics.
NUMERIC = [f.name for f in STORED_SCHEMA if not pa.types.is_string(f.type)]
STRINGS = [f.name for f in STORED_SCHEMA if pa.types.is_string(f.type)]
#: Numeric columns holding dictionary codes or flags, kept in the narrowest type that fits.
CODE_COLUMNS = [c for c in NUMERIC if c not in ("timestamp", "revenue")]
#: Code columns of a few values each in the usual test (conversion 1 bit, variant 1-2, device 2,
#: event type 3), as many of which as fit side by side share one byte per event in a part.
SMALL_CODES = ["conversion", "variant", "device", "event_type", "country"]
WIDE_CODES = [c for c in CODE_COLUMNS if c not in SMALL_CODES]
_PACKED = "packed"  # the key of that byte among a part's columns
DTYPES = {name: np.dtype(STORED_SCHEMA.field(name).type.to_pandas_dtype()) for name in NUMERIC}
DTYPES["test"] = np.dtype(np.int32)


def take(values: np.ndarray | pa.Array, index: np.ndarray) -> np.ndarray | pa.Array:
    """values[index] for a numpy array or an Arrow array alike."""
    if isinstance(values, np.ndarray):
        return values[index]
    return values.take(pa.array(index, type=pa.int64()))


class _Chunk(NamedTuple):
    """Rows of a packed string column: compressed lengths (uint16) and bytes, and their raw sizes."""

    rows: int
    lengths_size: int
    data_size: int
    lengths: bytes
    data: bytes


class PackedStrings:
    """A string column only the session metrics read, kept compressed in chunks: lengths
    (uint16) and bytes.

    Session ids take ~18 bytes per event as Arrow strings, ~7 packed with LZ4 and ~4 with zstd
    (level 1), whose entropy coding suits ids drawn from a small alphabet (at 10M events: 3.4
    bytes per event less than LZ4; sealing compresses at ~40 ns per event against ~20 and
    unpacking takes ~10 ns per event either way). They are unpacked only to hand the events out
    whole, to count sessions, or to merge parts that overlap in time. Parts merged end to end keep
    their chunks as they are, joined into one while chunks are small: zstd reads frames one after
    the other as one stream, so joining is concatenating the compressed bytes (compressing the
    joined rows again, as sealing once did, cost ~6% of the sealer's CPU for 0.2% fewer bytes).
    """

    __slots__ = ("length", "_chunks")
    CODEC = "zstd"
    #: Chunks merged end to end are joined into one while they average fewer raw bytes.
    JOIN_BELOW = 64 << 10

    def __init__(self, values: pa.Array) -> None:
        values = values.cast(pa.string()) if values.type != pa.string() else values
        n = len(values)
        offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset: values.offset + n + 1]
        lengths = np.diff(offsets).astype(np.uint16)  # strings are at most 256 bytes (schema.py)
        data = values.buffers()[2]
        data = pa.py_buffer(b"") if data is None else data.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        self.length = n
        # As bytes: an Arrow buffer from pa.compress keeps the codec's worst-case size allocated.
        self._chunks = (_Chunk(n, lengths.nbytes, data.size, pa.compress(lengths, codec=self.CODEC, asbytes=True),
                               pa.compress(data, codec=self.CODEC, asbytes=True)),)

    @classmethod
    def concat(cls, packs: list[PackedStrings]) -> PackedStrings:
        chunks = tuple(c for p in packs for c in p._chunks)
        if sum(c.lengths_size + c.data_size for c in chunks) < cls.JOIN_BELOW * len(chunks):
            chunks = (_Chunk(sum(c.rows for c in chunks), sum(c.lengths_size for c in chunks),
                             sum(c.data_size for c in chunks), b"".join(c.lengths for c in chunks),
                             b"".join(c.data for c in chunks)),)
        out = cls.__new__(cls)
        out.length, out._chunks = sum(p.length for p in packs), chunks
        return out

    @property
    def nbytes(self) -> int:
        return sum(len(c.lengths) + len(c.data) for c in self._chunks)

    def array(self) -> pa.Array:
        arrays = [self._unpack(c) for c in self._chunks]
        return arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)

    def slice(self, lo: int, hi: int) -> pa.Array:
        """Rows lo..hi-1, unpacking only the chunks that hold them."""
        arrays, at = [], 0
        for c in self._chunks:
            if at < hi and at + c.rows > lo:
                arrays.append(self._unpack(c).slice(max(lo - at, 0), min(hi, at + c.rows) - max(lo, at)))
            at += c.rows
        if not arrays:
            return pa.array([], pa.string())
        return arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)

    @classmethod
    def _unpack(cls, c: _Chunk) -> pa.Array:
        offsets = np.zeros(c.rows + 1, dtype=np.int32)
        np.cumsum(np.frombuffer(pa.decompress(c.lengths, c.lengths_size, codec=cls.CODEC), np.uint16),
                  out=offsets[1:])
        return pa.StringArray.from_buffers(c.rows, pa.py_buffer(offsets),
                                           pa.decompress(c.data, c.data_size, codec=cls.CODEC))


class Part:
    """Immutable events of one test, sorted by timestamp: numpy columns, most of them compacted.

    Compaction is chosen per part from its values and undone by `column`, so queries always see
    the stored schema's types: timestamps in whole seconds become offsets from the part's first
    event (`_compact_seconds`: 16 bits, and where each 65,536-second block begins), small codes
    share a byte (`_packed_codes`) and other codes that fit become uint8, `revenue` (zero for
    most events) is kept sparse (positions and values) when that is smaller, and string columns
    are packed.
    """

    __slots__ = ("num_rows", "first_ns", "last_ns", "_cols", "_layout", "_ts_base", "_ts_edges",
                 "_revenue_at", "_revenue", "_strings")

    def __init__(self, cols: dict[str, np.ndarray | pa.Array]) -> None:
        ts = np.asarray(cols["timestamp"])
        self.num_rows = len(ts)
        self.first_ns, self.last_ns = int(ts[0]), int(ts[-1])
        self._cols = {c: _narrowest(np.asarray(cols[c])) for c in WIDE_CODES}
        packed, self._layout = _packed_codes({c: np.asarray(cols[c]) for c in SMALL_CODES})
        self._cols.update(packed)
        if self.last_ns - self.first_ns < _MAX_OFFSET_NS and not (ts % NS_PER_SECOND).any():
            self._ts_base = self.first_ns
            self._cols["timestamp"], self._ts_edges = _compact_seconds((ts - self.first_ns) // NS_PER_SECOND)
        else:
            self._ts_base, self._ts_edges, self._cols["timestamp"] = None, None, _owned(ts)
        self._revenue_at, self._revenue = _revenue_columns(np.asarray(cols["revenue"]))
        self._strings = {c: PackedStrings(cols[c]) for c in STRINGS}

    @classmethod
    def sorted_from(cls, cols: dict[str, np.ndarray | pa.Array]) -> Part:
        order = np.argsort(cols["timestamp"], kind="stable")
        return cls({c: take(cols[c], order) for c in COLUMNS})

    @classmethod
    def merge(cls, parts: list[Part]) -> Part:
        if all(a.last_ns <= b.first_ns for a, b in zip(parts, parts[1:])):
            return cls._end_to_end(parts)
        # Stable sort of concatenated sorted runs: timsort finds the runs, so this is ~linear.
        cols: dict[str, np.ndarray | pa.Array] = {c: np.concatenate([p.column(c) for p in parts]) for c in NUMERIC}
        for c in STRINGS:
            cols[c] = pa.concat_arrays([p._strings[c].array() for p in parts])
        return cls.sorted_from(cols)

    @classmethod
    def _end_to_end(cls, parts: list[Part]) -> Part:
        """Parts in time order, one after the other (as a live stream seals them): the merged part
        is their concatenation, with no sort, no widening of compacted columns and no unpacking
        of strings. Equal to sorting them, whose stable order on ties is this one."""
        part = cls.__new__(cls)
        part.num_rows = sum(p.num_rows for p in parts)
        part.first_ns, part.last_ns = parts[0].first_ns, parts[-1].last_ns
        part._cols = {c: _concatenated(parts, c) for c in WIDE_CODES}
        part._layout = parts[0]._layout
        if all(p._layout == part._layout for p in parts):
            part._cols.update((c, _concatenated(parts, c)) for c in parts[0]._cols if c not in part._cols
                              and c != "timestamp")
        else:  # packed differently (a part lacked the widest values of a column): packed anew
            dense = {c: np.concatenate([p.column(c) for p in parts]) for c in SMALL_CODES}
            packed, part._layout = _packed_codes(dense)
            part._cols.update(packed)
        if all(p._ts_base is not None for p in parts) and part.last_ns - part.first_ns < _MAX_OFFSET_NS:
            part._ts_base = part.first_ns
            part._cols["timestamp"], part._ts_edges = _compact_seconds(np.concatenate(
                [p._seconds(slice(None)) + (p._ts_base - part.first_ns) // NS_PER_SECOND for p in parts]))
        else:
            part._ts_base, part._ts_edges = None, None
            part._cols["timestamp"] = np.concatenate([p.column("timestamp") for p in parts])
        if all(p._revenue_at is not None for p in parts):
            starts = np.cumsum([0] + [p.num_rows for p in parts[:-1]]).tolist()
            part._revenue_at = np.concatenate([p._revenue_at + np.int32(lo) for p, lo in zip(parts, starts)])
            part._revenue = np.concatenate([p._revenue for p in parts])
        else:
            part._revenue_at, part._revenue = _revenue_columns(np.concatenate([p.column("revenue") for p in parts]))
        part._strings = {c: PackedStrings.concat([p._strings[c] for p in parts]) for c in STRINGS}
        return part

    @property
    def nbytes(self) -> int:
        return (sum(a.nbytes for a in self._cols.values()) + self._revenue.nbytes
                + (0 if self._ts_edges is None else self._ts_edges.nbytes)
                + (0 if self._revenue_at is None else self._revenue_at.nbytes)
                + sum(p.nbytes for p in self._strings.values()))

    def column(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """One numeric column (or rows of it), dense, with its stored type."""
        if name == "revenue":
            if self._revenue_at is None:
                return self._revenue[rows]
            lo, hi, _ = rows.indices(self.num_rows)
            dense = np.zeros(max(hi - lo, 0), dtype=np.float64)
            a, b = np.searchsorted(self._revenue_at, [lo, hi])
            dense[self._revenue_at[a:b] - lo] = self._revenue[a:b]
            return dense
        if name in self._layout:
            shift, width = self._layout[name]
            packed = self._cols[_PACKED][rows]
            if width == 0:
                return np.zeros(len(packed), DTYPES[name])
            return ((packed >> np.uint8(shift)) & np.uint8((1 << width) - 1)).astype(DTYPES[name], copy=False)
        if name == "timestamp" and self._ts_base is not None:
            ns = self._seconds(rows)
            ns *= NS_PER_SECOND
            ns += self._ts_base
            return ns
        values = self._cols[name][rows]
        return values if values.dtype == DTYPES[name] else values.astype(DTYPES[name])

    def batch(self) -> pa.RecordBatch:
        """The events as one Arrow record batch with STORED_SCHEMA."""
        arrays = [pa.array(self.column(c)) if c in DTYPES else self._strings[c].array() for c in COLUMNS]
        return pa.RecordBatch.from_arrays(arrays, schema=STORED_SCHEMA)

    def strings(self, name: str, rows: slice) -> pa.Array:
        """One string column's rows (unpacked)."""
        lo, hi, _ = rows.indices(self.num_rows)
        return self._strings[name].slice(lo, hi)

    def rows_between(self, start_ns: int, end_ns: int, names: list[str]) -> list[np.ndarray | pa.Array]:
        rows = self._time_slice(start_ns, end_ns)
        return [self.strings(c, rows) if c in self._strings else self.column(c, rows) for c in names]

    def time_slice(self, start_ns: int, end_ns: int) -> slice:
        return self._time_slice(start_ns, end_ns)

    def _time_slice(self, start_ns: int, end_ns: int) -> slice:
        if self._ts_base is None:
            return kernels.time_slice(self._cols["timestamp"], start_ns, end_ns)
        # Whole-second offsets: the first second >= start, the last second <= end.
        lo, hi = -((self._ts_base - start_ns) // NS_PER_SECOND), (end_ns - self._ts_base) // NS_PER_SECOND
        last = (self.last_ns - self._ts_base) // NS_PER_SECOND
        if hi < max(lo, 0) or lo > last:
            return slice(0, 0)
        if self._ts_edges is None:
            return kernels.time_slice(self._cols["timestamp"], max(lo, 0), min(hi, last))
        first, end = self._rank(max(lo, 0), "left"), self._rank(min(hi, last), "right")
        return slice(first, max(first, end))

    def _seconds(self, rows: slice) -> np.ndarray:
        """Rows of the whole-second offsets from `_ts_base`, as int64."""
        seconds = self._cols["timestamp"][rows].astype(np.int64)
        edges = self._ts_edges
        if edges is None or len(edges) == 2:
            return seconds
        # Each block's rows get its high bits in place (a repeated array of them took twice as long).
        lo, hi, _ = rows.indices(self.num_rows)
        for block in range(max(int(np.searchsorted(edges, lo, "right")) - 1, 1), len(edges) - 1):
            first, end = max(int(edges[block]), lo), min(int(edges[block + 1]), hi)
            if first >= hi:
                break
            if end > first:
                seconds[first - lo: end - lo] += block << 16
        return seconds

    def _rank(self, second: int, side: str) -> int:
        """The rows before (side "left") or up to (side "right") an offset within the part's span,
        searched for in its 65,536-second block."""
        stored = self._cols["timestamp"]
        a, b = int(self._ts_edges[second >> 16]), int(self._ts_edges[(second >> 16) + 1])
        return a + int(np.searchsorted(stored[a:b], second & 0xFFFF, side))


#: Timestamps of a part are stored as uint32 seconds when they span less than this.
_MAX_OFFSET_NS = (1 << 32) * NS_PER_SECOND


def _compact_seconds(seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted whole-second offsets (int64) as a part keeps them: their low 16 bits, and the first
    row of each 65,536-second block (then the number of rows), unless the blocks would take more
    room than they save (then 32 bits each, and None). 2 bytes per event instead of 4, for an
    add per block when they are read and a search in one block to find a time range."""
    blocks = (int(seconds[-1]) >> 16) + 1
    if blocks * 8 >= len(seconds) * 2:
        return seconds.astype(np.uint32), None
    edges = np.searchsorted(seconds, np.arange(blocks + 1, dtype=np.int64) << 16).astype(np.int64)
    return (seconds & 0xFFFF).astype(np.uint16), edges


def _revenue_columns(revenue: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(positions, values) of the nonzero revenues when that is smaller, else (None, dense)."""
    nonzero = np.flatnonzero(revenue)
    if len(nonzero) * 12 < revenue.nbytes:
        return nonzero.astype(np.int32), revenue[nonzero]
    return None, _owned(revenue)


def _packed_codes(codes: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """Small code columns as a part keeps them, and the layout of their shared byte ({column:
    (shift, width in bits)}): the narrowest columns, as many as fit in 8 bits together, share one
    byte per event when that is two or more columns (a column of zeros takes no bits); the others
    are kept narrowed. At 10M events of the benchmark's data, four columns share a byte: 2 bytes
    per event for the five instead of 5, each read of one of them costing a shift and a mask."""
    widths = sorted((int(a.max()).bit_length() if len(a) else 0, c) for c, a in codes.items())
    layout, bits = {}, 0
    for width, c in widths:
        if bits + width > 8:
            break
        layout[c], bits = (bits, width), bits + width
    if len(layout) < 2:
        layout = {}
    kept = {c: _narrowest(a) for c, a in codes.items() if c not in layout}
    if layout:
        packed = np.zeros(len(next(iter(codes.values()))), dtype=np.uint8)
        for c, (shift, width) in layout.items():
            if width:
                packed |= codes[c].astype(np.uint8) << np.uint8(shift)
        kept[_PACKED] = packed
    return kept, layout


def _concatenated(parts: list[Part], name: str) -> np.ndarray:
    """One stored column of parts merged end to end, kept as stored when all have one type."""
    same = len({p._cols[name].dtype for p in parts}) == 1
    return _narrowest(np.concatenate([p._cols[name] if same else p.column(name) for p in parts]))


def _narrowed(codes: np.ndarray) -> np.ndarray:
    """Codes as uint8 when they all fit (most dimensions have a handful of values)."""
    if codes.dtype.itemsize > 1 and len(codes) and int(codes.max()) < 256 and int(codes.min()) >= 0:
        return codes.astype(np.uint8)
    return codes


def _narrowest(codes: np.ndarray) -> np.ndarray:
    return _owned(_narrowed(codes))


def _owned(values: np.ndarray) -> np.ndarray:
    """`values` in an array of its own: a part sealed from a slice of the tail's sorted columns
    must not keep the whole sorted tail alive (that was 5 bytes per event at 10M events)."""
    return values if values.base is None and values.flags.c_contiguous else values.copy()


def split_by_test(test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array], wide_keys: bool = False
                  ) -> Iterator[tuple[int, dict[str, np.ndarray | pa.Array]]]:
    """(test code, its rows sorted by timestamp, in arrays of their own) for each test of a tail."""
    # One permutation for every column: by time (a near-sorted stream makes this timsort
    # cheap), then stably by test (16-bit keys, the usual case, take numpy's radix sort).
    by_time = np.argsort(cols["timestamp"], kind="stable")
    keys = test_codes[by_time]
    order = by_time[np.argsort(keys if wide_keys else keys.astype(np.uint16), kind="stable")]
    test_codes = test_codes[order]
    bounds = (np.flatnonzero(np.diff(test_codes)) + 1).tolist()
    # Codes narrowed once for the whole tail, not per test; each test's numbers gathered into
    # arrays of their own. Strings are gathered once: a part packs (copies) its slice.
    numbers = {c: _narrowed(cols[c]) if c in CODE_COLUMNS else cols[c] for c in NUMERIC}
    strings = {c: take(cols[c], order) for c in STRINGS}
    for lo, hi in zip([0, *bounds], [*bounds, len(test_codes)]):
        rows = order[lo:hi]
        yield int(test_codes[lo]), {**{c: a[rows] for c, a in numbers.items()},
                                    **{c: a.slice(lo, hi - lo) for c, a in strings.items()}}


#: A test's parts are merged like the digits of a base-4 counter: when the newest 4 parts are of
#: the same size class, they become one. Each event is rewritten log4(n / first part size) times,
#: and a test has at most 3 parts per size class (against log2 and 1 with pairs: half the
#: rewriting for a few more parts to search).
MERGE_FAN_IN = 4


def _level(part: Part) -> int:
    """The size class of a part: floor(log4(rows))."""
    return (max(part.num_rows, 1).bit_length() - 1) // 2


def _merge_newest(parts: list[Part]) -> None:
    """Merges a run's newest MERGE_FAN_IN parts while they are of one size class."""
    while len(parts) >= MERGE_FAN_IN and len({_level(p) for p in parts[-MERGE_FAN_IN:]}) == 1:
        parts[-MERGE_FAN_IN:] = [Part.merge(parts[-MERGE_FAN_IN:])]


def _head(values: np.ndarray | pa.Array, n: int) -> np.ndarray | pa.Array:
    return values[:n] if isinstance(values, np.ndarray) else values.slice(0, n)


def _tail(values: np.ndarray | pa.Array, n: int) -> np.ndarray | pa.Array:
    return values[n:] if isinstance(values, np.ndarray) else values.slice(n)


@dataclass(frozen=True)
class PartitionView:
    """One test's sealed events and their running totals; never changes after it is published."""

    parts: tuple[Part, ...] = ()
    late: int = 0  # the last `late` parts are the late run (`with_rows`)
    variants: frozenset[int] = frozenset()
    events: int = 0
    users: int = 0
    first_ns: int = np.iinfo(np.int64).max
    last_ns: int = np.iinfo(np.int64).min
    user_bits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))  # bitset of user codes
    rollup: Rollup | None = None  # per-(variant, user) totals, kept for tests whose whole answers are asked for

    def select(self, start_ns: int, end_ns: int, names: list[str]) -> list[list[np.ndarray]]:
        """Pieces (one list of columns per part) of the events with start_ns <= timestamp <= end_ns."""
        return [p.rows_between(start_ns, end_ns, names) for p in self.parts
                if not (p.last_ns < start_ns or p.first_ns > end_ns)]

    def with_rows(self, cols: dict[str, np.ndarray | pa.Array], rollup: RollupWanted | None = None
                  ) -> PartitionView:
        """A new view holding these rows (sorted by timestamp) too, equal-sized parts merged; its
        rollup kept up, or folded from every part once it holds the events `rollup` asks for
        (None: no rollup is wanted).

        Parts form two runs. The main one follows time: each part begins where the one before it
        ends, so merging them is a concatenation. Rows older than the main run's last event
        (late ones: a stream that lags the others, a backfill) go to the late run, whose parts
        merge among themselves, sorted where they overlap. Merging overlapping parts unpacks,
        sorts and packs every row of them again: with one run, the few late rows of each seal
        made every merge of four streams' parts do so (~0.57 µs per event)."""
        folded = self.rollup
        if folded is not None:
            folded = folded.merged(cols)
        elif rollup is not None and self.events + len(cols["timestamp"]) >= rollup.events:
            folded = self._folded([{c: cols[c] for c in ROLLUP_COLUMNS}], rollup.holds)
        ts = cols["timestamp"]
        main, late = list(self.parts[:len(self.parts) - self.late]), list(self.parts[len(self.parts) - self.late:])
        cut = int(np.searchsorted(ts, main[-1].last_ns)) if main else 0  # rows before it are late
        if cut:
            late.append(Part(cols if cut == len(ts) else {c: _head(a, cut) for c, a in cols.items()}))
            _merge_newest(late)
        if cut < len(ts):
            main.append(Part(cols if not cut else {c: _tail(a, cut) for c, a in cols.items()}))
            _merge_newest(main)
        bits, added = kernels.add_users(self.user_bits, cols["user_id"])
        return PartitionView(
            parts=(*main, *late),
            late=len(late),
            variants=self.variants | frozenset(kernels.distinct_values(cols["variant"]).tolist()),
            events=self.events + len(ts),
            users=self.users + added,
            first_ns=min(self.first_ns, int(ts.min())),
            last_ns=max(self.last_ns, int(ts.max())),
            user_bits=bits,
            rollup=folded,
        )

    def folded(self, holds: frozenset[str]) -> Rollup:
        """A rollup of this view's parts, folded in one at a time (no copy of them all at once)."""
        return self._folded([], holds)

    def _folded(self, more: list[dict[str, np.ndarray]], holds: frozenset[str]) -> Rollup:
        rollup = Rollup(holds=holds)
        for piece in itertools.chain(({c: p.column(c) for c in ROLLUP_COLUMNS} for p in self.parts), more):
            rollup = rollup.merged(piece)  # one part's columns at a time
        return rollup

    def has_users(self, users: np.ndarray) -> np.ndarray:
        """Which of these user codes already have events in this view's parts."""
        return kernels.has_users(self.user_bits, users)


class Tail:
    """The newest events of every test, unsorted, in arrival order. Callers serialize writes."""

    def __init__(self, capacity: int = 4096) -> None:
        # Room for a whole tail up front (pages are only touched as rows arrive): growing by
        # doubling from small copied every row about twice more.
        self._capacity = capacity
        self._cols = {c: np.empty(capacity, dtype=DTYPES[c]) for c in ["test", *NUMERIC]}
        self._strings: dict[str, list[pa.Array]] = {c: [] for c in STRINGS}
        self.rows = 0

    def append(self, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array]) -> None:
        end = self.rows + len(test_codes)
        capacity = self.room
        if end > capacity:
            # A new array: views already published keep the old one, which is never written again.
            size = max(end, 2 * capacity)
            grown = {c: np.empty(size, a.dtype) for c, a in self._cols.items()}
            for c, a in self._cols.items():
                grown[c][: self.rows] = a[: self.rows]  # only the rows: the rest stays untouched
            self._cols = grown
        self._cols["test"][self.rows:end] = test_codes
        for c in NUMERIC:
            self._cols[c][self.rows:end] = cols[c]
        for c in STRINGS:
            self._strings[c].append(cols[c])
        self.rows = end

    @property
    def room(self) -> int:
        """The rows the tail's arrays hold before they are grown."""
        return len(self._cols["test"])

    def copy(self) -> tuple[np.ndarray, dict[str, np.ndarray | pa.Array]]:
        """(test codes, columns) of every row, leaving the tail as it is."""
        cols: dict[str, np.ndarray | pa.Array] = {c: a[: self.rows].copy() for c, a in self._cols.items()}
        for c, chunks in self._strings.items():
            cols[c] = pa.concat_arrays(chunks) if chunks else pa.array([], STORED_SCHEMA.field(c).type)
        return cols.pop("test"), cols

    def view(self) -> dict[str, np.ndarray | TailStrings]:
        return {**{c: a[: self.rows] for c, a in self._cols.items()},
                **{c: TailStrings(chunks, len(chunks)) for c, chunks in self._strings.items()}}

    def clear(self) -> None:
        """An empty tail, in new arrays (views published keep the old ones)."""
        self.__init__(self._capacity)

    def drain(self) -> tuple[np.ndarray, dict[str, np.ndarray | pa.Array]]:
        """(test codes, columns) of every row, and an empty tail in new arrays."""
        cols: dict[str, np.ndarray | pa.Array] = {c: a[: self.rows] for c, a in self._cols.items()}
        for c, chunks in self._strings.items():
            cols[c] = pa.concat_arrays(chunks) if chunks else pa.array([], STORED_SCHEMA.field(c).type)
        self.clear()
        return cols.pop("test"), cols


class TailStrings(NamedTuple):
    """A string column of the tail as a view saw it: the first `count` of its chunks (appended
    to, never changed, until the tail drains into new lists)."""

    chunks: list[pa.Array]
    count: int

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks[: self.count])

    def take(self, rows: np.ndarray) -> pa.Array:
        """The strings at these rows (ascending)."""
        pieces, at = [], 0
        for chunk in self.chunks[: self.count]:
            lo, hi = np.searchsorted(rows, [at, at + len(chunk)])
            if hi > lo:
                pieces.append(chunk.take(pa.array(rows[lo:hi] - at, pa.int64())))
            at += len(chunk)
        return pa.concat_arrays(pieces) if pieces else pa.array([], pa.string())


def rows_of(values: np.ndarray | pa.Array | TailStrings, mask: np.ndarray) -> np.ndarray | pa.Array:
    """values[mask] for a numpy column or a string column alike."""
    if isinstance(values, np.ndarray):
        return values[mask]
    return values.take(np.flatnonzero(mask)) if isinstance(values, TailStrings) else take(values, np.flatnonzero(mask))


@dataclass(frozen=True)
class StoreView:
    """Everything a query may see: sealed parts per test, and the unsorted rows not yet in them:
    the tail as it was when published, and a tail being sealed, if any (`tails`)."""

    partitions: dict[int, PartitionView]
    tails: tuple[dict[str, np.ndarray], ...]

    @property
    def tail(self) -> dict[str, np.ndarray]:
        """Every unsorted row, as one set of columns (a copy when a tail is being sealed)."""
        if len(self.tails) == 1:
            return self.tails[0]
        return {c: np.concatenate([t[c] for t in self.tails]) for c in self.tails[0] if c not in STRINGS}

    @property
    def tail_rows(self) -> int:
        return sum(len(t["test"]) for t in self.tails)

    def select(self, test: int, start_ns: int, end_ns: int, names: list[str]) -> dict[str, np.ndarray]:
        """The named columns of one test's events with start_ns <= timestamp <= end_ns."""
        partition = self.partitions.get(test)
        pieces = partition.select(start_ns, end_ns, names) if partition else []
        for tail in self.tails:
            ts = tail["timestamp"]
            if len(ts):
                mask = (tail["test"] == test) & (ts >= start_ns) & (ts <= end_ns)
                if mask.any():
                    pieces.append([rows_of(tail[c], mask) for c in names])
        if not pieces:
            return no_rows(names)
        if len(pieces) == 1:
            return dict(zip(names, pieces[0]))
        return {c: pa.concat_arrays([piece[i] for piece in pieces]) if c in STRINGS else
                np.concatenate([piece[i] for piece in pieces]) for i, c in enumerate(names)}


def no_rows(names: list[str]) -> dict[str, np.ndarray | pa.Array]:
    """The named columns of no events, each of its stored type."""
    return {c: pa.array([], pa.string()) if c in STRINGS else np.zeros(0, dtype=DTYPES[c]) for c in names}
