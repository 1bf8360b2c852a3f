"""The Python client: typed results from every query, with a deadline on every call.

    from abstream.clients import Client
    with Client("127.0.0.1:50051") as client:
        for row in client.summary("checkout").rows:
            print(row.variant, row.users, row.conversion_rate)
        table = client.timeseries("checkout", interval="hour").to_arrow()
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Sequence

import grpc
import pyarrow as pa
import pyarrow.compute as pc
from abstream.v1 import admin_pb2, admin_pb2_grpc
from abstream.v1 import analytics_pb2 as pb
from abstream.v1 import analytics_pb2_grpc as pb_grpc
from google.protobuf import json_format

Time = dt.datetime | str | None
DIMENSIONS = {"device": pb.DIMENSION_DEVICE, "country": pb.DIMENSION_COUNTRY, "event_type": pb.DIMENSION_EVENT_TYPE}
INTERVALS = {"minute": pb.INTERVAL_MINUTE, "hour": pb.INTERVAL_HOUR, "day": pb.INTERVAL_DAY, "week": pb.INTERVAL_WEEK}


def parse_time(value: Time) -> dt.datetime | None:
    """A datetime from a datetime (naive means UTC) or text: RFC 3339 or 'YYYY-MM-DD[ HH:MM:SS]'."""
    if value is None or isinstance(value, dt.datetime):
        moment = value
    else:
        text = value.strip().replace("Z", "+00:00")
        moment = dt.datetime.fromisoformat(text)
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment


def _timestamp(value: Time, message) -> None:
    moment = parse_time(value)
    if moment is not None:
        message.FromDatetime(moment)


#: One group's metrics: the Metrics message's fields, as a frozen dataclass.
Metrics = make_dataclass("Metrics", [(f.name, float if f.type == f.TYPE_DOUBLE else int)
                                     for f in pb.Metrics.DESCRIPTOR.fields], frozen=True)


@dataclass(frozen=True)
class SummaryRow:
    variant: str
    metrics: Metrics


@dataclass(frozen=True)
class SegmentRow:
    variant: str
    segment: str
    metrics: Metrics


def _metrics(m: pb.Metrics) -> Metrics:
    return Metrics(**{f.name: getattr(m, f.name) for f in fields(Metrics)})


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
                else:
                    record[f.name] = value
            flat.append(record)
        return pa.Table.from_pylist(flat)


@dataclass(frozen=True)
class Summary(_Table):
    test_id: str
    rows: list[SummaryRow]
    analysis: dict[str, Any]  # the Analysis message as a dict (protobuf JSON names)
    events_scanned: int


@dataclass(frozen=True)
class Segments(_Table):
    test_id: str
    dimension: str
    rows: list[SegmentRow]
    analyses: dict[str, dict[str, Any]]  # per segment value
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


@dataclass(frozen=True)
class TestInfo:
    test_id: str
    variants: tuple[str, ...]
    events: int
    users: int
    first_event_time: dt.datetime
    last_event_time: dt.datetime


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


def _utc(ts) -> dt.datetime:
    return ts.ToDatetime(tzinfo=dt.timezone.utc)


def _dict(message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def channel_for(addr: str, tls: bool | bytes | None = None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel: plaintext by default; `tls=True` for the system's roots, or a CA certificate (PEM)."""
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
               *options]
    if not tls:
        return grpc.insecure_channel(addr, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=None if tls is True else tls)
    return grpc.secure_channel(addr, credentials, options=options)


