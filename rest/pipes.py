"""The pipes: the tutorial's `test_summary` exactly, and `test_segments`, `test_timeseries`,
`test_results` and `ab_test_events_quarantine` in its style. Each turns its parameters into a
core query and the answer into rows with ClickHouse types (what `meta` says).

`test_summary` is the tutorial's SQL:

    SELECT test_id, variant, count(DISTINCT user_id) AS users, countIf(conversion = 1) AS conversions,
           round(countIf(conversion = 1) / count(DISTINCT user_id), 4) AS conversion_rate,
           sum(revenue) AS total_revenue, round(sum(revenue) / count(DISTINCT user_id), 4) AS revenue_per_user
    FROM ab_test_events
    WHERE test_id = {{String(test_id, '')}}
      AND timestamp >= {{DateTime(start_date, '2023-01-01 00:00:00')}}
      AND timestamp <= {{DateTime(end_date, '2023-12-31 23:59:59')}}
    GROUP BY test_id, variant ORDER BY test_id, variant

Its `timestamp` is a DateTime, to the second: an `end_date` of 18:42:22 takes in an event at
18:42:22.700, so the range here ends at the last nanosecond of the end's second.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np
from abstream import stats
from abstream.clients.files import from_iso
from abstream.core.auth import Principal
from abstream.core.dataplane import Core
from abstream.core.errors import InvalidArgument, NotFound
from abstream.core.types import (
    MAX_HTTP_POINTS,
    METRICS,
    AnalysisOptions,
    Dimension,
    Interval,
    MetricColumns,
    RevenueCap,
    SegmentsQuery,
    SummaryQuery,
    TimeseriesQuery,
)

NS = 1_000_000_000
TUTORIAL_START = "2023-01-01 00:00:00"
TUTORIAL_END = "2023-12-31 23:59:59"
QUARANTINE_LIMIT = 10_000


@dataclass(frozen=True)
class Answer:
    """A pipe's result: columns (name, ClickHouse type), rows, and what it read."""

    columns: list[tuple[str, str]]
    rows: list[dict[str, Any]]
    rows_read: int = 0
    elapsed_s: float = 0.0


def round4(values: np.ndarray) -> np.ndarray:
    """ClickHouse's round(x, 4) of a Float64: x scaled, rounded half to even, scaled back."""
    return np.rint(values * 1e4) / 1e4


