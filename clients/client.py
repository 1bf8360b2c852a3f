"""The Python client: typed results from every query, with a deadline on every call.

    from abstream.clients import Client
    with Client("127.0.0.1:50051") as client:
        for row in client.summary("checkout").rows:
            print(row.variant, row.metrics.users, row.metrics.conversion_rate)
        table = client.timeseries("checkout", interval="hour").to_arrow()

It imports neither the engine nor the statistics: only gRPC, the generated code and pyarrow.
`to_pandas()` needs pandas (`pip install abstream[pandas]`).
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import re
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Iterator, Sequence

import grpc
import pyarrow as pa
from abstream.clients.columnar import LOW_CARDINALITY, arrow_ipc  # noqa: F401 - where they were
from abstream.clients.files import from_iso
from abstream.v1 import admin_pb2, admin_pb2_grpc
from abstream.v1 import analytics_pb2 as pb
from abstream.v1 import analytics_pb2_grpc as pb_grpc
from google.protobuf import json_format

Time = dt.datetime | dt.date | str | None
DIMENSIONS = {"device": pb.DIMENSION_DEVICE, "country": pb.DIMENSION_COUNTRY, "event_type": pb.DIMENSION_EVENT_TYPE}
INTERVALS = {"minute": pb.INTERVAL_MINUTE, "hour": pb.INTERVAL_HOUR, "day": pb.INTERVAL_DAY, "week": pb.INTERVAL_WEEK}
CORRECTIONS = {"none": pb.CORRECTION_NONE, "holm": pb.CORRECTION_HOLM,
               "benjamini_hochberg": pb.CORRECTION_BENJAMINI_HOCHBERG}


def _name(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def parse_time(value: Time, end: bool = False) -> dt.datetime | None:
    """A datetime from a datetime (naive means UTC), a date, or text: RFC 3339 or 'YYYY-MM-DD[
    HH:MM:SS]' in UTC. With `end`, the end of what the value names: a date-only value means the
    last instant of that day, a value to the hour, minute or second the last instant of it, so
    that an inclusive end includes the whole of it (an event at 18:42:22.700 is inside an end of
    '18:42:22', and of '18:42'). Raises ValueError saying what is accepted."""
    if value is None:
        return None
    whole_day = isinstance(value, dt.date) and not isinstance(value, dt.datetime)
    if isinstance(value, str):
        text = value.strip()
        try:
            moment = from_iso(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a date and time: use 'YYYY-MM-DD', 'YYYY-MM-DD HH:MM:SS' (UTC) "
                             "or RFC 3339 ('2025-04-28T18:42:22Z')") from None
        span = span_named(text)
    elif whole_day:
        moment, span = dt.datetime.combine(value, dt.time()), dt.timedelta(days=1)
    elif isinstance(value, dt.datetime):
        moment, span = value, None if value.microsecond else dt.timedelta(seconds=1)
    else:
        raise ValueError(f"{value!r} is not a date and time: give a datetime, a date, or text as 'YYYY-MM-DD', "
                         "'YYYY-MM-DD HH:MM:SS' (UTC) or RFC 3339")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    if end and span is not None:
        try:
            return moment + span - dt.timedelta(microseconds=1)
        except OverflowError:  # the calendar's last day or second: its last instant is the calendar's
            return dt.datetime.max.replace(tzinfo=dt.timezone.utc)
    return moment


#: The time of day in a date and time ISO 8601 allows: hours, minutes and seconds (each with or
#: without colons), and a fraction.
_TIME_OF_DAY = re.compile(r"[Tt ](\d{2})(?::?(\d{2}))?(?::?(\d{2}))?([.,]\d)?")


def span_named(text: str) -> dt.timedelta | None:
    """How long the instant `text` names lasts, as far as it is written: a date a day, '18' an
    hour, '18:42' a minute, '18:42:22' a second (an end to the minute took only that minute's
    first second); None with a fraction."""
    if _is_date(text):
        return dt.timedelta(days=1)
    match = _TIME_OF_DAY.search(text)
    if match is None or match.group(4):
        return None
    return (dt.timedelta(seconds=1) if match.group(3) else dt.timedelta(minutes=1) if match.group(2)
            else dt.timedelta(hours=1))


def _is_date(text: str) -> bool:
    """Whether text names a day alone, in any of the forms it may take ('2025-05-01', '20250501',
    '2025-W18-4'): counting 10 characters took '20250501' for a time, its end a second past midnight."""
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _named(values: dict[str, int], what: str, name: str) -> int:
    """The contract's number for a name, or ValueError naming the ones there are: an unknown one
    went as 0, which the server refused as unspecified, naming no name the caller used."""
    if name not in values:
        raise ValueError(f"{what} must be one of {', '.join(values)}, not {name!r}")
    return values[name]


def _timestamp(value: Time, message, end: bool = False) -> None:
    moment = parse_time(value, end)
    if moment is not None:
        message.FromDatetime(moment)
        if end and message.nanos == 999_999_000:
            message.nanos = 999_999_999  # the second's last nanosecond, not only its last microsecond


#: One group's metrics: the Metrics message's fields, as a frozen dataclass.
Metrics = make_dataclass("Metrics", [(f.name, float if f.type == f.TYPE_DOUBLE else int)
                                     for f in pb.Metrics.DESCRIPTOR.fields], frozen=True)


def _metrics(m: pb.Metrics) -> Metrics:
    return Metrics(**{f.name: getattr(m, f.name) for f in fields(Metrics)})


@dataclass(frozen=True)
class Lift:
    estimate: float
    standard_error: float
    ci_low: float
    ci_high: float
    p_value: float
    adjusted_p_value: float
    status: str  # "ok", or why not: "not_enough_data", "zero_variance", ...
    status_message: str


@dataclass(frozen=True)
class Guardrail:
    """A guardrail metric's non-inferiority test."""

    margin: float
    non_inferior: bool
    p_value: float
    lower_bound: float
    status: str
    status_message: str


