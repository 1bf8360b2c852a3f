"""What crosses the engine seam: queries, batches and results, as frozen dataclasses.

Columnar inside, so that large results stay cheap. An engine answers a query with per-group
metrics and the per-user sufficient statistics of each group (`GroupStats`); the core runs the
analysis on those (core/analysis.py), whichever engine produced them.
"""

from __future__ import annotations

import enum
import math
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from abstream import stats
from abstream.core.errors import InvalidArgument
from abstream.core.events import MAX_DISTINCT, NS_PER_SECOND, Rejection, check_query_string

_MINUTE = 60 * NS_PER_SECOND
#: Weeks start on Monday: 1969-12-29T00:00:00Z, the Monday before the Unix epoch.
_MONDAY_ORIGIN_NS = -3 * 24 * 3600 * NS_PER_SECOND

#: Per-user metrics compared between variants.
METRICS = ("conversion", "revenue_per_user", "conversions_per_user", "revenue_per_conversion")
#: Metrics over each user's sessions (distinct session ids), compared when asked
#: (AnalysisOptions.session_metrics): reading session ids costs more than the rest of a query.
SESSION_METRICS = ("conversions_per_session", "events_per_session")
#: The metric that is a ratio of two per-user totals (revenue over conversions).
RATIO_METRIC = METRICS[3]
#: UserMoments.m2's entry for the centered co-moment of each user's revenue and conversions,
#: the covariance term of revenue per conversion (a ratio of the two per-user totals).
RATIO_COMOMENT = "revenue_conversions"
#: Each ratio of two per-user totals: (numerator, denominator, their co-moment in UserMoments.m2,
#: what an arm without the denominator lacks).
RATIOS = {RATIO_METRIC: ("revenue_per_user", "conversions_per_user", RATIO_COMOMENT, "conversions"),
          "conversions_per_session": ("conversions_per_user", "sessions_per_user", "conversions_sessions", "sessions"),
          "events_per_session": ("events_per_user", "sessions_per_user", "events_sessions", "sessions")}
#: UserMoments' key of capped revenue per user: what revenue_per_user is compared on when present
#: (revenue per conversion keeps the revenue as it is).
CAPPED = "capped_revenue_per_user"
CORRECTIONS = ("none", "holm", "benjamini_hochberg")


class Dimension(enum.Enum):
    """What Segments splits variants by; the value is the event field."""

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
class RevenueCap:
    """Capping (winsorization) of revenue per user, for its comparison: each user's revenue above
    a threshold counts as the threshold. The threshold is a fixed `value`, or the `percentile` of
    revenue per user over the users of every arm pooled (never per arm, which would cap arms
    differently), of the users with non-zero revenue only when `nonzero_only`."""

    percentile: float = 0.0  # 0 < p < 100, or 0 with a value
    value: float = 0.0  # a fixed threshold above 0, or 0 with a percentile
    nonzero_only: bool = False

    def check(self) -> None:
        if bool(self.percentile) == bool(self.value):
            raise InvalidArgument("revenue_cap", "give a percentile (0 to 100, exclusive) or a fixed value, one of them")
        if self.percentile and not 0 < self.percentile < 100:
            raise InvalidArgument("revenue_cap.percentile", f"must be between 0 and 100 (exclusive), got {self.percentile}")
        if self.value and not (self.value > 0 and math.isfinite(self.value)):
            raise InvalidArgument("revenue_cap.value", f"must be a finite number above 0, got {self.value}")
        if self.value and self.nonzero_only:
            raise InvalidArgument("revenue_cap.nonzero_only", "applies to a percentile, not to a fixed value")

    def rank(self, n: int) -> int:
        """The threshold's rank among n pooled values, from 1 (the smallest): the smallest value
        at or above which `percentile`% of them lie (the inverted CDF), in exact arithmetic."""
        return min(max(math.ceil(Fraction(repr(self.percentile)) * n / 100), 1), n)


