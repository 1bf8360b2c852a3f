"""EventStore: validated, dictionary-encoded appends and per-variant queries over them."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from abstream.store import analysis, kernels, persist
from abstream.store.dictionary import Dictionary
from abstream.store.errors import DeadlineExceeded, InvalidArgument, StoreError
from abstream.store.partition import COLUMNS, DTYPES, PartitionView, StoreView, Tail, split_by_test, take
from abstream.store.quarantine import Quarantine, QuarantinedEvent
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
from abstream.store.schema import CODE_TYPES, STORED_SCHEMA, Rejection
from abstream.store.validate import check_query_string, normalize, validate
from abstream.store.wal import Payload, WalCorruption, WriteAheadLog

log = logging.getLogger("abstream.store")

_NO_START = np.iinfo(np.int64).min
_NO_END = np.iinfo(np.int64).max


@dataclass(frozen=True)
class IngestResult:
    """What became of one batch: how many events were stored, and why the others were not.

    `duplicate` means the producer's batch with this sequence was applied before (and is
    durable): nothing was stored this time.
    """

    accepted: int
    rejections: list[Rejection]
    duplicate: bool = False
    lsn: int | None = None  # the log record to be durable before the ack (see EventStore.commit)


@dataclass(frozen=True)
class PreparedBatch:
    """A checked, dictionary-encoded batch and its log record, ready for `EventStore.apply`."""

    test_codes: np.ndarray
    cols: dict[str, np.ndarray | pa.Array]  # the stored columns of the accepted events
    rejected: pa.Table  # the rejected events as sent, in the order of `rejections`
    rejections: list[Rejection]
    received: int
    producer_id: str
    sequence: int
    payload: Payload | None  # the log record, when the store has a log

    @property
    def events(self) -> int:
        return len(self.test_codes) + len(self.rejections)


@dataclass(frozen=True)
class Durability:
    """Where and how the store persists itself; see persist.py and wal.py for the formats."""

    data_dir: Path
    fsync: str = "always"  # or "interval"
    fsync_interval_ms: int = 50
    snapshot_compression: str = "none"  # or "lz4", "zstd"
    snapshots_kept: int = 2
    snapshot_every_events: int = 1_000_000
    snapshot_every_seconds: float = 300.0


class RecoveryError(StoreError):
    """The data directory cannot be recovered without losing acknowledged events."""


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    events: int


@dataclass
class _Producer:
    sequence: int
    lsn: int


@dataclass
class _SnapshotClock:
    at: float = field(default_factory=time.monotonic)
    events: int = 0


class EventStore:
    """Append-only, in-memory event store partitioned by test.

    Appends are serialized by one lock; queries take no lock. A batch becomes visible all at
    once: it is written to the tail (and, when that fills, sealed into parts), then one new
    `StoreView` is published.
    """

    def __init__(self, *, seal_rows: int = 262_144, quarantine_limit: int = 100_000,
                 clock: Callable[[], int] = time.time_ns, durability: Durability | None = None) -> None:
        """With `durability`, the store first recovers from its data directory (newest readable
        snapshot, then the log after it) and logs every batch before acknowledging it.
        """
        self._seal_rows = seal_rows
        self._clock = clock
        self._lock = threading.Lock()  # applying batches: the log's order is the order they become visible
        self._encode_lock = threading.Lock()  # the dictionaries' one writer
        self._tests = Dictionary(capacity=np.iinfo(np.int32).max)
        self._dicts = {name: Dictionary(capacity=int(np.iinfo(t.to_pandas_dtype()).max))
                       for name, t in CODE_TYPES.items()}
        self._tail = Tail(min(seal_rows, 1 << 22))  # a tail's room up front, within reason
        self._partitions: dict[int, PartitionView] = {}  # written by the sealer (and recovery) only
        self._sealing: dict[str, np.ndarray] | None = None  # a full tail the sealer is working on
        self._sealer = ThreadPoolExecutor(1, thread_name_prefix="abstream-seal")
        self._sealed: Future | None = None
        self._view_lock = threading.Lock()  # publishing views: appends and the sealer
        self._view = StoreView({}, (self._tail.view(),))
        self._quarantine = Quarantine(quarantine_limit)
        self._producers: dict[str, _Producer] = {}
        self._durability = durability
        self._wal: WriteAheadLog | None = None
        self._snapshot_lock = threading.Lock()
        self._last_snapshot = _SnapshotClock()
        if durability is not None:
            self._recover(durability)

    # ---- ingest -------------------------------------------------------------------------

    def append(self, batch: pa.Table | pa.RecordBatch, producer_id: str = "", sequence: int = 0,
               wait: bool = True, refuse: Sequence[Rejection] = ()) -> IngestResult:
        """Store the valid events of `batch` (EVENT_SCHEMA columns); explain the rest.

        The same as `apply(prepare(...))`; see both.
        """
        return self.apply(self.prepare(batch, producer_id, sequence, refuse), wait)

    def prepare(self, batch: pa.Table | pa.RecordBatch, producer_id: str = "", sequence: int = 0,
                refuse: Sequence[Rejection] = (), ipc: pa.Buffer | bytes | None = None
                ) -> PreparedBatch:
        """Checks every event of `batch`, encodes its strings and builds its log record, without
        taking the ingest lock: a stream prepares its next batches while one is applied.

        A batch tagged with `producer_id` is applied at most once per `sequence`: sequences must
        increase, and one not above the last applied is acknowledged as a duplicate. Each
        `refuse` entry rejects its row for a reason the caller knows (a string that was not
        UTF-8, a test the token may not write); a row's first entry is its reason. `ipc`, when the batch was read from one Arrow IPC stream, is
        that stream: the log keeps it as it is instead of writing the batch again.
        """
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        batch = normalize(batch)
        received = self._clock()
        valid, rejections = validate(batch, received)
        if refuse:
            refused, refusals = np.zeros(batch.num_rows, dtype=bool), []
            for r in refuse:
                if not refused[r.index]:
                    refused[r.index] = True
                    refusals.append(r)
            rejections = [r for r in rejections if not refused[r.index]] + refusals
            valid = valid & ~refused
        with self._encode_lock:
            test_codes, cols, rejected = self._encode(batch, valid, rejections)
        payload = None
        if self._wal is not None:
            payload = Payload.of(persist.encode_record(
                persist.Record(batch, rejections, producer_id, sequence, received), ipc))
        return PreparedBatch(test_codes, cols, rejected, rejections, received, producer_id, sequence, payload)

    def apply(self, prepared: PreparedBatch, wait: bool = True) -> IngestResult:
        """Makes a prepared batch visible to queries and logs it, in one critical section.

        Returns once the batch is visible and, with `wait`, as durable as the fsync policy says;
        without it, call `commit(result)` before acknowledging, so that a stream can apply its
        next batch while this one's fsync runs.
        """
        p = prepared
        with self._lock:
            if (previous := self._producers.get(p.producer_id) if p.producer_id else None) is not None \
                    and p.sequence <= previous.sequence:
                # Applied before: wait for that batch to be durable, store nothing now.
                lsn, result = (previous.lsn or None) if self._wal else None, IngestResult(0, [], duplicate=True)
            else:
                lsn = None if self._wal is None else self._wal.append(p.payload)
                self._apply(p.test_codes, p.cols, p.rejected, p.rejections, p.received, p.producer_id, p.sequence, lsn)
                result = IngestResult(accepted=len(p.test_codes), rejections=p.rejections)
        result = dataclasses.replace(result, lsn=lsn)
        if wait:
            self.commit(result)
        return result

    def commit(self, result: IngestResult) -> None:
        """Returns once the batch behind `result` is as durable as the fsync policy promises."""
        if result.lsn is not None and self._wal is not None:
            self._wal.commit(result.lsn)

    def _encode(self, batch: pa.Table, valid: np.ndarray, rejections: list[Rejection]
                ) -> tuple[np.ndarray, dict[str, np.ndarray | pa.Array], pa.Table]:
        """(test codes, stored columns) of the valid rows of a normalized batch, and its rejected
        rows as sent. A row whose value no longer fits a full dictionary gets a rejection too;
        `rejections` ends up complete and sorted by row."""
        good_index = np.flatnonzero(valid)
        good = batch.take(good_index) if len(good_index) < batch.num_rows else batch
        test_codes = self._tests.encode(good.column("test_id"))
        codes = {name: d.encode(good.column(name)) for name, d in self._dicts.items()}
        full = np.zeros(good.num_rows, dtype=bool)
        for name, c in codes.items():
            if len(c) == 0 or c.min() >= 0:  # the usual case: nothing overflowed
                continue
            overflow = c < 0
            for j in np.flatnonzero(overflow & ~full).tolist():
                rejections.append(Rejection(int(good_index[j]), name, f"{name} has reached its limit of "
                                            f"{self._dicts[name].capacity} distinct values"))
            full |= overflow
        sessions = good.column("session_id")
        cols = {
            "timestamp": good.column("timestamp").to_numpy(),
            "conversion": good.column("conversion").to_numpy().astype(np.uint8),
            "revenue": good.column("revenue").to_numpy(),
            "session_id": (sessions.cast(pa.string()) if sessions.type != pa.string() else sessions).combine_chunks(),
            **{name: c.astype(CODE_TYPES[name].to_pandas_dtype()) for name, c in codes.items()},
        }
        if full.any():
            kept = np.flatnonzero(~full)
            test_codes, cols = test_codes[kept], {c: take(a, kept) for c, a in cols.items()}
        rejections.sort(key=lambda r: r.index)
        rejected = batch.take(pa.array([r.index for r in rejections], pa.int64())) if rejections else batch.slice(0, 0)
        return test_codes, cols, rejected

    def _apply(self, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array], rejected: pa.Table,
               rejections: list[Rejection], received: int, producer_id: str, sequence: int,
               lsn: int | None) -> None:
        """Makes a batch visible: its events, its rejected events (`rejected`, in the order of
        `rejections`) in quarantine, and its producer's sequence."""
        self._append_by_test(test_codes, cols)
        self._quarantine.add(received, rejections, rejected)
        if producer_id:
            self._producers[producer_id] = _Producer(sequence, lsn or 0)

    def _append_by_test(self, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array]) -> None:
        if len(test_codes) == 0:
            return
        self._tail.append(test_codes, cols)
        if self._tail.rows >= self._seal_rows:
            # Sealing (sorting, packing, merging parts) runs in the sealer thread, beside the
            # next appends; one tail at a time, so a sealer that falls behind slows ingest down.
            self.wait_sealed()
            test_codes, cols = self._tail.drain()
            with self._view_lock:
                self._sealing = {"test": test_codes, **{c: cols[c] for c in DTYPES if c != "test"}}
            self._sealed = self._sealer.submit(self._seal, test_codes, cols)
        self._publish()

    def _publish(self) -> None:
        """One new view: everything applied so far becomes visible at once."""
        with self._view_lock:
            tails = (self._tail.view(),) if self._sealing is None else (self._sealing, self._tail.view())
            self._view = StoreView(self._partitions, tails)

    def wait_sealed(self) -> None:
        """Returns once no tail is being sealed (re-raising what sealing raised)."""
        if self._sealed is not None:
            self._sealed.result()

    def _seal(self, test_codes: np.ndarray, cols: dict[str, np.ndarray | pa.Array]) -> None:
        """Moves a drained tail into each test's parts and publishes them (in the sealer)."""
        partitions = dict(self._partitions)
        for code, rows in split_by_test(test_codes, cols, wide_keys=len(self._tests) > 1 << 16):
            partitions[code] = partitions.get(code, PartitionView()).with_rows(rows)
        with self._view_lock:
            # The tail views appends published stay valid: only the sealed rows move.
            self._partitions, self._sealing = partitions, None
            self._view = StoreView(partitions, self._view.tails[-1:])

    # ---- durability ---------------------------------------------------------------------

    def _recover(self, d: Durability) -> None:
        """Newest readable snapshot, then every log record after it; refuses to lose any."""
        started = time.monotonic()
        snapshots_dir, wal = Path(d.data_dir) / "snapshots", WriteAheadLog(Path(d.data_dir) / "wal", d.fsync,
                                                                           d.fsync_interval_ms)
        segments = wal.segments()
        first_logged = segments[0][0] if segments else None
        contents, skipped = None, []
        for lsn, path in persist.list_snapshots(snapshots_dir):
            try:
                contents = persist.load_snapshot(path)
                break
            except persist.SnapshotError as error:
                log.error("snapshot %s is unusable, trying an older one: %s", path, error)
                skipped.append(str(path))
        start_lsn = contents.lsn if contents else 1
        if first_logged is not None and first_logged > start_lsn:
            raise RecoveryError(
                f"cannot recover {d.data_dir}: the write-ahead log begins at record {first_logged}, but "
                + (f"the newest usable snapshot ends before record {start_lsn}" if contents else "no snapshot was found")
                + (f" (unusable: {', '.join(skipped)})" if skipped else f" in {snapshots_dir}")
                + "; the events in between are gone. Restore the snapshots directory from a backup.")
        if contents is not None:
            self._restore(contents)
        in_snapshot = self.event_count
        replayed = 0
        try:
            for _, payload in wal.replay(after_lsn=start_lsn - 1):
                self._replay(persist.decode_record(payload))
                replayed += 1
        except WalCorruption as error:
            raise RecoveryError(str(error)) from error
        self.wait_sealed()
        wal.open()
        self._wal = wal
        self._last_snapshot = _SnapshotClock(events=in_snapshot)
        log.info("recovered %d events (%s, %d log records replayed) in %.2fs", self.event_count,
                 f"snapshot {start_lsn}" if contents else "no snapshot", replayed, time.monotonic() - started)

    def _replay(self, record: persist.Record) -> None:
        batch = normalize(record.batch)
        valid = np.ones(batch.num_rows, dtype=bool)
        valid[np.array([r.index for r in record.rejections], dtype=np.int64)] = False
        rejections = list(record.rejections)
        test_codes, cols, rejected = self._encode(batch, valid, rejections)
        self._apply(test_codes, cols, rejected, rejections, record.received_ns, record.producer_id,
                    record.sequence, self._wal.next_lsn - 1 if self._wal else 0)

    def _restore(self, contents: persist.SnapshotContents) -> None:
        for name, values in contents.dictionaries.items():
            if name == "test_id":
                self._tests = Dictionary.from_values(values, self._tests.capacity)
            else:
                old = self._dicts[name]
                self._dicts[name] = Dictionary.from_values(values, old.capacity)
        partitions: dict[int, PartitionView] = {}
        for batch in contents.events:
            code = int(batch.column("test")[0].as_py())
            cols = {c: batch.column(c) if c in ("session_id",) else batch.column(c).to_numpy() for c in COLUMNS}
            partitions[code] = partitions.get(code, PartitionView()).with_rows(cols)
        self._partitions = partitions
        self._publish()
        self._quarantine.restore(contents.quarantine)
        self._producers = {k: _Producer(v["sequence"], 0) for k, v in contents.producers.items()}

    def snapshot(self) -> SnapshotInfo:
        """Writes a snapshot now and returns once it is durable.

        Only capturing what to write holds the ingest lock (references to immutable parts, a
        copy of the tail's rows); writing runs beside ingest and queries.
        """
        d = self._durability
        if d is None or self._wal is None:
            raise StoreError("this store has no data directory to snapshot to")
        with self._snapshot_lock:
            with self._lock:
                contents = self._capture()
                events_at = self.event_count
            root = Path(d.data_dir) / "snapshots"
            path = persist.write_snapshot(root, contents, d.snapshot_compression)
            self._last_snapshot = _SnapshotClock(events=events_at)
            kept = persist.list_snapshots(root)[: max(d.snapshots_kept, 1)]
            for _, old in persist.list_snapshots(root)[len(kept):]:
                shutil.rmtree(old, ignore_errors=True)
            for tmp in root.glob("tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
            # Keep the log back to the oldest kept snapshot, so any of them can be fallen back on.
            self._wal.drop_before(kept[-1][0])
            log.info("snapshot %s written: %d events", path.name, events_at)
            return SnapshotInfo(path, events_at)

    def _capture(self) -> persist.SnapshotContents:
        """What a snapshot holds, taken under the ingest lock: cheap references, one tail copy."""
        self.wait_sealed()  # the sealer publishes without the ingest lock: let it finish first
        lsn = self._wal.rotate()
        view = self._view
        batches = [(code, part) for code, partition in view.partitions.items() for part in partition.parts]
        tail_codes, tail_cols = self._tail.copy()
        producers = {k: {"sequence": v.sequence} for k, v in self._producers.items()}
        dictionaries = {"test_id": self._tests.values, **{n: d.values for n, d in self._dicts.items()}}
        return persist.SnapshotContents(lsn, _LazyBatches(batches, tail_codes, tail_cols), dictionaries,
                                        self._quarantine.table(), producers)

    def maybe_snapshot(self) -> SnapshotInfo | None:
        """Snapshots when the configured number of events or seconds has passed since the last."""
        d = self._durability
        if d is None:
            return None
        since = self.event_count - self._last_snapshot.events
        due = (d.snapshot_every_events > 0 and since >= d.snapshot_every_events) or (
            d.snapshot_every_seconds > 0 and since > 0
            and time.monotonic() - self._last_snapshot.at >= d.snapshot_every_seconds)
        return self.snapshot() if due else None

    def close(self, final_snapshot: bool = True) -> None:
        """Flushes everything: a last snapshot (so a restart replays nothing), then the log."""
        self.wait_sealed()
        if self._wal is not None:
            if final_snapshot:
                self.snapshot()
            self._wal.close()
            self._wal = None
        self._sealer.shutdown()

    # ---- queries ------------------------------------------------------------------------

    def summary(self, q: SummaryQuery) -> SummaryResult:
        started = time.perf_counter_ns()
        q.analysis.check()
        view, test, start, end = self._resolve(q.test_id, q.start_ns, q.end_ns)
        cols = self._select(view, test, start, end, ["variant", "user_id", "conversion", "revenue"])
        scanned = cols.pop("_scanned")
        _in_time(q.deadline)
        variant_id, variant_codes = self._rank("variant", cols["variant"])
        totals = kernels.group_totals(variant_id, cols["user_id"], cols["conversion"], cols["revenue"],
                                      len(variant_codes))
        variants = self._dicts["variant"].decode(variant_codes)
        _in_time(q.deadline)
        moments = analysis.user_moments(variant_id, cols["user_id"], cols["conversion"], cols["revenue"],
                                        self._n_users(), totals)
        return SummaryResult(
            test_id=q.test_id,
            variants=variants,
            metrics=MetricColumns(**totals),
            stats=QueryStats(scanned, time.perf_counter_ns() - started),
            analysis=analysis.analyze(variants, moments, np.arange(len(variants)), q.analysis),
        )

    def segments(self, q: SegmentsQuery) -> SegmentsResult:
        started = time.perf_counter_ns()
        q.analysis.check()
        view, test, start, end = self._resolve(q.test_id, q.start_ns, q.end_ns)
        dim = q.dimension.value
        cols = self._select(view, test, start, end, ["variant", "user_id", "conversion", "revenue", dim],
                            q.filters)
        scanned = cols.pop("_scanned")
        _in_time(q.deadline)
        variant_id, variant_codes = self._rank("variant", cols["variant"])
        segment_id, segment_codes = self._rank(dim, cols[dim])
        n_seg = len(segment_codes)
        totals = kernels.group_totals(variant_id * n_seg + segment_id, cols["user_id"], cols["conversion"],
                                      cols["revenue"], len(variant_codes) * n_seg)
        keep = np.flatnonzero(totals["events"])
        metrics = MetricColumns(**totals).take(keep)
        v, s = np.divmod(keep, max(n_seg, 1))
        variants = self._dicts["variant"].decode(variant_codes[v])
        segments = self._dicts[dim].decode(segment_codes[s])
        _in_time(q.deadline)
        moments = analysis.user_moments(variant_id * n_seg + segment_id, cols["user_id"], cols["conversion"],
                                        cols["revenue"], self._n_users(), totals)
        control = analysis.choose_control(self._dicts["variant"].decode(variant_codes), q.analysis.control_variant)
        analyses = []
        for segment_index in range(n_seg):  # each segment compares its own variants with the test's control
            rows = np.flatnonzero(s == segment_index)
            if len(rows):
                analyses.append((segments[rows[0]], analysis.analyze(
                    [variants[r] for r in rows.tolist()], moments, keep[rows], q.analysis, control)))
        return SegmentsResult(
            test_id=q.test_id,
            dimension=q.dimension,
            variants=variants,
            segments=segments,
            metrics=metrics,
            stats=QueryStats(scanned, time.perf_counter_ns() - started),
            analyses=analyses,
        )

    def timeseries(self, q: TimeseriesQuery) -> TimeseriesResult:
        started = time.perf_counter_ns()
        view, test, start, end = self._resolve(q.test_id, q.start_ns, q.end_ns)
        cols = self._select(view, test, start, end, ["timestamp", "variant", "user_id", "conversion", "revenue"],
                            q.filters)
        scanned = cols.pop("_scanned")
        _in_time(q.deadline)
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
                                          cols["revenue"], n_b * n_v)
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

    def quarantine(self, test_id: str = "", limit: int = 100, test_prefix: str = "") -> tuple[list[QuarantinedEvent], int]:
        """Up to `limit` rejected events, newest first, and how many match in all (of one test
        when `test_id` is given, of tests starting with `test_prefix`)."""
        check_query_string("test_id", test_id)
        return self._quarantine.newest(test_id, limit, test_prefix)

    @property
    def last_snapshot_at(self) -> float:
        """time.monotonic() of the last snapshot written (or of the start, before any)."""
        return self._last_snapshot.at

    @property
    def nbytes(self) -> int:
        """Bytes held by stored events and dictionaries (not counting the allocator's slack)."""
        view = self._view
        parts = sum(p.nbytes for partition in view.partitions.values() for p in partition.parts)
        bits = sum(partition.user_bits.nbytes for partition in view.partitions.values())
        tail = sum(a.nbytes for t in view.tails for a in t.values())
        return parts + bits + tail + sum(d.nbytes for d in [self._tests, *self._dicts.values()])

    @property
    def event_count(self) -> int:
        view = self._view
        return sum(p.events for p in view.partitions.values()) + view.tail_rows

    # ---- helpers ------------------------------------------------------------------------

    def _resolve(self, test_id: str, start_ns: int | None, end_ns: int | None) -> tuple[StoreView, int | None, int, int]:
        if not test_id:
            raise InvalidArgument("test_id", "is required")
        check_query_string("test_id", test_id)
        if start_ns is not None and end_ns is not None and end_ns < start_ns:
            raise InvalidArgument("end_time", "is before start_time")
        view = self._view  # captured before the lookup: codes it holds are already in the dictionary
        return (view, self._tests.code(test_id), _NO_START if start_ns is None else start_ns,
                _NO_END if end_ns is None else end_ns)

    def _select(self, view: StoreView, test: int | None, start: int, end: int, names: list[str],
                filters: Filters | None = None) -> dict[str, np.ndarray]:
        """Columns of the events in range that pass the filters; '_scanned' counts those in range."""
        if filters:
            filters.check()
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