@dataclass(frozen=True)
class Comparison:
    """One treatment against the control on one metric."""

    variant: str
    metric: str  # "conversion", "revenue_per_user", "conversions_per_user"
    control_mean: float
    treatment_mean: float
    absolute: Lift
    relative: Lift
    degrees_of_freedom: float
    chance_to_win: float
    risk_control: float
    risk_treatment: float
    posterior_mean: float
    status: str
    status_message: str
    guardrail: Guardrail | None = None  # when the metric is a guardrail


@dataclass(frozen=True)
class RevenueCap:
    """The capping revenue per user was compared with (revenue_cap={"percentile": 99} asked)."""

    percentile: float
    value: float
    nonzero_only: bool
    threshold: float  # revenue per user above this counted as this
    pooled_users: int  # the users the percentile was taken over
    capped_users: int  # users above the threshold


@dataclass(frozen=True)
class Analysis:
    control_variant: str
    srm_p_value: float
    sample_ratio_mismatch: bool
    comparisons: list[Comparison]
    revenue_cap: RevenueCap | None = None


@dataclass(frozen=True)
class Health:
    """How the experiment ran (every Summary): read it before the analysis."""

    status: str  # "healthy", "warning" or "unhealthy": the worst of the checks
    reasons: list[str]  # a sentence per check that is not healthy, the worst first
    users: int
    multi_variant_users: int  # users seen in more than one variant
    multi_variant_users_excluded: bool
    srm_p_value: float
    srm: str
    events_before_start: int
    future_events: int  # timestamped more than 5 minutes after the server's clock


def _health(h: pb.Health) -> Health:
    return Health(_name(pb.HealthStatus, h.status, "HEALTH_STATUS_"), list(h.reasons), h.users,
                  h.multi_variant_users, h.multi_variant_users_excluded, h.srm_p_value,
                  _name(pb.HealthStatus, h.srm, "HEALTH_STATUS_"), h.events_before_start, h.future_events)


def _lift(m: pb.Lift) -> Lift:
    return Lift(m.estimate, m.standard_error, m.ci_low, m.ci_high, m.p_value, m.adjusted_p_value,
                _name(pb.ComparisonStatus, m.status, "COMPARISON_STATUS_"), m.status_message)


def _analysis(a: pb.Analysis) -> Analysis:
    return Analysis(a.control_variant, a.srm_p_value, a.sample_ratio_mismatch, [
        Comparison(c.variant, _name(pb.Metric, c.metric, "METRIC_"), c.control_mean, c.treatment_mean,
                   _lift(c.absolute), _lift(c.relative), c.degrees_of_freedom, c.chance_to_win, c.risk_control,
                   c.risk_treatment, c.posterior_mean, _name(pb.ComparisonStatus, c.status, "COMPARISON_STATUS_"),
                   c.status_message, _guardrail(c.guardrail) if c.HasField("guardrail") else None)
        for c in a.comparisons], _revenue_cap(a.revenue_cap) if a.HasField("revenue_cap") else None)