@dataclass(frozen=True)
class CapApplied:
    """The capping a Summary's revenue per user got: its threshold and whom it touched."""

    cap: RevenueCap
    threshold: float  # NaN when no user is pooled
    pooled_users: int  # the users the percentile was taken over
    capped_users: int  # users whose revenue was above the threshold


@dataclass(frozen=True)
class AnalysisOptions:
    """How to compare variants; the defaults are what a request that sets nothing gets."""

    control_variant: str = ""  # empty: "control" if present, else the first variant in sort order
    confidence: float = 0.95
    sequential: bool = False
    n_star: float = 5000.0  # total users the confidence sequence is tuned for
    prior_mean: float | None = None
    prior_variance: float | None = None
    expected_weights: dict[str, float] = field(default_factory=dict)  # empty: equal
    srm_threshold: float = 0.001
    correction: str = "none"
    exclude_multi_variant_users: bool = False  # Summary: users seen in several variants left out
    relative_interval: str = "delta"  # or "fieller" (stats.RELATIVE_INTERVALS)
    guardrails: dict[str, float] = field(default_factory=dict)  # metric -> non-inferiority margin (relative)
    metric_event_type: str = ""  # conversions and revenue counted from this event type only; users from all
    revenue_cap: RevenueCap | None = None  # Summary: revenue per user capped for its comparison
    session_metrics: bool = False  # SESSION_METRICS compared too
    # The experiment's plan's, where the caller's (above) are empty: a planned control with no
    # users in the query's scope (a filter, a range) leaves nothing compared, and a variant the
    # plan has no share for is left out of the sample ratio check and said in health; the
    # caller's own are refused then, naming them.
    planned_control: str = ""
    planned_weights: dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        check_query_string("control_variant", self.control_variant)
        if len(self.expected_weights) > MAX_DISTINCT["variant"]:
            raise InvalidArgument("expected_weights", f"has {len(self.expected_weights):,} entries; a test has at most "
                                                      f"{MAX_DISTINCT['variant']:,} variants")
        for variant in self.expected_weights:
            check_query_string("expected_weights", variant)
        for metric, margin in self.guardrails.items():
            if metric not in METRICS + SESSION_METRICS:
                raise InvalidArgument("guardrails", f"{metric[:32]!r} is not a metric: use "
                                                    f"{', '.join(METRICS + SESSION_METRICS)}")
            if metric in SESSION_METRICS and not self.session_metrics:
                raise InvalidArgument("guardrails", f"{metric} is a session metric: ask for session_metrics too")
            if not 0 < margin <= 1:
                raise InvalidArgument("guardrails", f"the margin of {metric} must be a share above 0 and at most 1 "
                                                    f"(0.02: at most 2% worse), got {margin}")
        check_query_string("metric_event_type", self.metric_event_type)
        if self.revenue_cap is not None:
            self.revenue_cap.check()
        if self.relative_interval not in stats.RELATIVE_INTERVALS:
            raise InvalidArgument("relative_interval", f"must be {' or '.join(stats.RELATIVE_INTERVALS)}, not "
                                                       f"{self.relative_interval[:32]!r}")
        if not 0 < self.confidence < 1:
            raise InvalidArgument("confidence_level", f"must be between 0 and 1 (exclusive), got {self.confidence}")
        if 1 - self.confidence == 1:  # its intervals would be of 1 - confidence = 1: sequential ones divided by 0
            raise InvalidArgument("confidence_level", f"must be above 1e-16, got {self.confidence}")
        if self.guardrails and self.sequential and self.confidence <= 0.5:
            raise InvalidArgument("confidence_level", f"must be above 0.5 for sequential guardrails (their bound is "
                                                      f"one side of the sequence at 2 (1 - confidence)), got "
                                                      f"{self.confidence}")
        if not (1 <= self.n_star < math.inf):
            raise InvalidArgument("sequential_tuning", f"must be a number of users, 1 or more, got {self.n_star}")
        if (self.prior_mean is None) != (self.prior_variance is None):
            raise InvalidArgument("prior", "needs both a mean and a variance")
        if self.prior_variance is not None and not (sys.float_info.min <= self.prior_variance < math.inf
                                                    and math.isfinite(self.prior_mean)):
            raise InvalidArgument("prior", f"variance must be positive (at least {sys.float_info.min:g}) and both "
                                           "values finite")
        for variant, weight in self.expected_weights.items():
            if not (weight > 0 and math.isfinite(weight)):
                raise InvalidArgument("expected_weights", f"weight of {variant!r} must be positive, got {weight}")
        if not 0 < self.srm_threshold < 1:
            raise InvalidArgument("srm_threshold", f"must be between 0 and 1 (exclusive), got {self.srm_threshold}")
        if self.correction not in CORRECTIONS:
            raise InvalidArgument("correction", f"must be one of {', '.join(CORRECTIONS)}")


