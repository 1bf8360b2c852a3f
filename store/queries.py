"""Query parameters and results: frozen dataclasses, columnar inside so large results stay cheap."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from abstream.store.analysis import Analysis, AnalysisOptions
from abstream.store.schema import NS_PER_SECOND
from abstream.store.validate import check_query_string

_MINUTE = 60 * NS_PER_SECOND
#: Weeks start on Monday: 1969-12-29T00:00:00Z, the Monday before the Unix epoch.
_MONDAY_ORIGIN_NS = -3 * 24 * 3600 * NS_PER_SECOND


class Dimension(enum.Enum):
    """What Segments splits variants by; the value is the stored column."""

    DEVICE = "device"
    COUNTRY = "country"
    EVENT_TYPE = "event_type"


class Interval(enum.Enum):
    """Timeseries bucket width, as (width, alignment origin) in ns, UTC."""

    MINUTE = (_MINUTE, 0)
    HOUR = (60 * _MINUTE, 0)
    DAY = (24 * 60 * _MINUTE, 0)
    WEEK = (7 * 24 * 60 * _MINUTE, _MONDAY_ORIGIN_NS)

    @property
    def width_ns(self) -> int:
        return self.value[0]

    @property
    def origin_ns(self) -> int:
        return self.value[1]


@dataclass(frozen=True)
class Filters:
    """Equality filters; None means any value (an empty string is a value)."""

    device: str | None = None
    country: str | None = None
    event_type: str | None = None

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for name in ("device", "country", "event_type")
                if (value := getattr(self, name)) is not None]

    def check(self) -> None:
        for name, value in self.items():
            check_query_string(f"filters.{name}", value)


@dataclass(frozen=True)
class SummaryQuery:
    """One test's metrics per variant, over [start_ns, end_ns] (None = unbounded)."""

    test_id: str
    start_ns: int | None = None
    end_ns: int | None = None
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    deadline: float | None = None  # time.monotonic() after which the answer is no longer wanted


@dataclass(frozen=True)
class SegmentsQuery:
    test_id: str
    dimension: Dimension
    start_ns: int | None = None
    end_ns: int | None = None
    filters: Filters = field(default_factory=Filters)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    deadline: float | None = None


@dataclass(frozen=True)
class TimeseriesQuery:
    test_id: str
    interval: Interval
    start_ns: int | None = None
    end_ns: int | None = None
    cumulative: bool = False
    filters: Filters = field(default_factory=Filters)
    deadline: float | None = None


@dataclass(frozen=True)
class Metrics:
    """One group's metrics; the rates are full precision and 0 when there are no users."""

    users: int
    conversions: int
    conversion_rate: float
    total_revenue: float
    revenue_per_user: float
    events: int
    converted_users: int
    user_conversion_rate: float


@dataclass(frozen=True)
class MetricColumns:
    """Metrics of many groups as parallel arrays (one entry per result row)."""

    events: np.ndarray
    conversions: np.ndarray
    total_revenue: np.ndarray
    users: np.ndarray
    converted_users: np.ndarray

    @staticmethod
    def _per_user(values: np.ndarray, users: np.ndarray) -> np.ndarray:
        return np.divide(values, users, out=np.zeros(len(users), dtype=np.float64), where=users > 0)

    @property
    def conversion_rate(self) -> np.ndarray:
        return self._per_user(self.conversions, self.users)

    @property
    def revenue_per_user(self) -> np.ndarray:
        return self._per_user(self.total_revenue, self.users)

    @property
    def user_conversion_rate(self) -> np.ndarray:
        return self._per_user(self.converted_users, self.users)

    def __len__(self) -> int:
        return len(self.events)

    def take(self, index: np.ndarray) -> MetricColumns:
        return MetricColumns(**{name: getattr(self, name)[index] for name in _COUNT_COLUMNS})

    def columns(self) -> dict[str, np.ndarray]:
        """Every metric, in the order of `Metrics`."""
        return {name: getattr(self, name) for name in Metrics.__dataclass_fields__}

    def rows(self) -> list[Metrics]:
        cols = [getattr(self, name).tolist() for name in Metrics.__dataclass_fields__]
        return [Metrics(*values) for values in zip(*cols)]


_COUNT_COLUMNS = ("events", "conversions", "total_revenue", "users", "converted_users")


@dataclass(frozen=True)
class QueryStats:
    events_scanned: int
    elapsed_ns: int


@dataclass(frozen=True)
class SummaryRow:
    variant: str
    metrics: Metrics


@dataclass(frozen=True)
class SummaryResult:
    test_id: str
    variants: list[str]
    metrics: MetricColumns
    stats: QueryStats
    analysis: Analysis | None = None

    def rows(self) -> list[SummaryRow]:
        return [SummaryRow(v, m) for v, m in zip(self.variants, self.metrics.rows())]

    def to_arrow(self) -> pa.Table:
        return pa.table({"variant": self.variants, **self.metrics.columns()})


@dataclass(frozen=True)
class SegmentRow:
    variant: str
    segment: str
    metrics: Metrics


@dataclass(frozen=True)
class SegmentsResult:
    test_id: str
    dimension: Dimension
    variants: list[str]
    segments: list[str]
    metrics: MetricColumns
    stats: QueryStats
    analyses: list[tuple[str, Analysis]] = field(default_factory=list)  # (segment, its analysis)

    def rows(self) -> list[SegmentRow]:
        return [SegmentRow(v, s, m) for v, s, m in zip(self.variants, self.segments, self.metrics.rows())]

    def to_arrow(self) -> pa.Table:
        return pa.table({"variant": self.variants, "segment": self.segments, **self.metrics.columns()})


@dataclass(frozen=True)
class TimeseriesRow:
    bucket_start_ns: int
    variant: str
    metrics: Metrics


@dataclass(frozen=True)
class TimeseriesResult:
    test_id: str
    interval: Interval
    cumulative: bool
    bucket_start_ns: np.ndarray
    variants: list[str]
    metrics: MetricColumns
    stats: QueryStats

    def rows(self) -> list[TimeseriesRow]:
        return [TimeseriesRow(b, v, m) for b, v, m in
                zip(self.bucket_start_ns.tolist(), self.variants, self.metrics.rows())]

    def to_arrow(self) -> pa.Table:
        return pa.table({
            "bucket_start": pa.array(self.bucket_start_ns, pa.timestamp("ns", tz="UTC")),
            "variant": self.variants,
            **self.metrics.columns(),
        })


@dataclass(frozen=True)
class TestInfo:
    test_id: str
    variants: list[str]
    events: int
    users: int
    first_event_ns: int
    last_event_ns: int
