"""A bounded load test on loopback: streams and queries at once for a fixed time; totals add up."""

from __future__ import annotations

import threading
import time

import grpc

from abstream.v1 import analytics_pb2 as pb
from tests.events import BASE_S, NS, to_message

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
