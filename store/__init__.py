"""The columnar event store: dictionary-encoded Arrow parts per test, aggregated with numpy.

It knows nothing of gRPC or protobuf, so it can be embedded, benchmarked and tested on its own.
"""

from abstream.store.analysis import Analysis, AnalysisOptions
from abstream.store.errors import DeadlineExceeded, InvalidArgument, StoreError, Unavailable
from abstream.store.queries import (
    Dimension,
    Filters,
    Interval,
    Metrics,
    QueryStats,
    SegmentRow,
    SegmentsQuery,
    SegmentsResult,
    SummaryQuery,
    SummaryResult,
    SummaryRow,
    TestInfo,
    TimeseriesQuery,
    TimeseriesResult,
    TimeseriesRow,
)
from abstream.store.schema import EVENT_SCHEMA, Rejection
from abstream.store.store import Durability, EventStore, IngestResult, PreparedBatch, QuarantinedEvent, RecoveryError

__all__ = [
    "DeadlineExceeded",
    "Analysis",
    "AnalysisOptions",
    "EVENT_SCHEMA",
    "Dimension",
    "Durability",
    "EventStore",
    "Filters",
    "IngestResult",
    "PreparedBatch",
    "InvalidArgument",
    "Interval",
    "Metrics",
    "QuarantinedEvent",
    "QueryStats",
    "RecoveryError",
    "Rejection",
    "SegmentRow",
    "SegmentsQuery",
    "SegmentsResult",
    "StoreError",
    "SummaryQuery",
    "SummaryResult",
    "SummaryRow",
    "TestInfo",
    "TimeseriesQuery",
    "TimeseriesResult",
    "TimeseriesRow",
    "Unavailable",
]
