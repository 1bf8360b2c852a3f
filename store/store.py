"""EventStore: validated, dictionary-encoded appends and per-variant queries over them."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from abstream.store import kernels
from abstream.store.dictionary import Dictionary
from abstream.store.errors import InvalidArgument
from abstream.store.partition import COLUMNS, PartitionView, StoreView, Tail, take
from abstream.store.queries import (
    Filters,
    MetricColumns,
    QueryStats,
    SegmentsQuery,
    SegmentsResult,
    SummaryQuery,
    SummaryResult,
    TestInfo,
    TimeseriesQuery,
    TimeseriesResult,
)
from abstream.store.schema import CODE_TYPES, Rejection
from abstream.store.validate import normalize, validate

_NO_START = np.iinfo(np.int64).min
_NO_END = np.iinfo(np.int64).max


@dataclass(frozen=True)
class IngestResult:
    """What became of one batch: how many events were stored, and why the others were not."""

    accepted: int
    rejections: list[Rejection]


@dataclass(frozen=True)
class QuarantinedEvent:
    """A rejected event as it was sent (EVENT_SCHEMA field names), with the reason."""

    received_ns: int
    index: int
    field: str
    message: str
    event: dict[str, Any]


class EventStore:
    """Append-only, in-memory event store partitioned by test.

    Appends are serialized by one lock; queries take no lock. A batch becomes visible all at
    once: it is written to the tail (and, when that fills, sealed into parts), then one new
    `StoreView` is published.
    """

    def __init__(self, *, seal_rows: int = 262_144, quarantine_limit: int = 100_000,
                 clock: Callable[[], int] = time.time_ns, on_seal: Callable[[], None] | None = None) -> None:
        """`on_seal` runs after the tail is sealed into parts, when much memory was just freed."""
        self._seal_rows = seal_rows
        self._on_seal = on_seal
        self._clock = clock
        self._lock = threading.Lock()
        self._tests = Dictionary(capacity=np.iinfo(np.int32).max)
        self._dicts = {name: Dictionary(capacity=int(np.iinfo(t.to_pandas_dtype()).max),
                                        few_values=name != "user_id")
                       for name, t in CODE_TYPES.items()}
        self._tail = Tail()
        self._view = StoreView({}, self._tail.view())
        self._quarantine: deque[QuarantinedEvent] = deque(maxlen=quarantine_limit)

    # ---- ingest -------------------------------------------------------------------------

    def append(self, batch: pa.Table | pa.RecordBatch) -> IngestResult:
        """Store the valid events of `batch` (EVENT_SCHEMA columns); explain the rest."""
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        batch = normalize(batch)
        valid, rejections = validate(batch, self._clock())
        good_index = np.flatnonzero(valid)
        good = batch.take(good_index) if rejections else batch
        with self._lock:
            test_codes = self._tests.encode(good.column("test_id"))
            codes = {name: d.encode(good.column(name)) for name, d in self._dicts.items()}
            full = np.zeros(good.num_rows, dtype=bool)
            for name, c in codes.items():
                overflow = c < 0
                for j in np.flatnonzero(overflow & ~full).tolist():
                    rejections.append(Rejection(int(good_index[j]), name,
                                                f"{name} has reached its limit of "
                                                f"{self._dicts[name].capacity} distinct values"))
                full |= overflow
            keep = ~full if full.any() else None
            cols = {
                "timestamp": good.column("timestamp").to_numpy(),
                "conversion": good.column("conversion").to_numpy().astype(np.uint8),
                "revenue": good.column("revenue").to_numpy(),
                "session_id": good.column("session_id").combine_chunks(),
                **{name: c.astype(CODE_TYPES[name].to_pandas_dtype()) for name, c in codes.items()},
            }
            if keep is not None:
                cols = {c: take(a, np.flatnonzero(keep)) for c, a in cols.items()}
                test_codes = test_codes[keep]
            self._append_by_test(test_codes, cols)
            if rejections:
                self._quarantine_rows(batch, rejections)
        rejections.sort(key=lambda r: r.index)
        return IngestResult(accepted=len(test_codes), rejections=rejections)

    def _append_by_test(self, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array]) -> None:
        if len(test_codes) == 0:
            return
        self._tail.append(test_codes, cols)
        partitions = self._view.partitions
        sealed = self._tail.rows >= self._seal_rows
        if sealed:
            partitions = self._seal()
        self._view = StoreView(partitions, self._tail.view())  # one assignment: all of a batch at once
        if sealed and self._on_seal is not None:
            self._on_seal()

    def _seal(self) -> dict[int, PartitionView]:
        """Moves the tail into each test's parts; returns the new partition views."""
        test_codes, cols = self._tail.drain()
        # One permutation for every column: by time (a near-sorted stream makes this timsort
        # cheap), then stably by test (16-bit keys, the usual case, take numpy's radix sort).
        by_time = np.argsort(cols["timestamp"], kind="stable")
        keys = test_codes[by_time]
        keys = keys.astype(np.uint16) if len(self._tests) <= 1 << 16 else keys
        order = by_time[np.argsort(keys, kind="stable")]
        test_codes = test_codes[order]
        cols = {c: take(cols[c], order) for c in COLUMNS}
        bounds = np.flatnonzero(np.diff(test_codes)) + 1
        partitions = dict(self._view.partitions)
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(test_codes)]):
            code = int(test_codes[lo])
            partitions[code] = partitions.get(code, PartitionView()).with_rows({c: a[lo:hi] for c, a in cols.items()})
        return partitions

    def _quarantine_rows(self, batch: pa.Table, rejections: list[Rejection]) -> None:
        received = self._clock()
        events = batch.take([r.index for r in rejections]).to_pylist()
        for r, event in zip(rejections, events):
            self._quarantine.append(QuarantinedEvent(received, r.index, r.field, r.message, event))

    # ---- queries ------------------------------------------------------------------------

    def summary(self, q: SummaryQuery) -> SummaryResult:
        started = time.perf_counter_ns()
        view, test, start, end = self._resolve(q.test_id, q.start_ns, q.end_ns)
        cols = self._select(view, test, start, end, ["variant", "user_id", "conversion", "revenue"])
        scanned = cols.pop("_scanned")
        variant_id, variant_codes = self._rank("variant", cols["variant"])
        totals = kernels.group_totals(variant_id, cols["user_id"], cols["conversion"], cols["revenue"],
                                      len(variant_codes), self._n_users())
        return SummaryResult(
            test_id=q.test_id,
            variants=self._dicts["variant"].decode(variant_codes),
            metrics=MetricColumns(**totals),
            stats=QueryStats(scanned, time.perf_counter_ns() - started),
        )

    def segments(self, q: SegmentsQuery) -> SegmentsResult:
        started = time.perf_counter_ns()
        view, test, start, end = self._resolve(q.test_id, q.start_ns, q.end_ns)
        dim = q.dimension.value
        cols = self._select(view, test, start, end, ["variant", "user_id", "conversion", "revenue", dim],
                            q.filters)
        scanned = cols.pop("_scanned")
        variant_id, variant_codes = self._rank("variant", cols["variant"])
        segment_id, segment_codes = self._rank(dim, cols[dim])
        n_seg = len(segment_codes)
        totals = kernels.group_totals(variant_id * n_seg + segment_id, cols["user_id"], cols["conversion"],
                                      cols["revenue"], len(variant_codes) * n_seg, self._n_users())
        keep = np.flatnonzero(totals["events"])
        metrics = MetricColumns(**totals).take(keep)
        v, s = np.divmod(keep, max(n_seg, 1))
        return SegmentsResult(
            test_id=q.test_id,
            dimension=q.dimension,
            variants=self._dicts["variant"].decode(variant_codes[v]),
            segments=self._dicts[dim].decode(segment_codes[s]),
            metrics=metrics,
            stats=QueryStats(scanned, time.perf_counter_ns() - started),
        )

    def timeseries(self, q: TimeseriesQuery) -> TimeseriesResult:
        started = time.perf_counter_ns()
        view, test, start, end = self._resolve(q.test_id, q.start_ns, q.end_ns)
        cols = self._select(view, test, start, end, ["timestamp", "variant", "user_id", "conversion", "revenue"],
                            q.filters)
        scanned = cols.pop("_scanned")
        interval = q.interval
        bucket_id, buckets = kernels.dense_ids(kernels.bucket_index(cols["timestamp"], interval.origin_ns,
                                                                    interval.width_ns))
        variant_id, variant_codes = self._rank("variant", cols["variant"])
        n_b, n_v = len(buckets), len(variant_codes)
        if q.cumulative:
            totals = kernels.cumulative_totals(bucket_id, variant_id, cols["user_id"], cols["conversion"],
                                               cols["revenue"], n_b, n_v, self._n_users())
            totals = {name: a.reshape(-1) for name, a in totals.items()}
        else:
            totals = kernels.group_totals(bucket_id * n_v + variant_id, cols["user_id"], cols["conversion"],
                                          cols["revenue"], n_b * n_v, self._n_users())
        keep = np.flatnonzero(totals["events"])
        b, v = np.divmod(keep, max(n_v, 1))
        return TimeseriesResult(
            test_id=q.test_id,
            interval=interval,
            cumulative=q.cumulative,
            bucket_start_ns=buckets[b] * interval.width_ns + interval.origin_ns,
            variants=self._dicts["variant"].decode(variant_codes[v]),
            metrics=MetricColumns(**totals).take(keep),
            stats=QueryStats(scanned, time.perf_counter_ns() - started),
        )

    def list_tests(self) -> list[TestInfo]:
        """Every test with its variants, events, distinct users and first and last event time."""
        view = self._view
        tail = view.tail
        order = np.argsort(tail["test"], kind="stable")
        tail_tests = tail["test"][order]
        bounds = np.flatnonzero(np.diff(tail_tests)) + 1
        in_tail = {int(tail_tests[lo]): order[lo:hi] for lo, hi in
                   zip([0, *bounds.tolist()], [*bounds.tolist(), len(tail_tests)]) if hi > lo}
        codes = sorted(set(view.partitions) | set(in_tail))
        names = self._tests.decode(np.array(codes, dtype=np.int64))
        variant_names = self._dicts["variant"]
        tests = []
        for code, name in zip(codes, names):
            p = view.partitions.get(code, PartitionView())
            events, users, first, last, variants = p.events, p.users, p.first_ns, p.last_ns, set(p.variants)
            rows = in_tail.get(code)
            if rows is not None:
                ts = tail["timestamp"][rows]
                tail_users = kernels.distinct_values(tail["user_id"][rows])
                events += len(rows)
                users += int(np.count_nonzero(~p.has_users(tail_users)))
                first, last = min(first, int(ts.min())), max(last, int(ts.max()))
                variants |= set(kernels.distinct_values(tail["variant"][rows]).tolist())
            decoded = variant_names.decode(np.array(sorted(variants), dtype=np.int64))
            tests.append(TestInfo(name, sorted(decoded), events, users, first, last))
        return sorted(tests, key=lambda t: t.test_id)

    def quarantine(self, test_id: str = "", limit: int = 100) -> tuple[list[QuarantinedEvent], int]:
        """Up to `limit` rejected events, newest first, and how many match in all."""
        entries = [e for e in list(self._quarantine) if not test_id or e.event.get("test_id") == test_id]
        return entries[::-1][:limit], len(entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by stored events and dictionaries (not counting the allocator's slack)."""
        view = self._view
        parts = sum(p.nbytes for partition in view.partitions.values() for p in partition.parts)
        bits = sum(partition.user_bits.nbytes for partition in view.partitions.values())
        tail = sum(a.nbytes for a in view.tail.values())
        return parts + bits + tail + sum(d.nbytes for d in [self._tests, *self._dicts.values()])

    @property
    def event_count(self) -> int:
        view = self._view
        return sum(p.events for p in view.partitions.values()) + len(view.tail["test"])

    # ---- helpers ------------------------------------------------------------------------

    def _resolve(self, test_id: str, start_ns: int | None, end_ns: int | None) -> tuple[StoreView, int | None, int, int]:
        if not test_id:
            raise InvalidArgument("test_id", "is required")
        if start_ns is not None and end_ns is not None and end_ns < start_ns:
            raise InvalidArgument("end_time", "is before start_time")
        view = self._view  # captured before the lookup: codes it holds are already in the dictionary
        return (view, self._tests.code(test_id), _NO_START if start_ns is None else start_ns,
                _NO_END if end_ns is None else end_ns)

    def _select(self, view: StoreView, test: int | None, start: int, end: int, names: list[str],
                filters: Filters | None = None) -> dict[str, np.ndarray]:
        """Columns of the events in range that pass the filters; '_scanned' counts those in range."""
        filter_names = [name for name, _ in filters.items()] if filters else []
        wanted = list(dict.fromkeys(names + filter_names))
        if test is None:
            cols = {c: np.zeros(0, dtype=np.int64) for c in wanted}
        else:
            cols = view.select(test, start, end, wanted)
        scanned = len(cols[wanted[0]])
        if filter_names:
            mask = np.ones(scanned, dtype=bool)
            for name, value in filters.items():
                code = self._dicts[name].code(value)
                mask &= False if code is None else cols[name] == code
            cols = {c: cols[c][mask] for c in names}
        cols["_scanned"] = scanned
        return cols

    def _rank(self, name: str, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dense ids for one column's codes, ordered by the decoded strings."""
        d = self._dicts[name]

        def by_name(present: np.ndarray) -> np.ndarray:
            names = d.decode(present)
            return np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)

        return kernels.ranked_codes(codes.astype(np.int64), len(d), by_name)

    def _n_users(self) -> int:
        return max(len(self._dicts["user_id"]), 1)