def _in_time(deadline: float | None) -> None:
    """Stops a query whose caller has stopped waiting (checked between its stages)."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the caller's deadline passed; the query was stopped")


class _LazyBatches:
    """The snapshot's record batches, built while writing (outside the ingest lock)."""

    def __init__(self, parts: list, tail_codes: np.ndarray, tail_cols: dict) -> None:
        self._parts, self._tail_codes, self._tail_cols = parts, tail_codes, tail_cols

    def __iter__(self):
        for code, part in self._parts:
            yield _with_test(part.batch(), code)
        if len(self._tail_codes):
            order = np.lexsort((self._tail_cols["timestamp"], self._tail_codes))
            codes = self._tail_codes[order]
            cols = {c: take(self._tail_cols[c], order) for c in COLUMNS}
            bounds = np.flatnonzero(np.diff(codes)) + 1
            for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(codes)]):
                arrays = [pa.array(cols[c][lo:hi]) if c in DTYPES else cols[c][lo:hi] for c in COLUMNS]
                yield _with_test(pa.RecordBatch.from_arrays(arrays, schema=STORED_SCHEMA), int(codes[lo]))


def _with_test(batch: pa.RecordBatch, code: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(np.full(batch.num_rows, code, np.int32)), *batch.columns],
                                      schema=persist.SNAPSHOT_SCHEMA)