def _revenue_cap(c: pb.RevenueCapApplied) -> RevenueCap:
    return RevenueCap(c.cap.percentile, c.cap.value, c.cap.nonzero_only, c.threshold, c.pooled_users, c.capped_users)


def _guardrail(g: pb.Guardrail) -> Guardrail:
    return Guardrail(g.margin, g.non_inferior, g.p_value, g.lower_bound,
                     _name(pb.ComparisonStatus, g.status, "COMPARISON_STATUS_"), g.status_message)


class _Table:
    """Results that are a list of rows of flat dataclasses."""

    rows: list

    def to_arrow(self) -> pa.Table:
        flat = []
        for row in self.rows:
            record = {}
            for f in fields(row):
                value = getattr(row, f.name)
                if isinstance(value, Metrics):
                    record.update({m.name: getattr(value, m.name) for m in fields(value)})
                elif not isinstance(value, Experiment):
                    record[f.name] = list(value) if isinstance(value, tuple) else value
            flat.append(record)
        return pa.Table.from_pylist(flat)

    def to_pandas(self):
        """The rows as a pandas DataFrame (pandas is an optional extra)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install 'abstream[pandas]' (or use to_arrow())") from None
        return self.to_arrow().to_pandas()


@dataclass(frozen=True)
class SummaryRow:
    variant: str
    metrics: Metrics


@dataclass(frozen=True)
class SegmentRow:
    variant: str
    segment: str
    metrics: Metrics


@dataclass(frozen=True)
class Summary(_Table):
    test_id: str
    rows: list[SummaryRow]
    analysis: Analysis
    events_scanned: int
    health: Health


@dataclass(frozen=True)
class Segments(_Table):
    test_id: str
    dimension: str
    rows: list[SegmentRow]
    analyses: dict[str, Analysis]  # per segment value
    events_scanned: int


@dataclass(frozen=True)
class TimeseriesRow:
    bucket_start: dt.datetime
    variant: str
    metrics: Metrics


@dataclass(frozen=True)
class Timeseries(_Table):
    test_id: str
    interval: str
    cumulative: bool
    rows: list[TimeseriesRow]
    events_scanned: int
    lifts: list[tuple[dt.datetime | dt.timedelta, Analysis]] = field(default_factory=list)  # with lift=True


@dataclass(frozen=True)
class Experiment:
    """A test's plan (AdminService.CreateExperiment)."""

    test_id: str
    control_variant: str = ""
    split: dict[str, float] = field(default_factory=dict)
    start_time: dt.datetime | None = None
    stop_time: dt.datetime | None = None
    hypothesis: str = ""
    created_time: dt.datetime | None = None
    updated_time: dt.datetime | None = None
    retention_days: float | None = None


@dataclass(frozen=True)
class TestInfo:
    test_id: str
    variants: tuple[str, ...]
    events: int
    users: int
    first_event_time: dt.datetime
    last_event_time: dt.datetime
    experiment: Experiment | None = None


@dataclass(frozen=True)
class Tests(_Table):
    rows: list[TestInfo]


@dataclass(frozen=True)
class QuarantinedEvent:
    received_time: dt.datetime
    index: int
    field: str
    message: str
    event: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Quarantine(_Table):
    rows: list[QuarantinedEvent]
    total: int


@dataclass(frozen=True)
class Imported:
    """One object's progress in an import (AdminService.ImportEvents), and the import's so far."""

    uri: str
    state: str  # started, imported, skipped, failed
    size: int
    accepted: int
    quarantined: int
    already_stored: int
    error: str
    objects_total: int
    objects_done: int
    total_accepted: int
    total_quarantined: int


@dataclass(frozen=True)
class Snapshot:
    """A snapshot written (AdminService.CreateSnapshot)."""

    path: str
    events: int
    elapsed: dt.timedelta


@dataclass(frozen=True)
class MetricPower:
    metric: str
    baseline_mean: float
    baseline_variance: float
    users_per_variant: int
    days: float
    status_message: str
    at_users_per_variant: int = 0  # the users per variant the next two are for
    detectable_effect: float = 0.0  # the relative lift they detect with the power asked for
    power: float = 0.0  # their chance to detect the lift asked for