def parse_datetime(name: str, value: str) -> int:
    """A DateTime parameter ('YYYY-MM-DD HH:MM:SS', a 'T' allowed, or a date), UTC, in whole
    seconds since the epoch."""
    text = value.strip()
    try:
        moment = from_iso(text)
    except ValueError:
        raise InvalidArgument(name, f"{value[:64]!r} is not a DateTime: use 'YYYY-MM-DD HH:MM:SS' (UTC)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    if not 2000 <= moment.year <= 2200:  # beyond, nanoseconds overflow 64 bits
        raise InvalidArgument(name, f"{value[:64]!r} is outside the years 2000 to 2200")
    return int(moment.timestamp())


def datetime_text(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns // NS, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


class Params:
    """A pipe's parameters (query string, and a form body for POST); unknown ones are ignored."""

    def __init__(self, values) -> None:
        self._values = values

    def get(self, name: str, default: str = "") -> str:
        value = self._values.get(name, default)
        if not isinstance(value, str):  # a file in a posted form
            raise InvalidArgument(name, "must be text, not a file")
        if len(value) > 4096:
            raise InvalidArgument(name, f"is {len(value):,} characters long; at most 4,096")
        return value

    def test_id(self) -> str:
        test_id = self.get("test_id")
        if not test_id:
            raise InvalidArgument("test_id", "is required (the test whose results to return)")
        return test_id

    def range(self, default_start: str | None = TUTORIAL_START, default_end: str | None = TUTORIAL_END
              ) -> tuple[int | None, int | None]:
        """[start, end] in ns: the end's whole second included."""
        start, end = self.get("start_date", default_start or ""), self.get("end_date", default_end or "")
        start_ns = parse_datetime("start_date", start) * NS if start else None
        end_ns = parse_datetime("end_date", end) * NS + NS - 1 if end else None
        return start_ns, end_ns

    def boolean(self, name: str) -> bool:
        value = self.get(name, "false").strip().lower()
        if value in ("1", "true", "yes"):
            return True
        if value in ("", "0", "false", "no"):
            return False
        raise InvalidArgument(name, f"must be true or false, not {value[:32]!r}")

    def number(self, name: str) -> float | None:
        value = self.get(name).strip()
        if not value:
            return None
        try:
            number = float(value)
        except ValueError:
            raise InvalidArgument(name, f"must be a number, not {value[:32]!r}") from None
        if not math.isfinite(number):
            raise InvalidArgument(name, f"must be a finite number, not {value[:32]!r}")
        return number

    def of_event_type(self) -> AnalysisOptions:
        """The tutorial's pipes: the defaults, with conversions and revenue of one event type if asked."""
        return AnalysisOptions(metric_event_type=self.get("metric_event_type"))

    def margins(self, name: str) -> dict[str, float]:
        """metric:margin[,metric:margin...] (a margin a share, 0.02, or a percentage, 2%)."""
        out = {}
        for part in filter(None, self.get(name).split(",")):
            metric, _, margin = part.replace("=", ":").partition(":")
            text = margin.strip()
            try:
                out[metric.strip()] = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
            except ValueError:
                raise InvalidArgument(name, f"{part[:64]!r}: give metric:margin[,metric:margin...], e.g. "
                                            "revenue_per_user:0.02") from None
        return out

    def choice(self, name: str, choices: dict[str, Any], default: str) -> Any:
        value = self.get(name, default).strip().lower()
        if value not in choices:
            raise InvalidArgument(name, f"must be one of {', '.join(choices)}, not {value[:32]!r}")
        return choices[value]

    def revenue_cap(self) -> RevenueCap | None:
        """revenue_cap_percentile (with revenue_cap_nonzero_only) or revenue_cap_value, if given."""
        percentile, value = self.number("revenue_cap_percentile"), self.number("revenue_cap_value")
        if percentile is None and value is None:
            if self.boolean("revenue_cap_nonzero_only"):
                raise InvalidArgument("revenue_cap_nonzero_only", "needs revenue_cap_percentile")
            return None
        return RevenueCap(percentile or 0.0, value or 0.0, self.boolean("revenue_cap_nonzero_only"))

    def analysis(self) -> AnalysisOptions:
        confidence = self.number("confidence")
        return AnalysisOptions(control_variant=self.get("control"), sequential=self.boolean("sequential"),
                               exclude_multi_variant_users=self.boolean("exclude_multi_variant_users"),
                               relative_interval=self.choice("relative_interval",
                                                             {i: i for i in stats.RELATIVE_INTERVALS}, "delta"),
                               guardrails=self.margins("guardrails"),
                               metric_event_type=self.get("metric_event_type"), revenue_cap=self.revenue_cap(),
                               session_metrics=self.boolean("session_metrics"),
                               correction=self.choice("correction", {c: c for c in ("none", "holm",
                                                                                    "benjamini_hochberg")}, "none"),
                               **({"confidence": confidence} if confidence is not None else {}))


_METRICS = [("users", "UInt64"), ("conversions", "UInt64"), ("conversion_rate", "Float64"),
            ("total_revenue", "Float64"), ("revenue_per_user", "Float64")]


def _metric_columns(m: MetricColumns) -> dict[str, list]:
    """The tutorial's metrics, as its SQL computes and rounds them."""
    users = m.users.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"users": m.users.tolist(), "conversions": m.conversions.tolist(),
                "conversion_rate": round4(m.conversions / users).tolist(),
                "total_revenue": m.total_revenue.tolist(), "revenue_per_user": round4(m.total_revenue / users).tolist()}


def _rows(columns: dict[str, list], order: list[str]) -> list[dict[str, Any]]:
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return sorted(rows, key=lambda r: tuple(r[k] for k in order))


async def test_summary(core: Core, principal: Principal, p: Params) -> Answer:
    test_id = p.test_id()
    start, end = p.range()
    r = await core.summary(principal, SummaryQuery(test_id, start, end, p.of_event_type()))
    columns = {"test_id": [test_id] * len(r.variants), "variant": r.variants, **_metric_columns(r.metrics)}
    return Answer([("test_id", "String"), ("variant", "String"), *_METRICS], _rows(columns, ["variant"]),
                  r.stats.events_scanned, r.stats.elapsed_ns / 1e9)


DIMENSIONS = {d.value: d for d in Dimension}
INTERVALS = {i.name.lower(): i for i in Interval}


async def test_segments(core: Core, principal: Principal, p: Params) -> Answer:
    test_id = p.test_id()
    dimension = p.choice("dimension", DIMENSIONS, "device")
    start, end = p.range()
    r = await core.segments(principal, SegmentsQuery(test_id, dimension, start, end, analysis=p.of_event_type()))
    name = dimension.value
    columns = {"test_id": [test_id] * len(r.variants), "variant": r.variants, name: r.segments,
               **_metric_columns(r.metrics)}
    return Answer([("test_id", "String"), ("variant", "String"), (name, "String"), *_METRICS],
                  _rows(columns, ["variant", name]), r.stats.events_scanned, r.stats.elapsed_ns / 1e9)


async def test_timeseries(core: Core, principal: Principal, p: Params) -> Answer:
    test_id = p.test_id()
    interval = p.choice("interval", INTERVALS, "day")
    start, end = p.range()

    def answer(r) -> Answer:  # in the core's worker thread: up to MAX_SERIES_POINTS rows, seconds of Python
        columns = {"test_id": [test_id] * len(r.variants), "variant": r.variants,
                   "bucket": [datetime_text(int(b)) for b in r.bucket_start_ns], **_metric_columns(r.metrics),
                   "events": r.metrics.events.tolist()}
        return Answer([("test_id", "String"), ("variant", "String"), ("bucket", "DateTime"), *_METRICS,
                       ("events", "UInt64")], _rows(columns, ["bucket", "variant"]), r.stats.events_scanned,
                      r.stats.elapsed_ns / 1e9)

    return await core.timeseries(principal, TimeseriesQuery(test_id, interval, start, end, p.boolean("cumulative"),
                                                            time_zone=p.get("time_zone"),
                                                            most_points=MAX_HTTP_POINTS), None, answer)


_LIFT_COLUMNS = [
    ("test_id", "String"), ("bucket", "Nullable(DateTime)"), ("age_seconds", "Nullable(Int64)"),
    ("control_variant", "String"), ("variant", "String"),
    ("metric", "String"), ("control_mean", "Float64"), ("treatment_mean", "Float64"), ("absolute_lift", "Float64"),
    ("absolute_ci_low", "Float64"), ("absolute_ci_high", "Float64"), ("relative_lift", "Float64"),
    ("relative_ci_low", "Float64"), ("relative_ci_high", "Float64"), ("status", "String"),
    ("status_message", "String")]


async def test_lift(core: Core, principal: Principal, p: Params) -> Answer:
    """Each treatment's cumulative lift at the end of each bucket, by confidence sequences: one
    row per bucket, treatment and metric (the range defaults to the whole test, or its plan);
    with since_first_exposure, per age since users' first events instead."""
    test_id = p.test_id()
    start, end = p.range(None, None)
    options = p.analysis()
    by_age = p.boolean("since_first_exposure")
    query = TimeseriesQuery(test_id, p.choice("interval", INTERVALS, "day"), start, end, not by_age,
                            time_zone=p.get("time_zone"), lift=options, since_first_exposure=by_age,
                            most_points=MAX_HTTP_POINTS // len(METRICS))  # up to a row per metric a point
    return await core.timeseries(principal, query, None, lambda r: _lift_answer(test_id, by_age, r))


def _lift_answer(test_id: str, by_age: bool, r) -> Answer:
    """In the core's worker thread: a row per bucket, treatment and metric."""
    rows = [{"test_id": test_id, "bucket": None if by_age else datetime_text(bucket),
             "age_seconds": bucket // NS if by_age else None, "control_variant": a.control_variant,
             "variant": c.variant, "metric": c.metric, "control_mean": c.result.control_mean,
             "treatment_mean": c.result.treatment_mean, "absolute_lift": c.result.absolute.estimate,
             "absolute_ci_low": c.result.absolute.ci_low, "absolute_ci_high": c.result.absolute.ci_high,
             "relative_lift": c.result.relative.estimate, "relative_ci_low": c.result.relative.ci_low,
             "relative_ci_high": c.result.relative.ci_high, "status": c.result.status, "status_message": c.result.message}
            for bucket, a in r.lifts for c in a.comparisons]
    return Answer(_LIFT_COLUMNS, rows, r.stats.events_scanned, r.stats.elapsed_ns / 1e9)


_RESULT_COLUMNS = [
    ("test_id", "String"), ("control_variant", "String"), ("variant", "String"), ("metric", "String"),
    ("control_mean", "Float64"), ("treatment_mean", "Float64"), ("absolute_lift", "Float64"),
    ("absolute_ci_low", "Float64"), ("absolute_ci_high", "Float64"), ("relative_lift", "Float64"),
    ("relative_ci_low", "Float64"), ("relative_ci_high", "Float64"), ("p_value", "Float64"),
    ("adjusted_p_value", "Float64"), ("chance_to_win", "Float64"), ("status", "String"), ("status_message", "String"),
    ("srm_p_value", "Float64"), ("sample_ratio_mismatch", "UInt8"), ("health", "String"),
    ("health_reasons", "Array(String)"), ("multi_variant_users", "UInt64"), ("events_before_start", "UInt64"),
    ("future_events", "UInt64"), ("guardrail_margin", "Nullable(Float64)"), ("non_inferior", "Nullable(UInt8)"),
    ("non_inferiority_p_value", "Nullable(Float64)"), ("non_inferiority_lower_bound", "Nullable(Float64)"),
    ("revenue_cap_threshold", "Nullable(Float64)"), ("capped_users", "Nullable(UInt64)")]


async def test_results(core: Core, principal: Principal, p: Params) -> Answer:
    """The analysis as rows: one per treatment and metric (its range defaults to the whole test,
    or the experiment's plan)."""
    test_id = p.test_id()
    start, end = p.range(None, None)
    r = await core.summary(principal, SummaryQuery(test_id, start, end, p.analysis()))
    a, h = r.analysis, r.health
    rows = []
    for c in a.comparisons:
        x = c.result
        rows.append({"test_id": test_id, "control_variant": a.control_variant, "variant": c.variant,
                     "metric": c.metric, "control_mean": x.control_mean, "treatment_mean": x.treatment_mean,
                     "absolute_lift": x.absolute.estimate, "absolute_ci_low": x.absolute.ci_low,
                     "absolute_ci_high": x.absolute.ci_high, "relative_lift": x.relative.estimate,
                     "relative_ci_low": x.relative.ci_low, "relative_ci_high": x.relative.ci_high,
                     "p_value": x.relative.p_value if x.relative.status == "ok" else x.absolute.p_value,
                     "adjusted_p_value": c.adjusted_relative_p if x.relative.status == "ok" else c.adjusted_absolute_p,
                     "chance_to_win": x.chance_to_win, "status": x.status, "status_message": x.message,
                     "srm_p_value": a.srm_p_value, "sample_ratio_mismatch": int(a.srm_flagged),
                     "health": h.status, "health_reasons": h.reasons, "multi_variant_users": h.multi_variant_users,
                     "events_before_start": h.events_before_start, "future_events": h.future_events,
                     **_guardrail_columns(c.guardrail), **_cap_columns(a.revenue_cap, c.metric)})
    return Answer(_RESULT_COLUMNS, rows, r.stats.events_scanned, r.stats.elapsed_ns / 1e9)


def _cap_columns(cap, metric: str) -> dict[str, Any]:
    """The threshold revenue per user was capped at, on its rows."""
    if cap is None or metric != "revenue_per_user":
        return {"revenue_cap_threshold": None, "capped_users": None}
    return {"revenue_cap_threshold": cap.threshold if math.isfinite(cap.threshold) else None,
            "capped_users": cap.capped_users}


def _guardrail_columns(g) -> dict[str, Any]:
    if g is None or g.status != "ok":
        return {"guardrail_margin": g.margin if g else None, "non_inferior": None, "non_inferiority_p_value": None,
                "non_inferiority_lower_bound": None}
    return {"guardrail_margin": g.margin, "non_inferior": int(g.non_inferior), "non_inferiority_p_value": g.p_value,
            "non_inferiority_lower_bound": g.lower_bound}


_QUARANTINE_COLUMNS = [("received_at", "DateTime"), ("field", "String"), ("error", "String"),
                       ("timestamp", "DateTime"), ("user_id", "String"), ("test_id", "String"), ("variant", "String"),
                       ("event_type", "String"), ("conversion", "Int64"), ("revenue", "Float64"),
                       ("session_id", "String"), ("device", "String"), ("country", "String")]


async def ab_test_events_quarantine(core: Core, principal: Principal, p: Params) -> Answer:
    """Rejected events, newest first, with why (`test_id` and `limit` optional)."""
    limit = p.number("limit")
    if limit is not None and not (limit >= 1 and limit.is_integer()):
        raise InvalidArgument("limit", f"must be a whole number of 1 or more, not {p.get('limit')[:32]!r}")
    events, _total = await core.quarantine(principal, p.get("test_id"), int(limit or 100))
    rows = []
    for q in events:
        e = q.event
        row = {"received_at": datetime_text(q.received_ns), "field": q.field, "error": q.message}
        for name, _ in _QUARANTINE_COLUMNS[3:]:
            value = e.get(name)
            row[name] = datetime_text(value) if name == "timestamp" and value is not None else value
        rows.append(row)
    return Answer(_QUARANTINE_COLUMNS, rows, len(rows))


PIPES: dict[str, tuple[str, Callable[[Core, Principal, Params], Awaitable[Answer]]]] = {
    "test_summary": ("query", test_summary),
    "test_segments": ("query", test_segments),
    "test_timeseries": ("query", test_timeseries),
    "test_lift": ("query", test_lift),
    "test_results": ("query", test_results),
    "ab_test_events_quarantine": ("query", ab_test_events_quarantine),
}

#: What each pipe answers, as the pipes list (GET /v0/pipes) describes it.
DESCRIPTIONS = {
    "test_summary": "users, conversions, conversion rate and revenue per variant (the tutorial's)",
    "test_segments": "test_summary per variant and device, country or event type (the tutorial's)",
    "test_timeseries": "test_summary per variant and time bucket (the tutorial's)",
    "test_lift": "each treatment's cumulative lift over time, with confidence sequences",
    "test_results": "each treatment against the control: lifts, intervals, p-values, health",
    "ab_test_events_quarantine": "rejected events, newest first, with which field and why",
}


#: The core's names of what a query got wrong, as the pipes' parameters spell them.
PARAMETERS = {"start_time": "start_date", "end_time": "end_date", "confidence_level": "confidence",
              "control_variant": "control", "revenue_cap.percentile": "revenue_cap_percentile",
              "revenue_cap.value": "revenue_cap_value", "revenue_cap.nonzero_only": "revenue_cap_nonzero_only",
              "analysis.correction": "correction", "analysis.session_metrics": "session_metrics",
              "analysis.exclude_multi_variant_users": "exclude_multi_variant_users",
              "analysis.metric_event_type": "metric_event_type", "analysis.guardrails": "guardrails"}


def as_parameter(error: InvalidArgument) -> InvalidArgument:
    """`error` naming the pipe's parameter where the core named its own field."""
    name = PARAMETERS.get(error.field)
    if name is None:
        return error
    reason = error.reason
    for field, parameter in PARAMETERS.items():
        reason = reason.replace(field, parameter)
    return InvalidArgument(name, reason)


def pipe(name: str):
    if name not in PIPES:
        raise NotFound(f"The pipe '{name[:64]}' does not exist; the pipes are {', '.join(PIPES)}")
    return PIPES[name]
