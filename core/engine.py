"""The engine interface: what the core asks of whatever stores and aggregates the events.

Two implementations: the embedded Arrow engine (store/, one process) and the ClickHouse cluster
engine (clickhouse/, any number of stateless gateways). The core talks to `Engine` and nothing
else; it validates batches before an engine sees them and runs the analysis on the per-user
sufficient statistics an engine returns, so both answer alike.

A new engine implements these methods and is chosen in service/server.py (`open_engine`); the
same test suite runs on every engine (tests/conftest.py, the `engine` fixture).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import pyarrow as pa
from abstream.core import events
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


@dataclass(frozen=True)
class Gauge:
    """A figure an engine offers to the metrics endpoint, read when scraped."""

    name: str
    help: str
    read: Callable[[], float]


class Engine(Protocol):
    """Ingest runs in three steps so that a stream can pipeline: `prepare` (CPU work, beside other
    batches), `apply` (the ordering point: once it returns the batch is visible to the very next
    query), `commit` (returns once the batch is as durable as promised; the ack waits for it).
    Queries return per-group metrics with the moments of the per-user values (`GroupStats`)."""

    name: str
    #: Whether one batch may hold several requests of one producer (ValidatedBatch.first_sequence):
    #: the engine then refuses such a batch unless all of them or none were applied before.
    groups_producer_batches: bool
    #: Whether `experiments()` may wait on the network (the core then reads it in a thread, never
    #: on the event loop every transport shares).
    remote_plans: bool

    def prepare(self, batch: ValidatedBatch) -> Any: ...

    def apply(self, prepared: Any) -> IngestResult: ...

    def commit(self, result: IngestResult) -> None: ...

    def summary(self, q: SummaryQuery) -> GroupStats:
        """Per variant; also the distinct users and those in several variants (left out of the
        groups when q.analysis.exclude_multi_variant_users)."""

    def segments(self, q: SegmentsQuery) -> GroupStats: ...

    def timeseries(self, q: TimeseriesQuery) -> TimeseriesResult: ...

    def count_events(self, test_id: str, start_ns: int | None, end_ns: int | None) -> int:
        """Events of a test in [start_ns, end_ns] (None: unbounded)."""

    def list_tests(self) -> list[TestInfo]: ...

    def quarantine(self, test_id: str, limit: int, test_prefix: str) -> tuple[list[QuarantinedEvent], int]: ...

    def delete_test(self, test_id: str) -> int:
        """Removes a test's events, quarantine entries and plan; returns once durable."""

    def erase_user(self, user_id: str, tests: Sequence[str] | None) -> int:
        """Removes a user's events (of `tests`, or all) from queries and from every copy kept."""

    def retain(self, horizons: dict[str, int]) -> int:
        """Removes each named test's events older than its horizon (ns)."""

    def retain_quarantine(self, horizons: dict[str, int], others: int | None) -> int:
        """Removes quarantined events received before their test's horizon (ns): `horizons[test
        id]`, else `others` (None: kept); how many."""

    def export(self, test_id: str, start_ns: int | None, end_ns: int | None) -> Iterator[pa.Table]:
        """A test's events as stored (Event field names), a piece at a time, never all at once."""

    def last_sequence(self, producer_id: str) -> int:
        """The sequence of the producer's last applied batch (0: none), where a source that
        numbers its batches by its own positions (a Kafka offset, a file's batch) resumes."""

    @property
    def identity(self) -> str:
        """Names the data this engine stores into: the same for every process over the same data
        (a Kafka group's servers each with a store of their own tell their commits apart by it)."""

    def experiments(self) -> dict[str, Experiment]:
        """Every test's plan, by test id."""

    def put_experiment(self, experiment: Experiment) -> None:
        """Stores a plan (a new one, or a test's replaced); returns once it is durable."""

    def snapshot(self) -> SnapshotInfo: ...

    def between_steps(self, wait: Callable[[], None]) -> None:
        """`wait` is called by the engine's background work (sealing, merging) between its steps,
        and returns once no query runs (or after a bounded wait): the core's, so that a query
        gets the core and the GIL it needs while ingest runs."""

    def maintain(self) -> None:
        """Periodic work, once a second (the embedded engine: a snapshot when one is due)."""

    def gauges(self) -> list[Gauge]: ...

    def close(self) -> None: ...


def append(engine: Engine, batch: pa.Table | pa.RecordBatch, producer_id: str = "", sequence: int = 0,
           refuse: Sequence[Rejection] = (), now_ns: int | None = None) -> IngestResult:
    """Checks a batch (event field names) and has `engine` store its valid events, durably: what
    the core does for a transport's batch, for callers that embed an engine."""
    now = time.time_ns() if now_ns is None else now_ns
    table, rejections = events.check(batch, now, refuse)
    result = engine.apply(engine.prepare(ValidatedBatch(table, rejections, now, producer_id, sequence)))
    engine.commit(result)
    return result
