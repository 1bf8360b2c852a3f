"""The real server on a real port: ingest over the stream, queries through generated stubs."""

from __future__ import annotations

import threading

import grpc
import pytest
from abstream.v1 import analytics_pb2 as pb
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.events import BASE_S, NS, ingest, random_events, to_message
from tests.oracle import Oracle
from tests.test_store_queries import assert_metrics_match


@pytest.fixture
def server(any_engine_server):
    """Every test here runs on both engines."""
    return any_engine_server


def ts(ns: int):
    from google.protobuf.timestamp_pb2 import Timestamp
    return Timestamp(seconds=ns // NS, nanos=ns % NS)


@pytest.fixture
def loaded(stub):
    events = random_events(1500, seed=11)
    acks = ingest(stub, events, size=200)
    assert [a.batch for a in acks] == list(range(len(acks)))
    assert sum(a.accepted for a in acks) == len(events) and all(a.rejected == 0 for a in acks)
    return stub, Oracle(events), events


def test_summary_over_grpc_matches_sql(loaded):
    stub, oracle, events = loaded
    boundary = sorted(e["timestamp"] for e in events)
    for test_id in ["checkout", "tëst-ünïcode-✓", "solo"]:
        for start, end in [(None, None), (boundary[10], boundary[900]), (boundary[5], None)]:
            request = pb.SummaryRequest(test_id=test_id)
            if start is not None:
                request.start_time.CopyFrom(ts(start))
            if end is not None:
                request.end_time.CopyFrom(ts(end))
            response = stub.Summary(request, timeout=10)
            expected = oracle.summary(test_id, start, end)
            assert response.test_id == test_id
            assert [r.variant for r in response.rows] == [e["variant"] for e in expected]
            for row, theirs in zip(response.rows, expected):
                assert_metrics_match(row.metrics, theirs)
            assert response.stats.events_scanned == sum(e["events"] for e in expected)
            assert response.stats.elapsed.ToNanoseconds() > 0


def test_single_variant_test(loaded):
    stub, oracle, _ = loaded
    response = stub.Summary(pb.SummaryRequest(test_id="solo"), timeout=10)
    assert [r.variant for r in response.rows] == ["only"]


def test_segments_over_grpc(loaded):
    stub, oracle, _ = loaded
    request = pb.SegmentsRequest(test_id="checkout", dimension=pb.DIMENSION_DEVICE,
                                 filters=pb.Filters(country="US"))
    response = stub.Segments(request, timeout=10)
    expected = oracle.segments("checkout", "device", filters={"country": "US"})
    assert response.dimension == pb.DIMENSION_DEVICE
    assert [(r.variant, r.segment) for r in response.rows] == [(e["variant"], e["segment"]) for e in expected]
    for row, theirs in zip(response.rows, expected):
        assert_metrics_match(row.metrics, theirs)


@pytest.mark.parametrize("cumulative", [False, True])
def test_timeseries_over_grpc(loaded, cumulative):
    stub, oracle, _ = loaded
    request = pb.TimeseriesRequest(test_id="homepage_redesign", interval=pb.INTERVAL_HOUR, cumulative=cumulative,
                                   filters=pb.Filters(event_type="click"))
    response = stub.Timeseries(request, timeout=10)
    expected = oracle.timeseries("homepage_redesign", "HOUR", filters={"event_type": "click"},
                                 cumulative=cumulative)
    assert response.cumulative == cumulative and response.interval == pb.INTERVAL_HOUR
    assert [(r.bucket_start.ToNanoseconds(), r.variant) for r in response.rows] == \
        [(e["bucket"], e["variant"]) for e in expected]
    for row, theirs in zip(response.rows, expected):
        assert_metrics_match(row.metrics, theirs)


def test_list_tests_over_grpc(loaded):
    stub, _, events = loaded
    response = stub.ListTests(pb.ListTestsRequest(), timeout=10)
    ids = sorted({e["test_id"] for e in events})
    assert [t.test_id for t in response.tests] == ids
    checkout = next(t for t in response.tests if t.test_id == "checkout")
    mine = [e for e in events if e["test_id"] == "checkout"]
    assert checkout.events == len(mine)
    assert checkout.users == len({e["user_id"] for e in mine})
    assert list(checkout.variants) == ["control", "variant_a", "variant_b"]
    assert checkout.first_event_time.ToNanoseconds() == min(e["timestamp"] for e in mine)
    assert checkout.last_event_time.ToNanoseconds() == max(e["timestamp"] for e in mine)


def test_acked_batch_is_visible_to_the_next_query(stub):
    """Each ack is followed by a query on another connection state: it must already count the batch."""
    event = dict(timestamp=BASE_S * NS, user_id="u", test_id="fresh", variant="v", event_type="click",
                 conversion=0, revenue=1.0, session_id="", device="", country="")
    acked = 0
    requests_sent = threading.Semaphore(0)

    def requests():
        for i in range(20):
            yield pb.IngestEventsRequest(events=[to_message({**event, "user_id": f"u{i}"})] * 3)
            requests_sent.acquire()  # send the next batch only after its predecessor was checked

    for ack in stub.IngestEvents(requests(), timeout=30):
        acked += ack.accepted
        response = stub.Summary(pb.SummaryRequest(test_id="fresh"), timeout=10)
        assert response.rows[0].metrics.events == acked
        requests_sent.release()
    assert acked == 60


def test_concurrent_ingest_and_queries_lose_nothing_and_never_tear(server, stub):
    """Writers each send batches of 7 events of test 'conc'; on the embedded engine, readers only
    ever see multiples of 7 (a batch becomes visible all at once). The cluster engine makes a batch
    visible shard by shard (docs/scale.md): a query during an insert may see part of it, never
    more than has been sent, and all of it once it is acked."""
    batch_size, batches_per_writer, writers = 7, 60, 3
    seen: list[int] = []
    by_reader: list[list[int]] = [[], []]
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(w: int) -> None:
        try:
            events = [dict(timestamp=(BASE_S + i) * NS, user_id=f"w{w}-{i % 50}", test_id="conc",
                           variant=f"v{i % 2}", event_type="view", conversion=int(i % 3 == 0), revenue=1.5,
                           session_id="s", device="d", country="c")
                      for i in range(batch_size * batches_per_writer)]
            acks = ingest(stub, events, size=batch_size)
            assert sum(a.accepted for a in acks) == len(events)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    def reader(r: int) -> None:
        try:
            while not done.is_set():
                rows = stub.Summary(pb.SummaryRequest(test_id="conc"), timeout=10).rows
                seen.append(sum(row.metrics.events for row in rows))
                by_reader[r].append(seen[-1])
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    readers = [threading.Thread(target=reader, args=(r,)) for r in range(2)]
    writing = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in readers + writing:
        t.start()
    for t in writing:
        t.join(timeout=120)
    done.set()
    for t in readers:
        t.join(timeout=30)
    assert not errors, errors
    assert seen and all(0 <= n <= batch_size * batches_per_writer * writers for n in seen)
    assert all(counts == sorted(counts) for counts in by_reader)  # what was seen is never unseen
    if server.settings.engine == "embedded":
        assert all(n % batch_size == 0 for n in seen)
    final = stub.Summary(pb.SummaryRequest(test_id="conc"), timeout=10)
    assert sum(r.metrics.events for r in final.rows) == batch_size * batches_per_writer * writers
    # user i % 50 and variant i % 2 have the same parity: each user is in exactly one variant
    assert sum(r.metrics.users for r in final.rows) == writers * 50


def bad_request(error: grpc.RpcError) -> error_details_pb2.BadRequest:
    status = rpc_status.from_call(error)
    assert status is not None, "status details missing"
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return detail


@pytest.mark.parametrize("call,request_,field", [
    ("Summary", pb.SummaryRequest(), "test_id"),
    ("Summary", pb.SummaryRequest(test_id="t", start_time=ts(2 * NS), end_time=ts(NS)), "end_time"),
    ("Segments", pb.SegmentsRequest(test_id="t"), "dimension"),
    ("Segments", pb.SegmentsRequest(test_id="t", dimension=99), "dimension"),
    ("Segments", pb.SegmentsRequest(dimension=pb.DIMENSION_DEVICE), "test_id"),
    ("Timeseries", pb.TimeseriesRequest(test_id="t"), "interval"),
    ("Timeseries", pb.TimeseriesRequest(test_id="t", interval=42), "interval"),
    ("Timeseries", pb.TimeseriesRequest(test_id="t", interval=pb.INTERVAL_DAY, start_time=ts(5 * NS),
                                        end_time=ts(4 * NS)), "end_time"),
    # Below ~1e-16, 1 - confidence is 1: sequential intervals divided by 0.
    ("Summary", pb.SummaryRequest(test_id="t", analysis=pb.AnalysisOptions(confidence_level=1e-20, sequential=True)),
     "confidence_level"),
    # Segments cannot honour it (it was ignored, the users asked to be left out counted).
    ("Segments", pb.SegmentsRequest(test_id="t", dimension=pb.DIMENSION_DEVICE,
                                    analysis=pb.AnalysisOptions(exclude_multi_variant_users=True)),
     "exclude_multi_variant_users"),
])
def test_bad_queries_are_invalid_argument_naming_the_field(stub, call, request_, field):
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, call)(request_, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    violations = bad_request(caught.value).field_violations
    assert [v.field for v in violations] == [field] and violations[0].description


def test_segments_of_more_groups_than_an_answer_may_have_are_refused_before_computing_them(stub):
    """A dimension with a value per event (here 50,001 countries x 2 variants) made Segments
    compute and analyse every group, for minutes, past any deadline."""
    from abstream.core.types import MAX_SEGMENT_GROUPS

    n = MAX_SEGMENT_GROUPS + 2
    events = [{"timestamp": (BASE_S + i) * NS, "user_id": f"u{i}", "test_id": "wide", "variant": "ab"[i % 2],
               "event_type": "view", "conversion": 0, "revenue": 0.0, "session_id": "s", "device": "desktop",
               "country": f"c{i // 2}"} for i in range(n)]
    assert sum(a.accepted for a in ingest(stub, events, size=5000)) == n
    with pytest.raises(grpc.RpcError) as caught:
        stub.Segments(pb.SegmentsRequest(test_id="wide", dimension=pb.DIMENSION_COUNTRY), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "50,001 values of country x 2 variants would be 100,002 groups" in caught.value.details()
    assert [v.field for v in bad_request(caught.value).field_violations] == ["dimension"]
    by_device = stub.Segments(pb.SegmentsRequest(test_id="wide", dimension=pb.DIMENSION_DEVICE), timeout=60)
    assert sum(r.metrics.events for r in by_device.rows) == n


def test_power_for_a_lift_too_large_to_size_says_why(loaded):
    stub, _, _ = loaded
    answer = stub.Power(pb.PowerRequest(test_id="checkout", minimum_detectable_effect=1e160), timeout=10)
    assert answer.metrics
    for metric in answer.metrics:
        assert metric.users_per_variant == 0 and metric.status_message, metric


def test_unknown_test_is_an_empty_result(stub):
    response = stub.Summary(pb.SummaryRequest(test_id="never-seen"), timeout=10)
    assert list(response.rows) == [] and response.test_id == "never-seen"