class Client:
    """Queries over one channel. Every call has a deadline (`timeout` seconds, per call or default)."""

    def __init__(self, addr: str = "127.0.0.1:50051", token: str | None = None, tls: bool | bytes | None = None,
                 timeout: float = 30.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = channel_for(addr, tls)
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

    def summary(self, test_id: str, start: Time = None, end: Time = None, *, analysis: dict | None = None,
                timeout: float | None = None) -> Summary:
        request = pb.SummaryRequest(test_id=test_id)
        _timestamp(start, request.start_time) if start is not None else None
        _timestamp(end, request.end_time) if end is not None else None
        if analysis:
            json_format.ParseDict(analysis, request.analysis)
        r = self._call(self._stub.Summary, request, timeout)
        return Summary(r.test_id, [SummaryRow(row.variant, _metrics(row.metrics)) for row in r.rows],
                       _dict(r.analysis), r.stats.events_scanned)

    def segments(self, test_id: str, dimension: str, start: Time = None, end: Time = None, *,
                 device: str | None = None, country: str | None = None, event_type: str | None = None,
                 analysis: dict | None = None, timeout: float | None = None) -> Segments:
        request = pb.SegmentsRequest(test_id=test_id, dimension=DIMENSIONS.get(dimension, 0),
                                     filters=_filters(device, country, event_type))
        _timestamp(start, request.start_time) if start is not None else None
        _timestamp(end, request.end_time) if end is not None else None
        if analysis:
            json_format.ParseDict(analysis, request.analysis)
        r = self._call(self._stub.Segments, request, timeout)
        return Segments(r.test_id, dimension,
                        [SegmentRow(row.variant, row.segment, _metrics(row.metrics)) for row in r.rows],
                        {a.segment: _dict(a.analysis) for a in r.analyses}, r.stats.events_scanned)

    def timeseries(self, test_id: str, interval: str = "day", start: Time = None, end: Time = None, *,
                   cumulative: bool = False, device: str | None = None, country: str | None = None,
                   event_type: str | None = None, timeout: float | None = None) -> Timeseries:
        request = pb.TimeseriesRequest(test_id=test_id, interval=INTERVALS.get(interval, 0), cumulative=cumulative,
                                       filters=_filters(device, country, event_type))
        _timestamp(start, request.start_time) if start is not None else None
        _timestamp(end, request.end_time) if end is not None else None
        r = self._call(self._stub.Timeseries, request, timeout)
        return Timeseries(r.test_id, interval, r.cumulative,
                          [TimeseriesRow(_utc(row.bucket_start), row.variant, _metrics(row.metrics))
                           for row in r.rows], r.stats.events_scanned)

    def list_tests(self, *, timeout: float | None = None) -> Tests:
        r = self._call(self._stub.ListTests, pb.ListTestsRequest(), timeout)
        return Tests([TestInfo(t.test_id, tuple(t.variants), t.events, t.users, _utc(t.first_event_time),
                               _utc(t.last_event_time)) for t in r.tests])

    def quarantine(self, test_id: str = "", limit: int = 100, *, timeout: float | None = None) -> Quarantine:
        r = self._call(self._stub.ListQuarantine, pb.ListQuarantineRequest(test_id=test_id, limit=limit), timeout)
        return Quarantine([QuarantinedEvent(_utc(q.received_time), q.index, q.field, q.message, _dict(q.event))
                           for q in r.events], r.total)

    def ingest_table(self, table: pa.Table, *, producer_id: str = "", sequence: int = 0, batch_size: int = 100_000,
                     timeout: float | None = None) -> list[pb.IngestEventsResponse]:
        """Sends an Arrow table of events (Event's field names) on one stream, `batch_size` rows
        per batch in the columnar format (`arrow_ipc`); returns the acks. With `producer_id`,
        batch k is sent with sequence `sequence` + k, so sending the table again stores nothing."""
        requests = (pb.IngestEventsRequest(arrow_ipc=arrow_ipc(table.slice(at, batch_size)), producer_id=producer_id,
                                           sequence=sequence + k if producer_id else 0)
                    for k, at in enumerate(range(0, table.num_rows, batch_size)))
        return list(self._call(self._stub.IngestEvents, requests, timeout))

    def snapshot(self, *, timeout: float | None = None) -> admin_pb2.CreateSnapshotResponse:
        return self._call(self._admin.CreateSnapshot, admin_pb2.CreateSnapshotRequest(), timeout or 3600)


#: Columns with few distinct values: sent dictionary-encoded, so the server encodes each value once.
LOW_CARDINALITY = ("test_id", "variant", "event_type", "device", "country")


def arrow_ipc(table: pa.Table, compression: str | None = "lz4") -> bytes:
    """Events as the columnar path takes them fastest: low-cardinality strings dictionary-encoded
    with the narrowest indices, `conversion` as int8, buffers LZ4-compressed (about 30 bytes per
    event instead of 100 for plain strings: less to send, to log and to checksum)."""
    columns = {}
    for name in table.column_names:
        col = table.column(name)
        if name in LOW_CARDINALITY and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            encoded = col.combine_chunks().dictionary_encode()
            size = len(encoded.dictionary)
            index_type = pa.int8() if size <= 127 else pa.int16() if size <= 32767 else pa.int32()
            col = pa.DictionaryArray.from_arrays(encoded.indices.cast(index_type), encoded.dictionary.cast(pa.string()))
        elif name == "conversion" and pa.types.is_integer(col.type):
            low_high = pc.min_max(col).values()
            if all(v.is_valid and 0 <= v.as_py() <= 1 for v in low_high):  # others must reach the server as sent
                col = col.cast(pa.int8())
        columns[name] = col
    sink = pa.BufferOutputStream()
    encoded_table = pa.table(columns)
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, encoded_table.schema, options=options) as writer:
        writer.write_table(encoded_table)
    return sink.getvalue().to_pybytes()


def _filters(device: str | None, country: str | None, event_type: str | None) -> pb.Filters:
    values = {"device": device, "country": country, "event_type": event_type}
    return pb.Filters(**{k: v for k, v in values.items() if v is not None})
