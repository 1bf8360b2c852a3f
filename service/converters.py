"""Converters between protobuf messages and store types: the only module that knows both."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from abstream import stats
from abstream.core import ipc
from abstream.core.admission import RequestSize
from abstream.core.errors import InvalidArgument
from abstream.core.events import (
    EVENT_SCHEMA,
    MAX_EVENT_BYTES,
    MAX_VALUE_BYTES,
    MAX_STRING_BYTES,
    Rejection,
    normalize,
    too_long,
)
from abstream.core.types import (
    Analysis,
    AnalysisOptions,
    CapApplied,
    DecodedBatch,
    Dimension,
    Experiment,
    Filters,
    Health,
    IngestResult,
    Interval,
    MetricColumns,
    PowerQuery,
    PowerResult,
    QuarantinedEvent,
    QueryStats,
    RevenueCap,
    SegmentsQuery,
    SegmentsResult,
    SummaryQuery,
    SummaryResult,
    TestInfo,
    TimeseriesQuery,
    TimeseriesResult,
)
from abstream.service import _events, wire
from abstream.v1 import admin_pb2
from abstream.v1 import analytics_pb2 as pb
from google.protobuf import duration_pb2, timestamp_pb2

_NS = 1_000_000_000
# Seconds that still fit in int64 nanoseconds; anything beyond is out of the accepted window anyway.
_MAX_SECONDS = 9_000_000_000

DIMENSIONS = {
    pb.DIMENSION_DEVICE: Dimension.DEVICE,
    pb.DIMENSION_COUNTRY: Dimension.COUNTRY,
    pb.DIMENSION_EVENT_TYPE: Dimension.EVENT_TYPE,
}
INTERVALS = {
    pb.INTERVAL_MINUTE: Interval.MINUTE,
    pb.INTERVAL_HOUR: Interval.HOUR,
    pb.INTERVAL_DAY: Interval.DAY,
    pb.INTERVAL_WEEK: Interval.WEEK,
}


# ---- ingest ------------------------------------------------------------------------------

#: Event's string fields, in field order (as `_events.decode` returns them).
EVENT_STRINGS = tuple(f.name for f in pb.Event.DESCRIPTOR.fields if f.type == f.TYPE_STRING)


def _numbers(descriptor) -> dict[str, int]:
    return {f.name: f.number for f in descriptor.fields}


_events.configure(_numbers(pb.IngestEventsRequest.DESCRIPTOR),
                  {**_numbers(pb.Event.DESCRIPTOR),
                   "strings": [pb.Event.DESCRIPTOR.fields_by_name[name].number for name in EVENT_STRINGS]},
                  _numbers(timestamp_pb2.Timestamp.DESCRIPTOR))


def _refusals(problems: bytes) -> list[Rejection]:
    found = np.frombuffer(problems, dtype=np.int64).reshape(-1, 4)
    return [Rejection(row, "timestamp", f"timestamp nanos must be 0 to 999,999,999, got {length}")
            if kind == _events.BAD_NANOS else
            Rejection(row, EVENT_STRINGS[slot], f"{EVENT_STRINGS[slot]} is not valid UTF-8" if kind == _events.NOT_UTF8
                      else too_long(EVENT_STRINGS[slot], length))
            for row, slot, kind, length in found.tolist()]


#: The shape of requests of events alone (no arrow_ipc): any two of them may be read and stored together.
EVENTS_SHAPE = "events"


def measure_request(raw: bytes, max_events: int) -> RequestSize:
    """The size and sender of a serialized IngestEventsRequest from a walk over its top level that
    allocates nothing per event; InvalidArgument when it holds more than `max_events`, an Arrow
    stream that is too big or a producer_id that is not UTF-8."""
    try:
        n, span, producer, sequence = _events.count(raw)
    except ValueError as error:
        raise InvalidArgument("request", f"is not a valid IngestEventsRequest: {error}") from None
    if n > max_events:
        raise InvalidArgument("events", f"a batch of {n} events; at most {max_events}")
    rows = decoded = 0
    if span is not None:
        start, length = span
        size = ipc.checked_size(pa.py_buffer(raw)[start:start + length], "arrow_ipc", max_events - n,
                                MAX_EVENT_BYTES, MAX_VALUE_BYTES)
        rows, decoded = size.rows, size.decoded_bytes
    return RequestSize(len(raw), n + rows, decoded, _producer_id(producer), sequence,
                       EVENTS_SHAPE if span is None else None)


def _producer_id(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidArgument("producer_id", "is not valid UTF-8") from None


def decode_request(raws: bytes | Sequence[bytes], max_events: int) -> DecodedBatch:
    """A serialized IngestEventsRequest as one EVENT_SCHEMA table: its `events`, then the rows of
    its `arrow_ipc`; InvalidArgument, before anything is allocated for them, when it holds more
    than `max_events`. The messages are read into columns by `_events.c`. Requests of events alone
    (EVENTS_SHAPE) given together are read as one batch, each holding at most `max_events`."""
    if not isinstance(raws, bytes):
        raws = raws[0] if len(raws) == 1 else tuple(raws)
    try:
        d = _events.decode(raws, max_events * (1 if isinstance(raws, bytes) else len(raws)), MAX_STRING_BYTES)
    except _events.BatchTooLarge as error:
        raise InvalidArgument("events", f"a batch of {error.args[0]} events; at most {max_events}") from None
    except ValueError as error:
        raise InvalidArgument("request", f"is not a valid IngestEventsRequest: {error}") from None
    producer_id = _producer_id(d.producer_id)
    n = d.events
    absent = np.frombuffer(d.timestamp_set, dtype=np.bool_) == 0
    columns: dict[str, Any] = {
        "timestamp": pa.array(np.frombuffer(d.timestamp, dtype=np.int64), pa.int64(),
                              mask=absent if absent.any() else None),
        "conversion": pa.Array.from_buffers(pa.int64(), n, [None, pa.py_buffer(d.conversion)]),
        "revenue": pa.Array.from_buffers(pa.float64(), n, [None, pa.py_buffer(d.revenue)]),
    }
    for name, (offsets, data) in zip(EVENT_STRINGS, d.strings):
        columns[name] = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
    table = pa.table([columns[name] for name in EVENT_SCHEMA.names], schema=EVENT_SCHEMA)
    refuse = _refusals(d.problems)
    source = None
    if d.arrow_ipc is not None:
        start, length = d.arrow_ipc
        source = pa.py_buffer(raws)[start:start + length]
        columnar = ipc.read_bounded(source, "arrow_ipc", max_events - n, MAX_EVENT_BYTES, MAX_VALUE_BYTES)
        if n == 0:
            table = columnar
        else:
            columnar, unreadable = normalize(columnar)
            table = pa.concat_tables([table, columnar.cast(EVENT_SCHEMA)])
            refuse += [Rejection(r.index + n, r.field, r.message) for r in unreadable]
            source = None
    return DecodedBatch(table, producer_id, d.sequence, refuse, source)


def ingest_response(batch: int, result: IngestResult) -> pb.IngestEventsResponse:
    rejections = result.rejections
    response = pb.IngestEventsResponse(batch=batch, accepted=result.accepted, rejected=len(rejections),
                                       duplicate=result.duplicate)
    if rejections:  # column by column (see wire.py): a batch may reject 100,000 events
        indices, fields, messages, _ = zip(*rejections)
        rows = wire.Message.of(pb.Rejection.DESCRIPTOR, {"index": np.array(indices, dtype=np.int64),
                                                         "field": wire.string_table(fields),
                                                         "message": wire.string_table(messages)}, len(rejections))
        response.MergeFromString(wire.encode_repeated(pb.IngestEventsResponse.DESCRIPTOR, "rejections", rows))
    return response


# ---- time --------------------------------------------------------------------------------

@contextmanager
def timed(into: duration_pb2.Duration) -> Iterator[None]:
    """Sets `into` to how long the block took."""
    started = time.perf_counter_ns()
    yield
    into.FromNanoseconds(time.perf_counter_ns() - started)


def relative(path: Path, base: str) -> str:
    """`path` as seen from the data directory `base`, when it is inside it."""
    return str(path.relative_to(base)) if base and path.is_relative_to(base) else str(path)


_INT64 = (-(2**63), 2**63 - 1)


def to_ns(ts: timestamp_pb2.Timestamp) -> int:
    """Nanoseconds since the epoch, clamped to int64 (beyond it no event can lie anyway)."""
    return min(max(ts.seconds * _NS + ts.nanos, _INT64[0]), _INT64[1])


def to_timestamp(ns: int) -> timestamp_pb2.Timestamp:
    seconds, nanos = divmod(int(ns), _NS)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _optional_ns(request: Any, name: str) -> int | None:
    return to_ns(getattr(request, name)) if request.HasField(name) else None


def _filters(request: Any) -> Filters:
    f = request.filters
    return Filters(**{name: getattr(f, name) for name in ("device", "country", "event_type") if f.HasField(name)})


def _enum(mapping: dict, value: int, field: str, enum_type) -> Any:
    if value not in mapping:
        name = enum_type.Name(value) if value in enum_type.values() else str(value)
        allowed = ", ".join(enum_type.Name(v) for v in mapping)
        raise InvalidArgument(field, f"{name} is not supported; use one of {allowed}")
    return mapping[value]


# ---- queries -----------------------------------------------------------------------------

CORRECTIONS = {pb.CORRECTION_UNSPECIFIED: "none", pb.CORRECTION_NONE: "none", pb.CORRECTION_HOLM: "holm",
               pb.CORRECTION_BENJAMINI_HOCHBERG: "benjamini_hochberg"}
RELATIVE_INTERVALS = {pb.RELATIVE_INTERVAL_UNSPECIFIED: "delta", pb.RELATIVE_INTERVAL_DELTA: "delta",
                      pb.RELATIVE_INTERVAL_FIELLER: "fieller"}
METRICS = {"conversion": pb.METRIC_CONVERSION, "revenue_per_user": pb.METRIC_REVENUE_PER_USER,
           "conversions_per_user": pb.METRIC_CONVERSIONS_PER_USER,
           "revenue_per_conversion": pb.METRIC_REVENUE_PER_CONVERSION,
           "conversions_per_session": pb.METRIC_CONVERSIONS_PER_SESSION,
           "events_per_session": pb.METRIC_EVENTS_PER_SESSION}
STATUSES = {status: pb.ComparisonStatus.Value(f"COMPARISON_STATUS_{status.upper()}") for status in stats.SEVERITY}


def analysis_options(o: pb.AnalysisOptions) -> AnalysisOptions:
    """Request options with their documented defaults for zero values."""
    return AnalysisOptions(
        control_variant=o.control_variant,
        confidence=o.confidence_level or 0.95,
        sequential=o.sequential,
        n_star=o.sequential_tuning or 5000.0,
        prior_mean=o.prior_mean if o.HasField("prior_mean") else None,
        prior_variance=o.prior_variance if o.HasField("prior_variance") else None,
        expected_weights=dict(o.expected_weights),
        srm_threshold=o.srm_threshold or 0.001,
        correction=_enum(CORRECTIONS, o.correction, "analysis.correction", pb.Correction),
        exclude_multi_variant_users=o.exclude_multi_variant_users,
        relative_interval=_enum(RELATIVE_INTERVALS, o.relative_interval, "analysis.relative_interval",
                                pb.RelativeInterval),
        guardrails=dict(o.guardrail_margins),
        metric_event_type=o.metric_event_type,
        revenue_cap=RevenueCap(o.revenue_cap.percentile, o.revenue_cap.value, o.revenue_cap.nonzero_only)
        if o.HasField("revenue_cap") else None,
        session_metrics=o.session_metrics,
    )


def _cap_applied(c: CapApplied | None) -> pb.RevenueCapApplied | None:
    if c is None:
        return None
    return pb.RevenueCapApplied(cap=pb.RevenueCap(percentile=c.cap.percentile, value=c.cap.value,
                                                  nonzero_only=c.cap.nonzero_only),
                                threshold=c.threshold, pooled_users=c.pooled_users, capped_users=c.capped_users)


def _guardrail(g) -> pb.Guardrail | None:
    if g is None:
        return None
    return pb.Guardrail(margin=g.margin, non_inferior=g.non_inferior, p_value=g.p_value, lower_bound=g.lower_bound,
                        status=STATUSES[g.status], status_message=g.message)


HEALTH = {"healthy": pb.HEALTH_STATUS_HEALTHY, "warning": pb.HEALTH_STATUS_WARNING,
          "unhealthy": pb.HEALTH_STATUS_UNHEALTHY}


def health_message(h: Health) -> pb.Health:
    return pb.Health(status=HEALTH[h.status], reasons=h.reasons, users=h.users,
                     multi_variant_users=h.multi_variant_users,
                     multi_variant_users_excluded=h.multi_variant_users_excluded, srm_p_value=h.srm_p_value,
                     srm=HEALTH[h.srm], events_before_start=h.events_before_start, future_events=h.future_events)


def _lift(e, adjusted: float) -> pb.Lift:
    return pb.Lift(estimate=e.estimate, standard_error=e.se, ci_low=e.ci_low, ci_high=e.ci_high,
                   p_value=e.p_value, adjusted_p_value=adjusted, status=STATUSES[e.status], status_message=e.message)


def analysis_message(a: Analysis) -> pb.Analysis:
    return pb.Analysis(
        control_variant=a.control_variant, srm_p_value=a.srm_p_value, sample_ratio_mismatch=a.srm_flagged,
        comparisons=[pb.MetricComparison(
            variant=c.variant, metric=METRICS[c.metric], control_mean=c.result.control_mean,
            treatment_mean=c.result.treatment_mean, absolute=_lift(c.result.absolute, c.adjusted_absolute_p),
            relative=_lift(c.result.relative, c.adjusted_relative_p), degrees_of_freedom=c.result.dof,
            chance_to_win=c.result.chance_to_win, risk_control=c.result.risk_control,
            risk_treatment=c.result.risk_treatment, posterior_mean=c.result.posterior_mean,
            status=STATUSES[c.result.status], status_message=c.result.message,
            guardrail=_guardrail(c.guardrail)) for c in a.comparisons],
        revenue_cap=_cap_applied(a.revenue_cap))


def summary_query(request: pb.SummaryRequest) -> SummaryQuery:
    return SummaryQuery(request.test_id, _optional_ns(request, "start_time"), _optional_ns(request, "end_time"),
                        analysis_options(request.analysis), filters=_filters(request))


def segments_query(request: pb.SegmentsRequest) -> SegmentsQuery:
    return SegmentsQuery(
        test_id=request.test_id,
        dimension=_enum(DIMENSIONS, request.dimension, "dimension", pb.Dimension),
        start_ns=_optional_ns(request, "start_time"),
        end_ns=_optional_ns(request, "end_time"),
        filters=_filters(request),
        analysis=analysis_options(request.analysis),
    )


def timeseries_query(request: pb.TimeseriesRequest) -> TimeseriesQuery:
    return TimeseriesQuery(
        test_id=request.test_id,
        interval=_enum(INTERVALS, request.interval, "interval", pb.Interval),
        start_ns=_optional_ns(request, "start_time"),
        end_ns=_optional_ns(request, "end_time"),
        cumulative=request.cumulative,
        filters=_filters(request),
        time_zone=request.time_zone,
        lift=analysis_options(request.analysis) if request.lift else None,
        since_first_exposure=request.since_first_exposure,
    )


def _metrics(columns: MetricColumns) -> wire.Message:
    return wire.Message.of(pb.Metrics.DESCRIPTOR, columns.columns(), len(columns))


def _stats(stats: QueryStats) -> pb.QueryStats:
    seconds, nanos = divmod(stats.elapsed_ns, _NS)
    return pb.QueryStats(events_scanned=stats.events_scanned,
                         elapsed=duration_pb2.Duration(seconds=seconds, nanos=nanos))


# Responses are built from the rows' wire format, encoded column by column (see wire.py), with the
# field numbers of the generated descriptors; the tests check them against messages built field
# by field.

def summary_response(result: SummaryResult) -> pb.SummaryResponse:
    rows = wire.Message.of(pb.SummaryRow.DESCRIPTOR, {"variant": wire.string_table(result.variants),
                                                      "metrics": _metrics(result.metrics)}, len(result.metrics))
    response = pb.SummaryResponse.FromString(wire.encode_repeated(pb.SummaryResponse.DESCRIPTOR, "rows", rows))
    response.test_id = result.test_id
    response.stats.CopyFrom(_stats(result.stats))
    if result.analysis is not None:
        response.analysis.CopyFrom(analysis_message(result.analysis))
    if result.health is not None:
        response.health.CopyFrom(health_message(result.health))
    return response


def segments_response(result: SegmentsResult) -> pb.SegmentsResponse:
    rows = wire.Message.of(pb.SegmentRow.DESCRIPTOR, {"variant": wire.string_table(result.variants),
                                                      "segment": wire.string_table(result.segments),
                                                      "metrics": _metrics(result.metrics)}, len(result.metrics))
    response = pb.SegmentsResponse.FromString(wire.encode_repeated(pb.SegmentsResponse.DESCRIPTOR, "rows", rows))
    response.test_id = result.test_id
    response.dimension = next(k for k, v in DIMENSIONS.items() if v is result.dimension)
    response.stats.CopyFrom(_stats(result.stats))
    response.analyses.extend(pb.SegmentAnalysis(segment=segment, analysis=analysis_message(a))
                             for segment, a in result.analyses)
    return response


def timeseries_response(result: TimeseriesResult) -> pb.TimeseriesResponse:
    if result.since_first_exposure:  # ages are not instants: the lifts only
        response = pb.TimeseriesResponse()
    else:
        seconds, nanos = np.divmod(result.bucket_start_ns, _NS)
        n = len(result.metrics)
        bucket = wire.Message.of(timestamp_pb2.Timestamp.DESCRIPTOR, {"seconds": seconds, "nanos": nanos}, n)
        rows = wire.Message.of(pb.TimeseriesRow.DESCRIPTOR, {"bucket_start": bucket,
                                                             "variant": wire.string_table(result.variants),
                                                             "metrics": _metrics(result.metrics)}, n)
        response = pb.TimeseriesResponse.FromString(wire.encode_repeated(pb.TimeseriesResponse.DESCRIPTOR, "rows",
                                                                         rows))
    response.test_id = result.test_id
    response.interval = next(k for k, v in INTERVALS.items() if v is result.interval)
    response.cumulative = result.cumulative
    response.stats.CopyFrom(_stats(result.stats))
    for start, analysis in result.lifts or ():
        lift = response.lifts.add(analysis=analysis_message(analysis))
        (lift.exposure if result.since_first_exposure else lift.bucket_start).FromNanoseconds(start)
    return response


def list_tests_response(tests: Iterable[TestInfo], stats: QueryStats) -> pb.ListTestsResponse:
    return pb.ListTestsResponse(
        tests=[pb.TestInfo(test_id=t.test_id, variants=t.variants, events=t.events, users=t.users,
                           first_event_time=to_timestamp(t.first_event_ns),
                           last_event_time=to_timestamp(t.last_event_ns),
                           experiment=experiment_message(t.experiment) if t.experiment else None) for t in tests],
        stats=_stats(stats),
    )


# ---- experiments and power ---------------------------------------------------------------

def experiment(message: pb.Experiment) -> Experiment:
    return Experiment(test_id=message.test_id, control_variant=message.control_variant, split=dict(message.split),
                      start_ns=_optional_ns(message, "start_time"), stop_ns=_optional_ns(message, "stop_time"),
                      hypothesis=message.hypothesis)


def experiment_message(e: Experiment) -> pb.Experiment:
    message = pb.Experiment(test_id=e.test_id, control_variant=e.control_variant, split=e.split,
                            hypothesis=e.hypothesis, created_time=to_timestamp(e.created_ns),
                            updated_time=to_timestamp(e.updated_ns), retention_days=e.retention_days or 0.0)
    if e.start_ns is not None:
        message.start_time.CopyFrom(to_timestamp(e.start_ns))
    if e.stop_ns is not None:
        message.stop_time.CopyFrom(to_timestamp(e.stop_ns))
    return message


def power_query(request: pb.PowerRequest) -> PowerQuery:
    return PowerQuery(request.test_id, request.minimum_detectable_effect, request.power or 0.8,
                      request.alpha or 0.05, request.control_variant, request.users_per_variant)


def power_response(result: PowerResult) -> pb.PowerResponse:
    return pb.PowerResponse(test_id=result.test_id, control_variant=result.control_variant, metrics=[
        pb.MetricPower(metric=METRICS[m.metric], baseline_mean=m.baseline_mean, baseline_variance=m.baseline_variance,
                       users_per_variant=m.users_per_variant, days=m.days, status_message=m.message,
                       at_users_per_variant=m.at_users, detectable_effect=m.detectable_effect, power=m.power)
        for m in result.metrics])


def _event(values: dict[str, Any]) -> pb.Event:
    fields = {k: v for k, v in values.items() if k != "timestamp" and v is not None}
    if not 0 <= fields.get("conversion", 0) < 2**32:  # only a columnar batch can carry such a value
        del fields["conversion"]
    event = pb.Event(**fields)
    if values.get("timestamp") is not None:
        event.timestamp.CopyFrom(to_timestamp(values["timestamp"]))
    return event


def quarantine_response(entries: list[QuarantinedEvent], total: int) -> pb.ListQuarantineResponse:
    return pb.ListQuarantineResponse(
        events=[pb.QuarantinedEvent(received_time=to_timestamp(e.received_ns), index=e.index, field=e.field,
                                    message=e.message, event=_event(e.event)) for e in entries],
        total=total,
    )


def import_progress(p) -> admin_pb2.ImportEventsResponse:
    return admin_pb2.ImportEventsResponse(
        uri=p.uri, state=admin_pb2.ImportState.Value(f"IMPORT_STATE_{p.state.upper()}"), size=p.size,
        accepted=p.accepted, quarantined=p.quarantined, already_stored=p.already_stored, error=p.error,
        objects_total=p.objects_total, objects_done=p.objects_done, total_accepted=p.total_accepted,
        total_quarantined=p.total_quarantined)


def time_range(request) -> tuple[int | None, int | None]:
    """A request's optional start_time and end_time, in ns."""
    return _optional_ns(request, "start_time"), _optional_ns(request, "end_time")


def ipc_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
