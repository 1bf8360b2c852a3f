"""The embedded engine: dictionary-encoded Arrow parts per test, aggregated with numpy.

It knows nothing of gRPC, HTTP or protobuf, so it can be embedded, benchmarked and tested on its
own; it implements the engine interface of core/engine.py.
"""

from abstream.core.errors import DeadlineExceeded, InvalidArgument, RecoveryError, Unavailable
from abstream.core.events import EVENT_SCHEMA, Rejection
from abstream.core.types import (
    Dimension,
    Filters,
    GroupStats,
    IngestResult,
    Interval,
    Metrics,
    QuarantinedEvent,
    QueryStats,
    SegmentsQuery,
    SummaryQuery,
    TestInfo,
    TimeseriesQuery,
    TimeseriesResult,
    ValidatedBatch,
)
from abstream.store.durability import Durability
from abstream.store.engine import EventStore
from abstream.store.ingest import PreparedBatch

__all__ = [
    "DeadlineExceeded",
    "Dimension",
    "Durability",
    "EVENT_SCHEMA",
    "EventStore",
    "Filters",
    "GroupStats",
    "IngestResult",
    "Interval",
    "InvalidArgument",
    "Metrics",
    "PreparedBatch",
    "QuarantinedEvent",
    "QueryStats",
    "RecoveryError",
    "Rejection",
    "SegmentsQuery",
    "SummaryQuery",
    "TestInfo",
    "TimeseriesQuery",
    "TimeseriesResult",
    "Unavailable",
    "ValidatedBatch",
]