@dataclass(frozen=True)
class Power(_Table):
    test_id: str
    control_variant: str
    rows: list[MetricPower]


def _utc(ts) -> dt.datetime:
    return ts.ToDatetime(tzinfo=dt.timezone.utc)


def _dict(message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _experiment(e: pb.Experiment) -> Experiment:
    return Experiment(e.test_id, e.control_variant, dict(e.split), _utc(e.start_time) if e.HasField("start_time") else None,
                      _utc(e.stop_time) if e.HasField("stop_time") else None, e.hypothesis,
                      _utc(e.created_time) if e.HasField("created_time") else None,
                      _utc(e.updated_time) if e.HasField("updated_time") else None, e.retention_days or None)


KEEPALIVE_MS = 20_000


def channel_for(addr: str, tls: bool | bytes | None = None, options: Sequence[tuple[str, Any]] = (),
                cert: bytes | None = None, key: bytes | None = None) -> grpc.Channel:
    """A channel: plaintext by default; `tls=True` for the system's roots, or a CA certificate (PEM);
    `cert` and `key` (PEM) for mutual TLS."""
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
               # While a call is open, a ping every 20 s that must be answered within 10: a server
               # that hangs (or its machine) ends a stream without a deadline (an export, an
               # import) instead of holding it for ever; pings go on however long the call is silent.
               ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", 10_000),
               ("grpc.http2.ping_timeout_ms", 10_000),  # gRPC's own bound on a ping's answer, else a minute
               ("grpc.http2.max_pings_without_data", 0), *options]
    if bool(cert) != bool(key):
        raise ValueError("mutual TLS needs both a client certificate and its key")
    if not tls and not cert:
        return grpc.insecure_channel(addr, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=None if tls in (True, None) else tls,
                                               private_key=key, certificate_chain=cert)
    return grpc.secure_channel(addr, credentials, options=options)


def _analysis_options(control: str = "", confidence: float | None = None, sequential: bool = False,
                      correction: str = "", expected_weights: dict[str, float] | None = None,
                      prior: tuple[float, float] | None = None, exclude_multi_variant_users: bool = False,
                      relative_interval: str = "", guardrails: dict[str, float] | None = None,
                      metric_event_type: str = "", revenue_cap: dict | None = None, session_metrics: bool = False,
                      **raw: Any) -> pb.AnalysisOptions:
    options = pb.AnalysisOptions(control_variant=control, confidence_level=confidence or 0, sequential=sequential,
                                 expected_weights=expected_weights or {},
                                 exclude_multi_variant_users=exclude_multi_variant_users,
                                 guardrail_margins=guardrails or {}, metric_event_type=metric_event_type,
                                 session_metrics=session_metrics)
    if revenue_cap is not None:
        options.revenue_cap.CopyFrom(pb.RevenueCap(**revenue_cap))
    if relative_interval:
        if relative_interval not in ("delta", "fieller"):
            raise ValueError(f"relative_interval must be delta or fieller, not {relative_interval!r}")
        options.relative_interval = pb.RelativeInterval.Value(f"RELATIVE_INTERVAL_{relative_interval.upper()}")
    if correction:
        if correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, not {correction!r}")
        options.correction = CORRECTIONS[correction]
    if prior is not None:
        options.prior_mean, options.prior_variance = prior
    if raw:
        json_format.ParseDict(raw, options)
    return options


class NotReady(grpc.RpcError):
    """The server did not become ready (connected, TLS and HTTP/2 set up) within the timeout:
    DEADLINE_EXCEEDED, as a call past its deadline is."""

    def __init__(self, addr: str, seconds: float) -> None:
        super().__init__(f"{addr} was not ready within {seconds:g}s")
        self._details = f"{addr} was not ready within {seconds:g}s"

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return self._details


