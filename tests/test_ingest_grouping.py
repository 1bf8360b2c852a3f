"""Requests that queue up on a stream are stored together as one batch and acked one by one:
each ack still says what became of its own request, exactly once per producer sequence."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from abstream.core.auth import ANYONE
from abstream.core.dataplane import GROUP_REQUESTS, Core
from abstream.core.errors import InvalidArgument, Unavailable
from abstream.core.events import check
from abstream.core.types import ValidatedBatch
from abstream.service import converters
from abstream.store import EventStore
from abstream.v1 import analytics_pb2 as pb

from tests.events import BASE_S, NS, to_message, to_table

INGEST = "/abstream.v1.AnalyticsService/IngestEvents"
REQUESTS, EVENTS = 120, 40


def event(request: int, k: int, test_id: str = "grouped") -> dict:
    return dict(timestamp=(BASE_S + request * 60 + k) * NS, user_id=f"u{request}_{k % 7}", test_id=test_id,
                variant="A" if k % 2 else "B", event_type="click", conversion=int(k % 3 == 0),
                revenue=float(k), session_id=f"s{request}", device="mobile", country="US")


def bad_at(request: int) -> dict[int, str]:
    """Which events of a request are bad, and the field each one's rejection names: a different
    pattern per request, none in some."""
    if request % 4 == 3:
        return {}
    return {request % EVENTS: "conversion", (request * 7 + 3) % EVENTS: "variant"} if request % 5 \
        else {EVENTS - 1: "user_id"}


def spoiled(e: dict, field: str) -> dict:
    return {**e, **{"conversion": {"conversion": 5}, "variant": {"variant": ""}, "user_id": {"user_id": ""}}[field]}


def request_bytes(request: int, test_id: str = "grouped", producer: str = "", sequence: int = 0) -> bytes:
    bad = bad_at(request)
    events = [event(request, k, test_id) for k in range(EVENTS)]
    events = [spoiled(e, bad[k]) if k in bad else e for k, e in enumerate(events)]
    return pb.IngestEventsRequest(events=[to_message(e) for e in events], producer_id=producer,
                                  sequence=sequence).SerializeToString()


def send(channel: grpc.Channel, requests: list[bytes]) -> list[pb.IngestEventsResponse]:
    call = channel.stream_stream(INGEST, request_serializer=None,
                                 response_deserializer=pb.IngestEventsResponse.FromString)
    return list(call(iter(requests), timeout=120))


def stored_batches(server) -> tuple[float, float]:
    """(stored batches, requests in them) since the server started."""
    registry = server.server.metrics.registry
    return (registry.get_sample_value("abstream_requests_per_stored_batch_count"),
            registry.get_sample_value("abstream_requests_per_stored_batch_sum"))


def events_of(stub, test_id: str) -> int:
    return sum(r.metrics.events for r in stub.Summary(pb.SummaryRequest(test_id=test_id), timeout=30).rows)


@pytest.fixture
def server(any_engine_server):
    return any_engine_server


def test_each_ack_is_its_own_requests_when_requests_are_stored_together(server, channel, stub):
    acks = send(channel, [request_bytes(i) for i in range(REQUESTS)])

    assert len(acks) == REQUESTS
    for i, ack in enumerate(acks):
        bad = bad_at(i)
        assert (ack.accepted, ack.rejected) == (EVENTS - len(bad), len(bad)), i
        assert [(r.index, r.field) for r in ack.rejections] == sorted(bad.items()), i
        assert ack.batch == i
    batches, requests = stored_batches(server)
    assert requests == REQUESTS
    assert batches < REQUESTS  # requests queued up behind the first and were stored together
    total_bad = sum(len(bad_at(i)) for i in range(REQUESTS))
    assert events_of(stub, "grouped") == REQUESTS * EVENTS - total_bad
    assert stub.ListQuarantine(pb.ListQuarantineRequest(test_id="grouped", limit=1000), timeout=30).total \
        == total_bad


def test_a_producer_resending_a_window_is_stored_exactly_once(server, channel, stub):
    """The second stream repeats sequences 41-80 and goes on to 120: requests stored together
    never reach back over a sequence already applied."""
    first = send(channel, [request_bytes(i, "resent", "p1", i + 1) for i in range(80)])
    again = send(channel, [request_bytes(i, "resent", "p1", i + 1) for i in range(40, REQUESTS)])

    assert not any(a.duplicate for a in first)
    assert [a.duplicate for a in again] == [True] * 40 + [False] * (REQUESTS - 80)
    assert all(a.accepted == 0 for a in again[:40])
    for i, ack in zip(range(80, REQUESTS), again[40:]):
        assert ack.accepted == EVENTS - len(bad_at(i)), i
    assert events_of(stub, "resent") == sum(EVENTS - len(bad_at(i)) for i in range(REQUESTS))


def test_requests_stored_together_never_reach_back_over_an_applied_sequence():
    """Through the core itself, with every request there at once, so that they are stored
    GROUP_REQUESTS at a time: a resend of sequences 41-120 after 1-100 were applied must not
    form a batch of 89-104 (or the engine refuses it, and the stream could never get past it)."""
    core = Core()
    core.engine = EventStore()

    async def ingest(requests: list[bytes]) -> list:
        async def arriving():
            for r in requests:
                yield r
        return [r async for r in core.ingest(ANYONE, arriving(), lambda raw: converters.measure_request(raw, 10_000),
                                             lambda raw: converters.decode_request(raw, 10_000))]
    try:
        first = asyncio.run(ingest([request_bytes(i, "resent", "p1", i + 1) for i in range(100)]))
        batches = core.metrics.registry.get_sample_value("abstream_requests_per_stored_batch_count")
        again = asyncio.run(ingest([request_bytes(i, "resent", "p1", i + 1) for i in range(40, REQUESTS)]))
    finally:
        core.close()
    assert batches == -(-100 // GROUP_REQUESTS)
    assert [r.duplicate for r in first] == [False] * 100
    assert [r.duplicate for r in again] == [True] * 60 + [False] * (REQUESTS - 100)
    assert [r.accepted for r in again[60:]] == [EVENTS - len(bad_at(i)) for i in range(100, REQUESTS)]
    assert sum(t.events for t in core.engine.list_tests()) == sum(EVENTS - len(bad_at(i)) for i in range(REQUESTS))


def test_a_request_that_cannot_be_read_ends_the_stream_after_the_ones_before(server, channel, stub):
    requests = [request_bytes(i, "cut") for i in range(30)] + [b"\xff\xff\xff"] \
        + [request_bytes(i, "cut") for i in range(30, 40)]
    call = channel.stream_stream(INGEST, request_serializer=None,
                                 response_deserializer=pb.IngestEventsResponse.FromString)
    acks = []
    with pytest.raises(grpc.RpcError) as error:
        for ack in call(iter(requests), timeout=120):
            acks.append(ack)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(acks) == 30
    assert events_of(stub, "cut") == sum(EVENTS - len(bad_at(i)) for i in range(30))


def test_a_request_whose_events_cannot_be_read_ends_the_stream_after_the_ones_stored_with_it():
    """Requests are read together, as one batch: when one of them cannot be read (only inside its
    events, so it was measured), those before it, in its batch too, are stored and acked, one by one
    in that batch's case, and the stream ends with its error."""
    core = Core()
    core.engine = EventStore()
    good = GROUP_REQUESTS + 4  # a whole batch of them, then 4 in the batch of the unreadable one
    unreadable = b"\x0a\x03\x0a\x01\x08"  # an event whose timestamp ends inside a varint
    requests = [request_bytes(i, "unreadable") for i in range(good)] + [unreadable] \
        + [request_bytes(i, "unreadable") for i in range(good, good + 10)]
    results = []

    async def ingest() -> None:
        async def arriving():
            for r in requests:
                yield r
        async for r in core.ingest(ANYONE, arriving(), lambda raw: converters.measure_request(raw, 10_000),
                                   lambda raws: converters.decode_request(raws, 10_000)):
            results.append(r)
    try:
        with pytest.raises(InvalidArgument, match="truncated varint"):
            asyncio.run(ingest())
        batches, stored = (core.metrics.registry.get_sample_value(f"abstream_requests_per_stored_batch_{k}")
                           for k in ("count", "sum"))
    finally:
        core.close()
    assert [r.accepted for r in results] == [EVENTS - len(bad_at(i)) for i in range(good)]
    assert [[(x.index, x.field) for x in r.rejections] for r in results] == [sorted(bad_at(i).items())
                                                                           for i in range(good)]
    assert (batches, stored) == (1 + 4, good)
    assert sum(t.events for t in core.engine.list_tests()) == sum(EVENTS - len(bad_at(i)) for i in range(good))


