"""EventStore: the embedded engine, one process's memory and data directory (core/engine.py).

It puts four parts together: ingest and the tail (ingest.py), parts and merging
(partition.py), durability (durability.py: the log, snapshots, recovery) and query execution
(execute.py). Appends are serialized by one lock; queries take no lock: every append publishes
a new immutable view, so a query sees a batch entirely or not at all.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from abstream.core import engine
from abstream.core.engine import Gauge
from abstream.core.errors import AbstreamError, ResourceExhausted, Unavailable
from abstream.core.events import Rejection
from abstream.core.types import (
    Experiment,
    GroupStats,
    IngestResult,
    QuarantinedEvent,
    SegmentsQuery,
    SnapshotInfo,
    SummaryQuery,
    TestInfo,
    TimeseriesQuery,
    TimeseriesResult,
    ValidatedBatch,
)
from abstream.store.durability import SNAPSHOT_RETRY_SECONDS, Durability, Persistence
from abstream.store.execute import Queries
from abstream.store.ingest import Ingest, PreparedBatch

#: A test whose whole-test Summary is asked for keeps per-(variant, user) totals (store/rollup.py)
#: from this many sealed events: below it, scanning its events costs about what merging the tail
#: into the totals would.
ROLLUP_EVENTS = 65_536


class EventStore:
    """Append-only, in-memory event store partitioned by test; with `durability`, it first
    recovers from its data directory (newest readable snapshot, then the log after it) and logs
    every batch before it is acknowledged."""

    name = "embedded"
    groups_producer_batches = True
    remote_plans = False

    def __init__(self, *, seal_rows: int = 262_144, quarantine_limit: int = 100_000,
                 clock: Callable[[], int] = time.time_ns, durability: Durability | None = None,
                 rollup_events: int | None = ROLLUP_EVENTS, quarantine_namespaces: tuple[str, ...] = ()) -> None:
        self._clock = clock
        # The test-id prefixes tokens are limited to: each keeps its share of the quarantine.
        self._ingest = Ingest(seal_rows, quarantine_limit, rollup_events, quarantine_namespaces)
        self._queries = Queries(self._ingest)
        self._persistence = Persistence(self._ingest, durability) if durability is not None else None
        self._identity = self._persistence.identity if self._persistence else f"memory:{uuid.uuid4().hex}"
        self._erasing = threading.Lock()

    # ---- ingest ---------------------------------------------------------------------------

    def append(self, batch: pa.Table | pa.RecordBatch, producer_id: str = "", sequence: int = 0,
               refuse: Sequence[Rejection] = ()) -> IngestResult:
        """Checks and stores the valid events of `batch` (event field names); explains the rest.
        For callers that embed the store: the server checks batches in the core first."""
        return engine.append(self, batch, producer_id, sequence, refuse, self._clock())

    def prepare(self, batch: ValidatedBatch) -> PreparedBatch:
        return self._ingest.prepare(batch)

    def apply(self, prepared: PreparedBatch) -> IngestResult:
        return self._ingest.apply(prepared)

    def commit(self, result: IngestResult) -> None:
        self._ingest.commit(result)

    def wait_sealed(self) -> None:
        self._ingest.wait_sealed()

    def wait_rollups(self) -> None:
        """Returns once the rollups whole-test queries asked for are in place (store/rollup.py)."""
        self._ingest.wait_rollups()

    # ---- queries --------------------------------------------------------------------------

    def summary(self, q: SummaryQuery) -> GroupStats:
        return self._queries.summary(q)

    def segments(self, q: SegmentsQuery) -> GroupStats:
        return self._queries.segments(q)

    def timeseries(self, q: TimeseriesQuery) -> TimeseriesResult:
        return self._queries.timeseries(q)

    def list_tests(self) -> list[TestInfo]:
        return self._queries.list_tests()

    def count_events(self, test_id: str, start_ns: int | None, end_ns: int | None) -> int:
        return self._queries.count_events(test_id, start_ns, end_ns)

    def export(self, test_id: str, start_ns: int | None = None, end_ns: int | None = None,
               rows: int = 100_000) -> Iterator[pa.Table]:
        """A test's events as stored, `rows` at a time (see Queries.export)."""
        return self._queries.export(test_id, start_ns, end_ns, rows)

    def quarantine(self, test_id: str = "", limit: int = 100, test_prefix: str = ""
                   ) -> tuple[list[QuarantinedEvent], int]:
        """Up to `limit` rejected events, newest first, and how many match in all (of one test
        when `test_id` is given, of tests starting with `test_prefix`)."""
        return self._ingest.quarantine.newest(test_id, limit, test_prefix)

    @property
    def identity(self) -> str:
        return self._identity

    def last_sequence(self, producer_id: str) -> int:
        producer = self._ingest.producers.get(producer_id)
        return producer.sequence if producer is not None else 0

    def experiments(self) -> dict[str, Experiment]:
        return self._ingest.experiments

    def put_experiment(self, experiment: Experiment) -> None:
        self._ingest.put_experiment(experiment)

    # ---- lifecycle ------------------------------------------------------------------------

    def delete_test(self, test_id: str) -> int:
        return self._ingest.remove({"delete_test": test_id})  # also a test with no stored event: its plan, its quarantine

    def erase_user(self, user_id: str, tests: Sequence[str] | None = None) -> int:
        """Removes the user's events (of `tests`, or every one) from queries at once, and from
        disk before it returns: a snapshot without them, every older snapshot and log segment
        deleted (Persistence.purge)."""
        ingest = self._ingest
        with self._erasing:  # one at a time: each purge covers its own erasure
            if self._persistence is not None:
                self._persistence.will_purge()
            # The id is in this log record until the purge below deletes the segment, with the
            # events themselves (a code would not do: codes taken by batches never logged make
            # replay number users differently).
            removed = ingest.remove({"erase_user": user_id, **({"tests": list(tests)} if tests else {})})
            if self._persistence is not None:
                try:
                    self._persistence.purge()
                except AbstreamError as error:  # a full disk: its snapshot's error alone says nothing was erased
                    pending = (f"the user is erased from queries and from memory; erasing it from disk is pending, "
                               f"tried again every minute and at the next start: {error}")
                    if isinstance(error, ResourceExhausted):
                        raise ResourceExhausted(pending, error.retry_after) from error
                    raise Unavailable(pending, SNAPSHOT_RETRY_SECONDS) from error
        return removed

    def retain_quarantine(self, horizons: dict[str, int], others: int | None) -> int:
        """Removes quarantined events received before their test's horizon (ns), logged when any
        is due (the sweep asks every minute), with the horizons of the tests it may touch only."""
        due, tests = self._ingest.quarantine.received_before(horizons, others)
        if not due:
            return 0
        return self._ingest.remove({"quarantine_horizons": {t: h for t, h in horizons.items() if t in tests},
                                    "quarantine_others": others})

    def retain(self, horizons: dict[str, int]) -> int:
        """Removes each test's events older than its horizon (ns), if it has any."""
        ingest, view = self._ingest, self._ingest.view
        tail = view.tail
        due = {}
        for test_id, horizon in horizons.items():
            code = ingest.tests.code(test_id)
            partition = view.partitions.get(code) if code is not None else None
            if code is not None and ((partition is not None and partition.first_ns < horizon)
                                     or bool(np.any((tail["test"] == code) & (tail["timestamp"] < horizon)))):
                due[test_id] = horizon
        return ingest.remove({"horizons": due}) if due else 0

    # ---- operations -----------------------------------------------------------------------

    def snapshot(self) -> SnapshotInfo:
        """Writes a snapshot now and returns once it is durable."""
        if self._persistence is None:
            raise AbstreamError("this store has no data directory to snapshot to")
        return self._persistence.snapshot()

    def between_steps(self, wait: Callable[[], None]) -> None:
        self._ingest.between_steps = wait

    def maintain(self) -> None:
        """Periodic work (once a second): a snapshot when one is due; Unavailable once the log
        or a seal has failed (the server then says NOT_SERVING)."""
        self._ingest.check_sealing()
        if self._persistence is not None:
            if (wal := self._ingest.wal) is not None and wal.failure is not None:
                raise wal.refusal()
            self._persistence.maybe_snapshot()
            if self._erasing.acquire(blocking=False):  # an erasure under way purges itself
                try:
                    self._persistence.maybe_purge()
                finally:
                    self._erasing.release()

    def close(self, final_snapshot: bool = True) -> None:
        """Flushes everything: a last snapshot (so a restart replays nothing), then the log."""
        if self._persistence is not None:
            self._persistence.close(final_snapshot)
        self._ingest.close()

    @property
    def event_count(self) -> int:
        return self._ingest.event_count

    @property
    def nbytes(self) -> int:
        """Bytes held by stored events and dictionaries (not counting the allocator's slack)."""
        return self._ingest.nbytes

    @property
    def unsealed_events(self) -> int:
        """Events in the tail, not yet sealed into their tests' parts: every query scans them."""
        return self._ingest.view.tail_rows

    @property
    def last_snapshot_at(self) -> float:
        return self._persistence.last_snapshot_at if self._persistence else time.monotonic()

    def gauges(self) -> list[Gauge]:
        wal = self._persistence.wal_dir if self._persistence else None
        return [
            Gauge("abstream_stored_events", "Events held", lambda: self.event_count),
            Gauge("abstream_stored_bytes", "Bytes the store's arrays and dictionaries hold", lambda: self.nbytes),
            Gauge("abstream_snapshot_age_seconds", "Seconds since the last snapshot was written",
                  lambda: time.monotonic() - self.last_snapshot_at),
            Gauge("abstream_snapshot_failures", "Snapshots that could not be written (a full disk) since the start",
                  lambda: self._persistence.snapshot_failures if self._persistence else 0),
            Gauge("abstream_wal_bytes", "Size of the write-ahead log on disk",
                  lambda: sum(p.stat().st_size for p in Path(wal).glob("*.log")) if wal and wal.is_dir() else 0),
        ]