# ---- queries ------------------------------------------------------------------------------

def check_range(test_id: str, start_ns: int | None, end_ns: int | None) -> None:
    """What any engine would refuse of a query's test and range, refused before one is asked."""
    if not test_id:
        raise InvalidArgument("test_id", "is required")
    check_query_string("test_id", test_id)
    if start_ns is not None and end_ns is not None and end_ns < start_ns:
        raise InvalidArgument("end_time", "is before start_time")


@dataclass(frozen=True)
class SummaryQuery:
    """One test's metrics per variant, over [start_ns, end_ns] (None = unbounded)."""

    test_id: str
    start_ns: int | None = None
    end_ns: int | None = None
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    deadline: float | None = None  # time.monotonic() after which the answer is no longer wanted
    filters: Filters = field(default_factory=Filters)

    def check(self) -> None:
        self.analysis.check()
        check_range(self.test_id, self.start_ns, self.end_ns)
        self.filters.check()


@dataclass(frozen=True)
class SegmentsQuery:
    test_id: str
    dimension: Dimension
    start_ns: int | None = None
    end_ns: int | None = None
    filters: Filters = field(default_factory=Filters)
    analysis: AnalysisOptions = field(default_factory=AnalysisOptions)
    deadline: float | None = None

    def check(self) -> None:
        self.analysis.check()
        if self.analysis.revenue_cap is not None:
            raise InvalidArgument("revenue_cap", "applies to Summary: a segment's share of a user's revenue is not "
                                                 "what the threshold is taken over")
        if self.analysis.exclude_multi_variant_users:
            raise InvalidArgument("exclude_multi_variant_users", "applies to Summary: a segment's users are not "
                                                                 "told apart by the variants they saw elsewhere")
        check_range(self.test_id, self.start_ns, self.end_ns)
        self.filters.check()

    def check_groups(self, segments: int, variants: int) -> None:
        """Refuses, before they are computed, more (variant, segment) groups than an answer may
        have (engines call it once they know both): each group is one more analysis."""
        if segments * variants > MAX_SEGMENT_GROUPS:
            raise InvalidArgument("dimension", f"{segments:,} values of {self.dimension.value} x {variants:,} variants "
                                               f"would be {segments * variants:,} groups, more than the "
                                               f"{MAX_SEGMENT_GROUPS:,} a Segments answer may have: filter the "
                                               "test down or split it by another dimension")


#: The most (variant, segment) groups of a Segments answer, each compared by an analysis of its
#: own (~80 µs): 100,000 of them take seconds, and a dimension with a value per user would take
#: hours.
MAX_SEGMENT_GROUPS = 100_000
#: The most (bucket, variant) points a Timeseries is computed over ((age, variant) points by
#: exposure): engines compute every pair, so a test that gained a variant every minute grew its
#: answer with the square of its events (600 events: 180,000 points, and 14 s with lifts).
MAX_SERIES_POINTS = 2_000_000
#: The most with lifts, where each point is an analysis of its own (~80 µs).
MAX_LIFT_POINTS = 100_000
#: The most an HTTP answer has: written whole, a row of JSON took ~900 bytes at its peak, and an
#: answer of MAX_SERIES_POINTS rows ~1.8 GB.
MAX_HTTP_POINTS = 200_000