def _text_arguments(cls: type) -> type:
    """Each public method's text arguments (annotated `str` or `str | None`) checked before a
    request is built: protobuf's own error for `summary(123)` names neither the argument nor
    what it should be."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not callable(method):
            continue
        signature = inspect.signature(method)
        texts = [p for p, param in signature.parameters.items() if param.annotation in ("str", "str | None")]
        if texts:
            setattr(cls, name, _checking(method, signature, texts))
    return cls


def _checking(method, signature: inspect.Signature, texts: list[str]):
    @functools.wraps(method)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name in texts:
            value = bound.arguments.get(name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string, not {type(value).__name__} ({value!r:.64})")
        return method(*args, **kwargs)

    return checked


@_text_arguments
class Client:
    """Queries over one channel. Every call has a deadline (`timeout` seconds, per call or default)."""

    def __init__(self, addr: str = "127.0.0.1:50051", token: str | None = None, tls: bool | bytes | None = None,
                 timeout: float = 30.0, cert: bytes | None = None, key: bytes | None = None) -> None:
        self.addr = addr
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = channel_for(addr, tls, cert=cert, key=key)
        self._stub = pb_grpc.AnalyticsServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None):
        return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)

    def _stream(self, method, request, timeout: float | None):
        """A stream from the server, which may run for as long as it has to send (no deadline
        unless `timeout`), once the server has answered a health check within the client's
        timeout: a server that accepts connections and never answers no longer holds it for
        ever, and one that is not there or does not speak TLS as we do fails at once, saying
        so (waiting for the channel to be ready waited the whole timeout, then said only that)."""
        if timeout is None:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            try:
                health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(), timeout=self.timeout)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise NotReady(self.addr, self.timeout) from None
                if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):  # answered, without checks
                    raise
        return method(request, timeout=timeout, metadata=self._metadata)

    def summary(self, test_id: str, start: Time = None, end: Time = None, *, device: str | None = None,
                country: str | None = None, event_type: str | None = None, analysis: dict | None = None,
                timeout: float | None = None, **options: Any) -> Summary:
        """Per-variant results, the comparisons with the control and the experiment's health.
        `options`: control, confidence, sequential, correction, expected_weights, prior (mean,
        variance), exclude_multi_variant_users, relative_interval ("delta" or "fieller"), guardrails
        ({metric: relative margin}), metric_event_type (conversions and revenue of that event type
        only, every user kept), revenue_cap ({"percentile": 99, "nonzero_only": True} or
        {"value": 500}: revenue per user capped for its comparison), session_metrics (conversions
        and events per session compared too); `analysis`
        takes AnalysisOptions fields by their protobuf names."""
        request = pb.SummaryRequest(test_id=test_id, filters=_filters(device, country, event_type),
                                    analysis=_analysis_options(**options, **(analysis or {})))
        _timestamp(start, request.start_time)
        _timestamp(end, request.end_time, end=True)
        r = self._call(self._stub.Summary, request, timeout)
        return Summary(r.test_id, [SummaryRow(row.variant, _metrics(row.metrics)) for row in r.rows],
                       _analysis(r.analysis), r.stats.events_scanned, _health(r.health))

    def segments(self, test_id: str, dimension: str, start: Time = None, end: Time = None, *,
                 device: str | None = None, country: str | None = None, event_type: str | None = None,
                 analysis: dict | None = None, timeout: float | None = None, **options: Any) -> Segments:
        request = pb.SegmentsRequest(test_id=test_id, dimension=_named(DIMENSIONS, "dimension", dimension),
                                     filters=_filters(device, country, event_type),
                                     analysis=_analysis_options(**options, **(analysis or {})))
        _timestamp(start, request.start_time)
        _timestamp(end, request.end_time, end=True)
        r = self._call(self._stub.Segments, request, timeout)
        return Segments(r.test_id, dimension,
                        [SegmentRow(row.variant, row.segment, _metrics(row.metrics)) for row in r.rows],
                        {a.segment: _analysis(a.analysis) for a in r.analyses}, r.stats.events_scanned)

    def timeseries(self, test_id: str, interval: str = "day", start: Time = None, end: Time = None, *,
                   cumulative: bool = False, device: str | None = None, country: str | None = None,
                   event_type: str | None = None, time_zone: str = "", lift: bool = False,
                   since_first_exposure: bool = False, analysis: dict | None = None, timeout: float | None = None,
                   **options: Any) -> Timeseries:
        """Per bucket and variant; with `lift` (and `cumulative`), each bucket's lift of every
        treatment over the control by confidence sequences (`options` as Summary's: control,
        confidence, correction, prior, expected_weights); with `since_first_exposure` instead of
        `cumulative`, the lift at each age (a timedelta) since users' first events."""
        request = pb.TimeseriesRequest(test_id=test_id, interval=_named(INTERVALS, "interval", interval),
                                       cumulative=cumulative,
                                       filters=_filters(device, country, event_type), time_zone=time_zone, lift=lift,
                                       since_first_exposure=since_first_exposure)
        if lift:
            request.analysis.CopyFrom(_analysis_options(**options, **(analysis or {})))
        _timestamp(start, request.start_time)
        _timestamp(end, request.end_time, end=True)
        r = self._call(self._stub.Timeseries, request, timeout)
        return Timeseries(r.test_id, interval, r.cumulative,
                          [TimeseriesRow(_utc(row.bucket_start), row.variant, _metrics(row.metrics))
                           for row in r.rows], r.stats.events_scanned,
                          [(lift.exposure.ToTimedelta() if since_first_exposure else _utc(lift.bucket_start),
                            _analysis(lift.analysis)) for lift in r.lifts])

    def list_tests(self, *, timeout: float | None = None) -> Tests:
        r = self._call(self._stub.ListTests, pb.ListTestsRequest(), timeout)
        return Tests([TestInfo(t.test_id, tuple(t.variants), t.events, t.users, _utc(t.first_event_time),
                               _utc(t.last_event_time), _experiment(t.experiment) if t.HasField("experiment") else None)
                      for t in r.tests])

    def quarantine(self, test_id: str = "", limit: int = 100, *, timeout: float | None = None) -> Quarantine:
        if not (isinstance(limit, int) and 1 <= limit < 2**32):
            raise ValueError(f"limit must be a whole number from 1 to {2**32 - 1:,}, not {limit!r}")
        r = self._call(self._stub.ListQuarantine, pb.ListQuarantineRequest(test_id=test_id, limit=limit), timeout)
        return Quarantine([QuarantinedEvent(_utc(q.received_time), q.index, q.field, q.message, _dict(q.event))
                           for q in r.events], r.total)

    def power(self, test_id: str, minimum_detectable_effect: float, *, power: float = 0.8, alpha: float = 0.05,
              control: str = "", users_per_variant: int = 0, timeout: float | None = None) -> Power:
        """Users needed per variant to detect a relative lift, from the test's own baseline; and
        with `users_per_variant` (default: the control's users so far), the lift those users
        detect and their power to detect the one asked for."""
        r = self._call(self._stub.Power, pb.PowerRequest(test_id=test_id,
                                                         minimum_detectable_effect=minimum_detectable_effect,
                                                         power=power, alpha=alpha, control_variant=control,
                                                         users_per_variant=users_per_variant), timeout)
        return Power(r.test_id, r.control_variant, [
            MetricPower(_name(pb.Metric, m.metric, "METRIC_"), m.baseline_mean, m.baseline_variance,
                        m.users_per_variant, m.days, m.status_message, m.at_users_per_variant, m.detectable_effect,
                        m.power) for m in r.metrics])

    def ingest_table(self, table: pa.Table, *, producer_id: str = "", sequence: int = 0, batch_size: int = 100_000,
                     timeout: float | None = None) -> list[pb.IngestEventsResponse]:
        """Sends an Arrow table of events (Event's field names) on one stream, `batch_size` rows
        per batch in the columnar format (`arrow_ipc`); returns the acks. With `producer_id`,
        batch k is sent with sequence `sequence` + k, so sending the table again stores nothing."""
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a whole number of events, 1 or more, not {batch_size!r}")
        requests = (pb.IngestEventsRequest(arrow_ipc=arrow_ipc(table.slice(at, batch_size)), producer_id=producer_id,
                                           sequence=sequence + k if producer_id else 0)
                    for k, at in enumerate(range(0, table.num_rows, batch_size)))
        return list(self._call(self._stub.IngestEvents, requests, timeout))

    def snapshot(self, *, timeout: float | None = None) -> Snapshot:
        r = self._call(self._admin.CreateSnapshot, admin_pb2.CreateSnapshotRequest(), timeout or 3600)
        return Snapshot(r.path, r.events, r.elapsed.ToTimedelta())

    def import_events(self, uri: str, *, format: str = "", endpoint_url: str = "", region: str = "",
                      timeout: float | None = None) -> Iterator[Imported]:
        """Has the server import every object under `uri` (s3://bucket/prefix/ or its own path)
        that it has not imported before; yields each object's progress as it starts and ends."""
        request = admin_pb2.ImportEventsRequest(uri=uri, format=format, endpoint_url=endpoint_url, region=region)
        for r in self._stream(self._admin.ImportEvents, request, timeout):
            yield Imported(r.uri, _name(admin_pb2.ImportState, r.state, "IMPORT_STATE_"), r.size, r.accepted,
                           r.quarantined, r.already_stored, r.error, r.objects_total, r.objects_done,
                           r.total_accepted, r.total_quarantined)

    # ---- lifecycle ----------------------------------------------------------------------

    def delete_test(self, test_id: str, *, timeout: float | None = None) -> int:
        """Removes a test's events, quarantined events and plan; the events removed."""
        return self._call(self._admin.DeleteTest, admin_pb2.DeleteTestRequest(test_id=test_id), timeout or 3600).events

    def erase_user(self, user_id: str, tests: Sequence[str] | str = (), *, timeout: float | None = None) -> int:
        """Removes a user's events (of `tests`, or of every test) from queries and from the
        server's disk before it returns; the events removed. One test may be given as its id
        alone: read as a sequence, "checkout" was eight tests of one letter, none of them the
        user's, and nothing was erased."""
        test_ids = [tests] if isinstance(tests, str) else list(tests)
        request = admin_pb2.EraseUserRequest(user_id=user_id, test_ids=test_ids)
        return self._call(self._admin.EraseUser, request, timeout or 3600).events

    def set_retention(self, test_id: str, days: float, *, timeout: float | None = None) -> Experiment:
        """Keeps a test's events `days` days (0: the server's --retention-days)."""
        r = self._call(self._admin.SetRetention, admin_pb2.SetRetentionRequest(test_id=test_id, days=days), timeout)
        return _experiment(r.experiment)

    def export(self, test_id: str, start: Time = None, end: Time = None, *,
               timeout: float | None = None) -> Iterator[pa.Table]:
        """A test's events as stored, as Arrow tables of at most 100,000 events, streamed."""
        request = admin_pb2.ExportEventsRequest(test_id=test_id)
        _timestamp(start, request.start_time)
        _timestamp(end, request.end_time, end=True)
        for r in self._stream(self._admin.ExportEvents, request, timeout):
            yield pa.ipc.open_stream(r.arrow_ipc).read_all()

    # ---- experiments --------------------------------------------------------------------

    def create_experiment(self, test_id: str, *, control: str = "", split: dict[str, float] | None = None,
                          start: Time = None, hypothesis: str = "", timeout: float | None = None) -> Experiment:
        """A test's plan; its queries take their control, split and start from it by default."""
        message = _plan(test_id, control, split, start, hypothesis)
        r = self._call(self._admin.CreateExperiment, admin_pb2.CreateExperimentRequest(experiment=message), timeout)
        return _experiment(r.experiment)

    def update_experiment(self, test_id: str, *, control: str = "", split: dict[str, float] | None = None,
                          start: Time = None, hypothesis: str = "", timeout: float | None = None) -> Experiment:
        """Changes what the arguments given set; the rest of the plan stays."""
        message = _plan(test_id, control, split, start, hypothesis)
        r = self._call(self._admin.UpdateExperiment, admin_pb2.UpdateExperimentRequest(experiment=message), timeout)
        return _experiment(r.experiment)

    def stop_experiment(self, test_id: str, *, at: Time = None, timeout: float | None = None) -> Experiment:
        request = admin_pb2.StopExperimentRequest(test_id=test_id)
        _timestamp(at, request.stop_time)
        return _experiment(self._call(self._admin.StopExperiment, request, timeout).experiment)

    def list_experiments(self, *, timeout: float | None = None) -> list[Experiment]:
        r = self._call(self._admin.ListExperiments, admin_pb2.ListExperimentsRequest(), timeout)
        return [_experiment(e) for e in r.experiments]




def _plan(test_id: str, control: str, split: dict[str, float] | None, start: Time, hypothesis: str) -> pb.Experiment:
    message = pb.Experiment(test_id=test_id, control_variant=control, split=split or {}, hypothesis=hypothesis)
    _timestamp(start, message.start_time)
    return message


def _filters(device: str | None, country: str | None, event_type: str | None) -> pb.Filters:
    values = {"device": device, "country": country, "event_type": event_type}
    return pb.Filters(**{k: v for k, v in values.items() if v is not None})