def test_a_batch_of_a_producers_requests_is_applied_whole_or_not_at_all(tmp_path):
    """Two streams of one producer at once: a batch whose first sequence was applied meanwhile
    is refused (the stream is told to send again), none of it stored."""
    store = EventStore()
    store.append(to_table([event(0, k, "race") for k in range(3)]), producer_id="p", sequence=5)

    def batch(first: int, last: int) -> ValidatedBatch:
        table, rejections = check(to_table([event(1, k, "race") for k in range(4)]), BASE_S * NS)
        return ValidatedBatch(table, rejections, BASE_S * NS, "p", last, None, first)

    with pytest.raises(Unavailable, match="batches 3 to 8"):
        store.apply(store.prepare(batch(3, 8)))
    assert store.apply(store.prepare(batch(2, 5))).duplicate
    assert store.apply(store.prepare(batch(6, 9))).accepted == 4
    assert store.last_sequence("p") == 9
    assert sum(t.events for t in store.list_tests() if t.test_id == "race") == 7


def test_chunks_of_a_file_stored_together_name_the_line_of_each_rejected_event(tmp_path):
    """Chunks of a file read before they are stored go together, as one batch each time: every
    rejected event is still named by its own file and line, in the answer and in the quarantine."""
    from abstream.clients import files
    from abstream.sources.ingest import Ingest

    path = tmp_path / "events.ndjson"
    bad = {3: "not json", 1_204: '{"user_id": "u", "test_id": "lines", "variant": ""}', 2_999: "[1, 2"}
    with open(path, "w") as f:
        for line in range(1, 3_001):
            e = event(line // 40, line % 40, "lines")
            f.write(bad.get(line, json.dumps({**e, "timestamp": e["timestamp"] // NS})) + "\n")
    core = Core()
    core.engine = EventStore()
    sources = Ingest(core, 1)
    try:
        outcome = asyncio.run(sources.chunks(ANYONE, lambda: files.read(str(path), "ndjson", 500),
                                             where=lambda line: f"events.ndjson line {line}", whole=True))
        batches = core.metrics.registry.get_sample_value("abstream_requests_per_stored_batch_count")
    finally:
        sources.close()
        core.close()
    assert batches < 6  # six chunks of 500 lines, stored in fewer batches
    assert (outcome.stored, outcome.quarantined) == (3_000 - len(bad), len(bad))
    assert [r["line"] for r in outcome.rejections] == sorted(bad)
    quarantined, total = core.engine.quarantine("", 100)
    assert total == len(bad)
    assert sorted(int(q.message.split(" line ")[1].split(":")[0]) for q in quarantined) == sorted(bad)