@dataclass(frozen=True)
class TimeseriesQuery:
    test_id: str
    interval: Interval
    start_ns: int | None = None
    end_ns: int | None = None
    cumulative: bool = False
    filters: Filters = field(default_factory=Filters)
    deadline: float | None = None
    time_zone: str = ""  # IANA name: day and week buckets start at its midnights; empty: UTC
    lift: AnalysisOptions | None = None  # with cumulative: each bucket's lifts, by confidence sequences
    since_first_exposure: bool = False  # with lift: buckets are ages since each user's first event
    most_points: int = 0  # the most the caller takes (HTTP: MAX_HTTP_POINTS); 0: what the kind may have

    def check_points(self, periods: int, variants: int) -> None:
        """Refuses, before they are computed, more (bucket or age, variant) points than an
        answer may have (engines call it once they know both)."""
        most = MAX_SERIES_POINTS if self.lift is None else MAX_LIFT_POINTS
        most = min(most, self.most_points) if self.most_points else most
        if periods * variants > most:
            what = "ages" if self.since_first_exposure else "buckets"
            raise InvalidArgument("interval", f"{periods:,} {what} x {variants:,} variants would be "
                                              f"{periods * variants:,} points, more than the {most:,} a series "
                                              f"{'with lifts ' if self.lift is not None else ''}may have: ask for a "
                                              "wider interval or a shorter range")

    def check(self) -> None:
        check_range(self.test_id, self.start_ns, self.end_ns)
        self.filters.check()
        if self.lift is not None:
            self.lift.check()
            if not self.cumulative and not self.since_first_exposure:
                raise InvalidArgument("lift", "is the cumulative lift: ask for cumulative buckets (or for ages since "
                                              "first exposure)")
            for name in ("revenue_cap", "exclude_multi_variant_users", "metric_event_type", "guardrails",
                         "session_metrics"):
                if getattr(self.lift, name):
                    raise InvalidArgument(f"analysis.{name}", "applies to Summary, not to the lift over time")
        if self.since_first_exposure:
            if self.lift is None or self.cumulative:
                raise InvalidArgument("since_first_exposure", "is a lift by each user's age in the test: ask for "
                                                              "the lift, not cumulative buckets")
            if self.time_zone or self.interval is Interval.MINUTE:
                raise InvalidArgument("since_first_exposure", "ages are hours, days or weeks, in no time zone")
        if self.time_zone:
            from abstream.core.timezones import zone

            zone(self.time_zone)
            if self.interval not in (Interval.DAY, Interval.WEEK):
                raise InvalidArgument("time_zone", "applies to day and week buckets; minute and hour buckets are UTC's")


# ---- metrics ------------------------------------------------------------------------------

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
        return MetricColumns(**{name: getattr(self, name)[index] for name in COUNT_COLUMNS})

    def columns(self) -> dict[str, np.ndarray]:
        """Every metric, in the order of `Metrics`."""
        return {name: getattr(self, name) for name in Metrics.__dataclass_fields__}

    def rows(self) -> list[Metrics]:
        cols = [getattr(self, name).tolist() for name in Metrics.__dataclass_fields__]
        return [Metrics(*values) for values in zip(*cols)]


COUNT_COLUMNS = ("events", "conversions", "total_revenue", "users", "converted_users")


