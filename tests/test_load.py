"""A bounded load test on loopback: streams and queries at once for a fixed time; totals add up."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from abstream.core.auth import ANYONE
from abstream.core.dataplane import QUERY_PRIORITY_WAIT_S, Core
from abstream.core.types import SummaryQuery
from abstream.store import EventStore
from abstream.store.ingest import SEAL_WAIT_S
from abstream.v1 import analytics_pb2 as pb

from tests.events import BASE_S, NS, to_message, to_table

SECONDS, STREAMS, READERS, BATCH, MAX_BATCHES = 4.0, 4, 2, 200, 400  # every loop stops by itself


def test_streams_and_queries_for_a_fixed_time(server):
    deadline = time.monotonic() + SECONDS
    acked = [0] * STREAMS
    queries = [0] * READERS
    errors: list[BaseException] = []

    def write(w: int) -> None:
        def requests():
            for b in range(MAX_BATCHES):
                if time.monotonic() > deadline:
                    return
                yield pb.IngestEventsRequest(
                    events=[to_message(dict(timestamp=(BASE_S + b) * NS + i, user_id=f"w{w}-{b}-{i}", test_id="load",
                                            variant="AB"[i % 2], event_type="e", conversion=int(i % 7 == 0),
                                            revenue=float(i % 3), session_id="", device="", country=""))
                            for i in range(BATCH)], producer_id=f"load-{w}", sequence=b + 1)
        try:
            with grpc.insecure_channel(server.address) as ch:
                for ack in pb_stub(ch).IngestEvents(requests(), timeout=SECONDS + 60):
                    acked[w] += ack.accepted
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def read(r: int) -> None:
        try:
            with grpc.insecure_channel(server.address) as ch:
                stub = pb_stub(ch)
                while time.monotonic() < deadline:
                    stub.Summary(pb.SummaryRequest(test_id="load"), timeout=30)
                    stub.Timeseries(pb.TimeseriesRequest(test_id="load", interval=pb.INTERVAL_MINUTE), timeout=30)
                    queries[r] += 2
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(STREAMS)]
    threads += [threading.Thread(target=read, args=(r,)) for r in range(READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + 120)
    assert not errors, errors
    total = sum(acked)
    assert total > 0 and sum(queries) > 0
    with grpc.insecure_channel(server.address) as ch:
        rows = pb_stub(ch).Summary(pb.SummaryRequest(test_id="load"), timeout=30).rows
    assert sum(r.metrics.events for r in rows) == total
    assert sum(r.metrics.users for r in rows) == total  # every event had its own user


def pb_stub(channel):
    from abstream.v1 import analytics_pb2_grpc

    return analytics_pb2_grpc.AnalyticsServiceStub(channel)


def yielded_seconds(server) -> float:
    return server.server.metrics.registry.get_sample_value("abstream_ingest_yield_seconds_total")


@pytest.mark.parametrize("query", ["Summary", "ListTests", "ListQuarantine"])
def test_ingest_yields_to_queries_but_never_stalls(server, stub, query):
    """Ingest waits while queries run, at most a moment per batch: under back-to-back queries
    from two readers, ingest is seen to wait, and every batch of a stream is still acknowledged
    and stored. ListTests and ListQuarantine are queries like the others."""
    call = {"Summary": lambda: stub.Summary(pb.SummaryRequest(test_id="priority"), timeout=30),
            "ListTests": lambda: stub.ListTests(pb.ListTestsRequest(), timeout=30),
            "ListQuarantine": lambda: stub.ListQuarantine(pb.ListQuarantineRequest(), timeout=30)}[query]
    stop = threading.Event()
    answered = [0, 0]
    errors: list[BaseException] = []

    def read(r: int) -> None:
        try:
            for _ in range(100_000):  # bounded; stopped once the writer is done
                if stop.is_set():
                    return
                call()
                answered[r] += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    readers = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while sum(answered) < 10 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not errors and sum(answered) >= 10, errors
        before = yielded_seconds(server)
        batches = [pb.IngestEventsRequest(events=[to_message(dict(
            timestamp=(BASE_S + b) * NS, user_id=f"p{b}-{i}", test_id="priority", variant="AB"[i % 2], event_type="e",
            conversion=0, revenue=0.0, session_id="", device="", country="")) for i in range(50)]) for b in range(40)]
        acks = list(stub.IngestEvents(iter(batches), timeout=60))
        waited = yielded_seconds(server) - before
        still_querying = not stop.is_set() and all(t.is_alive() for t in readers)
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=60)
    assert not errors, errors
    assert still_querying and [a.accepted for a in acks] == [50] * 40
    assert 0 < waited < 40 * 2 * 0.05 + 1e-9  # it waited, and at most 50 ms per step
    rows = stub.Summary(pb.SummaryRequest(test_id="priority"), timeout=10).rows
    assert sum(r.metrics.events for r in rows) == 2000


def test_sealing_yields_to_running_queries():
    """The sealer waits while a query runs, before each test's rows become parts (up to
    QUERY_PRIORITY_WAIT_S each, as ingest's own steps do, and SEAL_WAIT_S in all: a tail of
    thousands of tests must not wait a step each), and finishes once the query has."""
    core, store = Core(), EventStore(seal_rows=300)
    core.engine = store
    events = [dict(timestamp=(BASE_S + i) * NS, user_id=f"s{i}", test_id=f"sealed_{i % 6}", variant="AB"[i % 2],
                   event_type="e", conversion=0, revenue=0.0, session_id="", device="", country="")
              for i in range(300)]
    running, release = threading.Event(), threading.Event()

    def answer(result):  # the query stays running until released
        running.set()
        release.wait(30)
        return result

    async def scenario() -> float:
        query = asyncio.create_task(core.summary(ANYONE, SummaryQuery("sealed_0"), respond=answer))
        await asyncio.to_thread(running.wait, 30)
        before = core.metrics.registry.get_sample_value("abstream_ingest_yield_seconds_total")
        await asyncio.to_thread(store.append, to_table(events))  # a full tail of six tests: sealed now
        await asyncio.sleep(6 * QUERY_PRIORITY_WAIT_S + 0.5)  # more than six steps' waits
        release.set()
        await query
        await asyncio.to_thread(store.wait_sealed)
        return core.metrics.registry.get_sample_value("abstream_ingest_yield_seconds_total") - before

    try:
        waited = asyncio.run(scenario())
    finally:
        release.set()
        store.close()
        core.close()
    # The query ran throughout: steps waited out QUERY_PRIORITY_WAIT_S each until SEAL_WAIT_S was
    # reached (two of the six), and no more.
    assert 0.9 * SEAL_WAIT_S <= waited < SEAL_WAIT_S + QUERY_PRIORITY_WAIT_S, waited
    assert sum(t.events for t in store.list_tests()) == 300
