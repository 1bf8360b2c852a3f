"""Random, oversized and garbage input never crashes the server; every rejection names a field."""

from __future__ import annotations

import grpc
import pyarrow as pa
from abstream.clients.client import arrow_ipc
from abstream.v1 import analytics_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_service_queries import bad_request

EVENT_FIELDS = {f.name for f in pb.Event.DESCRIPTOR.fields}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.one_of(st.text(max_size=20), st.text(min_size=250, max_size=400), st.sampled_from(["", "A", "B", "t"]))
timestamps = st.one_of(st.none(), st.tuples(st.integers(-10**11, 10**11), st.integers(0, 999_999_999)),
                       st.tuples(st.integers(946_684_800, 1_800_000_000), st.integers(0, 999_999_999)))


@st.composite
def events(draw) -> pb.Event:
    e = pb.Event(user_id=draw(text), test_id=draw(st.sampled_from(["fuzz", "", "fuzz2"]) | text),
                 variant=draw(text), event_type=draw(text), session_id=draw(text), device=draw(text),
                 country=draw(text), conversion=draw(st.integers(0, 2**32 - 1) | st.sampled_from([0, 1])),
                 revenue=draw(st.floats(allow_nan=True, allow_infinity=True)))
    ts = draw(timestamps)
    if ts is not None:
        e.timestamp.seconds, e.timestamp.nanos = ts
    return e


def healthy(channel) -> bool:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1


@FUZZ
@given(batch=st.lists(events(), min_size=0, max_size=15))
def test_random_events_are_accepted_or_rejected_by_field(server, channel, stub, batch):
    (ack,) = list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=batch)]), timeout=30))
    assert ack.accepted + ack.rejected == len(batch) == ack.accepted + len(ack.rejections)
    for r in ack.rejections:
        assert r.field in EVENT_FIELDS and r.message and r.index < len(batch)
    assert healthy(channel)


def timestamp_or_none(draw):
    value = draw(st.one_of(st.none(), st.integers(-(10**11), 10**11)))
    return None if value is None else {"seconds": value, "nanos": draw(st.integers(0, 999_999_999))}


floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 0.95, 1.0, -1.0])


@st.composite
def analysis_options(draw) -> pb.AnalysisOptions:
    o = pb.AnalysisOptions(control_variant=draw(st.sampled_from(["", "A", "B", "zz"])),
                           confidence_level=draw(floats), sequential=draw(st.booleans()),
                           sequential_tuning=draw(floats), srm_threshold=draw(floats),
                           correction=draw(st.integers(0, 5)))
    if draw(st.booleans()):
        o.prior_mean = draw(floats)
    if draw(st.booleans()):
        o.prior_variance = draw(floats)
    for variant in draw(st.lists(st.sampled_from(["A", "B", "C"]), max_size=3)):
        o.expected_weights[variant] = draw(floats)
    return o


@FUZZ
@given(data=st.data())
def test_random_queries_answer_or_name_the_bad_field(server, channel, stub, data):
    if data.draw(st.booleans()):  # some data to query, now and then
        list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[data.draw(events())])]), timeout=30))
    test_id = data.draw(st.sampled_from(["fuzz", "", "nope"]) | text)
    start, end = timestamp_or_none(data.draw), timestamp_or_none(data.draw)
    kind = data.draw(st.sampled_from(["summary", "segments", "timeseries"]))
    common = {"test_id": test_id}
    if start:
        common["start_time"] = start
    if end:
        common["end_time"] = end
    try:
        if kind == "summary":
            stub.Summary(pb.SummaryRequest(**common, analysis=data.draw(analysis_options())), timeout=30)
        elif kind == "segments":
            stub.Segments(pb.SegmentsRequest(**common, dimension=data.draw(st.integers(0, 6)),
                                             analysis=data.draw(analysis_options())), timeout=30)
        else:
            stub.Timeseries(pb.TimeseriesRequest(**common, interval=data.draw(st.integers(0, 6)),
                                                 cumulative=data.draw(st.booleans())), timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        violations = bad_request(error).field_violations
        assert len(violations) == 1 and violations[0].field and violations[0].description
    assert healthy(channel)


def arrow_reads(payload: bytes) -> bool:
    try:
        pa.ipc.open_stream(payload).read_all().validate(full=True)
        return True
    except (pa.ArrowInvalid, OSError):
        return False


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=300) | st.builds(
    lambda valid, cut: valid[:cut], st.just(arrow_ipc(pa.table({"user_id": ["u"], "test_id": ["t"]}))),
    st.integers(1, 400)))
def test_garbage_columnar_payloads_are_invalid_argument(server, channel, stub, garbage):
    """Bytes that Arrow itself cannot read as a stream are refused, naming arrow_ipc; what it can
    read is answered with an ack."""
    try:
        acks = list(stub.IngestEvents(iter([pb.IngestEventsRequest(arrow_ipc=garbage)]), timeout=30))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "arrow_ipc" in error.details(), error.details()
    else:
        assert arrow_reads(garbage), "bytes Arrow cannot read were accepted"
        assert len(acks) == 1
    assert healthy(channel)


def test_a_message_over_the_size_limit_is_refused_and_the_server_goes_on(server, channel, stub):
    huge = pb.IngestEventsRequest(arrow_ipc=b"x" * (65 * 1024 * 1024))
    try:
        list(stub.IngestEvents(iter([huge]), timeout=60))
        raise AssertionError("an oversized message was accepted")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert healthy(channel)