def about_means(n: np.ndarray, sum_x: np.ndarray, sum_y: np.ndarray, qx: np.ndarray, qy: np.ndarray, qxy: np.ndarray,
                center_x: np.ndarray, center_y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sums of squares and the co-moment about the means, from those about centers c (per
    variant, the last axis): sum (x - mean)^2 = sum (x - c)^2 - n (mean - c)^2."""
    mx = np.divide(sum_x, n, out=np.zeros(n.shape), where=n > 0) - center_x
    my = np.divide(sum_y, n, out=np.zeros(n.shape), where=n > 0) - center_y
    return np.maximum(qx - n * mx * mx, 0), np.maximum(qy - n * my * my, 0), qxy - n * mx * my


@dataclass(frozen=True)
class UserMoments:
    """Per group: users, and per metric the sum and centered sum of squares of per-user values:
    the sufficient statistics of the comparisons (sums combine across shards; the centered
    squares combine with the parallel-variance formula)."""

    users: np.ndarray
    sums: dict[str, np.ndarray]
    m2: dict[str, np.ndarray]

    def take(self, index: np.ndarray) -> UserMoments:
        return UserMoments(self.users[index], {k: v[index] for k, v in self.sums.items()},
                           {k: v[index] for k, v in self.m2.items()})

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics these moments compare: the session metrics where sessions were counted."""
        return METRICS + SESSION_METRICS if "sessions_per_user" in self.sums else METRICS

    def arms(self, metric: str, index: np.ndarray) -> list[stats.Arm]:
        out = []
        for i in index.tolist():
            n = int(self.users[i])
            if metric in RATIOS:
                x, y, co, _ = RATIOS[metric]
                out.append(stats.ratio_arm(n, float(self.sums[x][i]), float(self.sums[y][i]), float(self.m2[x][i]),
                                           float(self.m2[y][i]), float(self.m2[co][i])))
            elif metric == "conversion":
                out.append(stats.binomial_arm(n, int(self.sums[metric][i])))
            else:
                key = CAPPED if metric == "revenue_per_user" and CAPPED in self.sums else metric
                mean = float(self.sums[key][i]) / n if n else 0.0
                out.append(stats.Arm(n, mean, float(self.m2[key][i]) / (n - 1) if n > 1 else 0.0))
        return out

    @staticmethod
    def of(users: np.ndarray, converted: np.ndarray, revenue: np.ndarray, conversions: np.ndarray,
           m2_revenue: np.ndarray, m2_conversions: np.ndarray, comoment: np.ndarray) -> UserMoments:
        """Each group's users, converted users, sums of revenue and conversions, their centered
        sums of squares and co-moment (arrays of any shape, one value per group: flattened)."""
        def flat(a: np.ndarray, dtype=None) -> np.ndarray:
            a = np.asarray(a).reshape(-1)
            return a.astype(dtype, copy=False) if dtype is not None else a

        return UserMoments(flat(users, np.int64),
                           {"conversion": flat(converted, np.int64), "revenue_per_user": flat(revenue),
                            "conversions_per_user": flat(conversions, np.int64)},
                           {"revenue_per_user": flat(m2_revenue), "conversions_per_user": flat(m2_conversions),
                            RATIO_COMOMENT: flat(comoment)})

    def capped(self, sums: np.ndarray, m2: np.ndarray) -> UserMoments:
        """These moments with capped revenue per user beside the revenue as it is."""
        return UserMoments(self.users, {**self.sums, CAPPED: sums}, {**self.m2, CAPPED: m2})

    def with_sessions(self, events: np.ndarray, sessions: np.ndarray, m2_events: np.ndarray, m2_sessions: np.ndarray,
                      conversions_sessions: np.ndarray, events_sessions: np.ndarray) -> UserMoments:
        """These moments with each group's sums of per-user events and sessions, their centered
        sums of squares, and their co-moments with sessions (SESSION_METRICS' delta method)."""
        return UserMoments(self.users, {**self.sums, "events_per_user": events, "sessions_per_user": sessions},
                           {**self.m2, "events_per_user": m2_events, "sessions_per_user": m2_sessions,
                            "conversions_sessions": conversions_sessions, "events_sessions": events_sessions})


@dataclass(frozen=True)
class QueryStats:
    events_scanned: int
    elapsed_ns: int


@dataclass(frozen=True)
class PowerQuery:
    """Users needed per variant to detect a relative lift of `mde`, from the test's baseline."""

    test_id: str
    mde: float
    power: float = 0.8
    alpha: float = 0.05
    control_variant: str = ""
    users_per_variant: int = 0  # for the detectable effect and power (0: the control's users so far)

    def check(self) -> None:
        check_range(self.test_id, None, None)
        check_query_string("control_variant", self.control_variant)
        if not (self.mde > 0 and math.isfinite(self.mde)):
            raise InvalidArgument("minimum_detectable_effect", f"must be a positive relative lift, got {self.mde}")
        if not 0 < self.power < 1:
            raise InvalidArgument("power", f"must be between 0 and 1 (exclusive), got {self.power}")
        if not 0 < self.alpha < 1:
            raise InvalidArgument("alpha", f"must be between 0 and 1 (exclusive), got {self.alpha}")


@dataclass(frozen=True)
class MetricPower:
    metric: str
    baseline_mean: float
    baseline_variance: float
    users_per_variant: int
    days: float
    message: str = ""
    at_users: int = 0
    detectable_effect: float = 0.0
    power: float = 0.0


@dataclass(frozen=True)
class PowerResult:
    test_id: str
    control_variant: str
    metrics: list[MetricPower]


# ---- what engines answer ------------------------------------------------------------------

@dataclass(frozen=True)
class GroupStats:
    """An engine's answer to Summary (a group per variant) or Segments (a group per variant and
    segment value, ordered by variant then segment): each group's metrics and user moments."""

    variants: list[str]
    segments: list[str] | None  # None for Summary
    metrics: MetricColumns
    moments: UserMoments
    stats: QueryStats
    users: int = 0  # Summary: distinct users in range, whatever their variant (before any exclusion)
    multi_variant_users: int = 0  # Summary: of them, those seen in more than one variant
    revenue_cap: CapApplied | None = None  # Summary with a cap: `moments` hold capped revenue as CAPPED


@dataclass(frozen=True)
class Experiment:
    """A test's plan: its control, planned split, start and stop, and what it tests."""

    test_id: str
    control_variant: str = ""
    split: dict[str, float] = field(default_factory=dict)
    start_ns: int | None = None
    stop_ns: int | None = None
    hypothesis: str = ""
    created_ns: int = 0
    updated_ns: int = 0
    retention_days: float | None = None  # its events are kept this long (None: the server's --retention-days)

    def check(self) -> None:
        check_range(self.test_id, None, None)
        if self.retention_days is not None and not (self.retention_days > 0 and math.isfinite(self.retention_days)):
            raise InvalidArgument("retention_days", f"must be positive, got {self.retention_days}")
        check_query_string("control_variant", self.control_variant)
        if len(self.split) > MAX_DISTINCT["variant"]:
            raise InvalidArgument("split", f"has {len(self.split):,} entries; a test has at most "
                                           f"{MAX_DISTINCT['variant']:,} variants")
        for variant, share in self.split.items():
            check_query_string("split", variant)
            if not (share > 0 and math.isfinite(share)):
                raise InvalidArgument("split", f"the share of {variant!r} must be positive, got {share}")
        if self.split and self.control_variant and self.control_variant not in self.split:
            raise InvalidArgument("split", f"has no share for the control {self.control_variant!r}")
        if self.start_ns is not None and self.stop_ns is not None and self.stop_ns < self.start_ns:
            raise InvalidArgument("stop_time", "is before the experiment's start_time")
        if len(self.hypothesis.encode()) > 4096:
            raise InvalidArgument("hypothesis", "is longer than 4,096 bytes")

    def to_json(self) -> dict:
        return {"test_id": self.test_id, "control_variant": self.control_variant, "split": self.split,
                "start_ns": self.start_ns, "stop_ns": self.stop_ns, "hypothesis": self.hypothesis,
                "created_ns": self.created_ns, "updated_ns": self.updated_ns, "retention_days": self.retention_days}

    @classmethod
    def from_json(cls, values: dict) -> Experiment:
        return cls(**values)


@dataclass(frozen=True)
class TestInfo:
    test_id: str
    variants: list[str]
    events: int
    users: int
    first_event_ns: int
    last_event_ns: int
    experiment: Experiment | None = None


@dataclass(frozen=True)
class QuarantinedEvent:
    """A rejected event as it was sent (event field names), with the reason."""

    received_ns: int
    index: int
    field: str
    message: str
    event: dict[str, Any]


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    events: int


# ---- ingest -------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodedBatch:
    """A request as its transport decoded it: its events (event field names), who sent it, and
    events its decoder refused already (a string that is not UTF-8 or too long to copy)."""

    table: pa.Table
    producer_id: str
    sequence: int
    refuse: list[Rejection]
    ipc: pa.Buffer | None = None  # the Arrow IPC stream the whole batch was read from, if it was
    origin: Sequence[str] | None = None  # where each event came from, said first in its rejection (Kafka, a file)


@dataclass(frozen=True)
class ValidatedBatch:
    """A batch as the core hands it to an engine: every event as it arrived (normalized), which
    were rejected and why (sorted by index), and who sent it."""

    table: pa.Table
    rejections: list[Rejection]
    received_ns: int
    producer_id: str = ""
    sequence: int = 0
    ipc: pa.Buffer | bytes | None = None  # the Arrow IPC stream the batch was read from, to log as is
    # Requests of one producer stored together carry sequences first_sequence..sequence (0: one request)
    first_sequence: int = 0

    @property
    def valid(self) -> np.ndarray:
        mask = np.ones(self.table.num_rows, dtype=bool)
        if self.rejections:
            mask[np.fromiter((r.index for r in self.rejections), dtype=np.int64, count=len(self.rejections))] = False
        return mask


@dataclass(frozen=True)
class IngestResult:
    """What became of one batch: how many events were stored, and why the others were not.

    `duplicate` means the producer's batch with this sequence was applied before (and is
    durable): nothing was stored this time. `token` is the engine's, for `commit`.
    """

    accepted: int
    rejections: list[Rejection]
    duplicate: bool = False
    token: Any = None


# ---- results ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricComparison:
    variant: str
    metric: str
    result: stats.Comparison
    adjusted_absolute_p: float
    adjusted_relative_p: float
    guardrail: stats.NonInferiority | None = None  # when the metric is a guardrail


@dataclass(frozen=True)
class Analysis:
    control_variant: str
    srm_p_value: float
    srm_flagged: bool
    comparisons: list[MetricComparison]
    revenue_cap: CapApplied | None = None


@dataclass(frozen=True)
class Health:
    """What the data say about how the experiment ran (core/analysis.py grades it)."""

    status: str  # "healthy", "warning", "unhealthy": the worst of the checks
    reasons: list[str]
    users: int
    multi_variant_users: int
    multi_variant_users_excluded: bool
    srm_p_value: float
    srm: str
    events_before_start: int
    future_events: int


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
    health: Health | None = None

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
    moments: UserMoments | None = None  # with lift: each row's cumulative user moments (the engine's)
    since_first_exposure: bool = False  # bucket_start_ns are then ages: k widths since each user's first event
    lifts: list[tuple[int, Analysis]] | None = None  # with lift: (bucket start, its analysis) (the core's)

    def rows(self) -> list[TimeseriesRow]:
        return [TimeseriesRow(b, v, m) for b, v, m in
                zip(self.bucket_start_ns.tolist(), self.variants, self.metrics.rows())]

    def to_arrow(self) -> pa.Table:
        return pa.table({
            "bucket_start": pa.array(self.bucket_start_ns, pa.timestamp("ns", tz="UTC")),
            "variant": self.variants,
            **self.metrics.columns(),
        })
