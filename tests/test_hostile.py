"""A hostile client against a real server process: what a request costs is bounded before it is read.

Peak resident memory is read from /proc (VmHWM, reset through clear_refs before each shape), so
what is measured is what the kernel saw, allocator slack included.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
from abstream.core import admission
from abstream.core.events import MAX_EVENT_BYTES, MAX_VALUE_BYTES
from abstream.v1 import analytics_pb2 as pb

from tests.events import random_events, to_message
from tests.process import Server

MiB = 1 << 20
MAX_MESSAGE = 4 * MiB
INGEST_BYTES = 64 * MiB
STREAMS = 64
MAX_EVENTS = 25_000  # per batch, for the servers below (the default is 100,000)


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append(v & 0x7F | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def event_with(field_number: int, value: bytes) -> bytes:
    inner = bytes([field_number << 3 | 2]) + varint(len(value)) + value
    return b"\x0a" + varint(len(inner)) + inner


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def peak_growth(server: Server, send) -> int:
    """How far the server's resident memory rose above where it was while `send()` ran."""
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the high-water mark starts again from now
    before = status(pid)["VmRSS"]
    send()
    return status(pid)["VmHWM"] - before


def send_raw(address: str, raw: bytes, timeout: float = 120) -> tuple[str, str, int]:
    """One request as given bytes on its own stream: (status code, details, acks)."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 30),
                                                 ("grpc.max_receive_message_length", 1 << 30)]) as channel:
        call = channel.stream_stream("/abstream.v1.AnalyticsService/IngestEvents",
                                     request_serializer=lambda b: b, response_deserializer=pb.IngestEventsResponse.FromString)
        try:
            acks = list(call(iter([raw]), timeout=timeout))
            return "OK", "", sum(a.rejected for a in acks)
        except grpc.RpcError as error:
            return error.code().name, error.details(), 0


def concurrently(address: str, raw: bytes, streams: int) -> list[tuple[str, str, int]]:
    results: list = [None] * streams

    def one(i: int) -> None:
        results[i] = send_raw(address, raw)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_millions_of_empty_events_are_refused_before_they_are_read(tmp_path):
    """31,457,280 empty events in 60 MiB took the server from 131 MiB to 1.8 GB before it
    refused them, and four such requests at once grew it by 6.6 GB."""
    server = Server(tmp_path / "data", "--max-message-bytes", str(64 * MiB)).start()
    raw = b"\x0a\x00" * 31_457_280
    results: list = []
    grown = peak_growth(server, lambda: results.extend(concurrently(server.address, raw, 1)))
    assert results == [("INVALID_ARGUMENT", "events: a batch of 31457280 events; at most 100000", 0)]
    # gRPC itself holds a request up to three times while receiving it: a server that only takes
    # each request as bytes grew by 3.0x for this one, 7.8x for four at once.
    assert grown < 4 * len(raw), grown
    results.clear()
    grown = peak_growth(server, lambda: results.extend(concurrently(server.address, raw, 4)))
    assert {r[0] for r in results} == {"INVALID_ARGUMENT"}
    assert grown < 4 * 4 * len(raw), grown
    server.kill()


def ipc_bomb(rows: int, row_bytes: int) -> bytes:
    """An LZ4-compressed Arrow stream of `rows` strings of zeros: a few MiB that decompress to
    rows x row_bytes."""
    offsets = np.arange(rows + 1, dtype=np.int64) * row_bytes
    values = pa.LargeStringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(np.zeros(rows * row_bytes, np.uint8)))
    table = pa.table({"user_id": values})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    return pb.IngestEventsRequest(arrow_ipc=sink.getvalue().to_pybytes()).SerializeToString()


def dictionary_bomb(values: int, value_bytes: int, rows: int = 1) -> bytes:
    """A zstd-compressed Arrow stream of `rows` events whose `variant` dictionary holds `values`
    more values of `value_bytes` each, none of them used: a few MiB that decompress to
    values x value_bytes."""
    dictionary = pa.array(["a", *["v" * value_bytes] * values], pa.string())
    table = pa.table({"timestamp": pa.array([1_700_000_000 * 10**9] * rows, pa.int64()), "user_id": ["u"] * rows,
                      "test_id": ["t"] * rows,
                      "variant": pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), dictionary)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    return pb.IngestEventsRequest(arrow_ipc=sink.getvalue().to_pybytes()).SerializeToString()


def measured(raw: bytes) -> admission.RequestSize:
    from abstream.service.converters import measure_request
    return measure_request(raw, MAX_EVENTS)


def test_a_dictionary_of_more_values_than_a_batch_holds_is_refused_before_it_is_read():
    with pytest.raises(Exception) as refused:
        measured(dictionary_bomb(MAX_EVENTS, 8))
    assert str(refused.value) == (f"arrow_ipc: dictionaries of {MAX_EVENTS + 1} values in all; at most {MAX_EVENTS} "
                                  "(as many as the events a batch may hold)")


def test_dictionary_values_longer_than_an_accepted_string_are_refused_before_they_are_read():
    raw = dictionary_bomb(2_000, 1_800)
    assert len(raw) < 64 << 10  # 3.6 MB of values in a few KiB
    limit = MAX_EVENT_BYTES + 2_001 * MAX_VALUE_BYTES + (1 << 20)
    with pytest.raises(Exception, match=r"^arrow_ipc: decompresses to 3,6\d\d,\d{3} bytes, more than 1 valid events "
                                        rf"and 2,001 dictionary values can take \({limit:,}\)$"):
        measured(raw)


def test_a_dictionary_with_values_no_event_uses_is_taken_within_its_limits():
    size = measured(dictionary_bomb(300, 40, rows=10))
    assert (size.events, size.decoded_bytes > 300 * 40) == (10, True)


def valid_events(max_bytes: int) -> bytes:
    """As many typical events as fit in `max_bytes` and in a batch."""
    events = [to_message(e) for e in random_events(MAX_EVENTS, seed=3)[:MAX_EVENTS]]
    sizes = np.cumsum([e.ByteSize() + 3 for e in events])  # each with its tag and length
    return pb.IngestEventsRequest(events=events[:int(np.searchsorted(sizes, max_bytes - 64))]).SerializeToString()


SHAPES = {
    # name: (request bytes, the status each stream gets, rejected events per ack)
    "more events than a batch may hold": (lambda: b"\x0a\x00" * (MAX_MESSAGE // 2 - 8), "INVALID_ARGUMENT"),
    "the most empty events a batch may hold": (lambda: b"\x0a\x00" * MAX_EVENTS, "OK"),
    "one event holding one huge string": (lambda: event_with(2, b"x" * (MAX_MESSAGE - 64)), "OK"),
    "an Arrow stream that decompresses 100-fold": (lambda: ipc_bomb(2_000, 100_000), "INVALID_ARGUMENT"),
    "an Arrow dictionary that decompresses 500-fold": (lambda: dictionary_bomb(20_000, 1_800), "INVALID_ARGUMENT"),
    "valid events": (lambda: valid_events(MAX_MESSAGE), "OK"),
}
#: What 64 concurrent requests may hold, README (Limits): each as gRPC receives it, up to three
#: times, plus the ingest budget, plus what the quarantine and the store keep of them (at most
#: 100,000 rejected events of a few hundred bytes; the accepted events).
BOUND = STREAMS * 3 * MAX_MESSAGE + INGEST_BYTES + 128 * MiB


@pytest.mark.parametrize("shape", SHAPES)
def test_64_concurrent_maximum_size_requests_stay_within_the_documented_bound(tmp_path, shape):
    make, code = SHAPES[shape]
    raw = make()
    assert len(raw) <= MAX_MESSAGE
    server = Server(tmp_path / "data", "--max-message-bytes", str(MAX_MESSAGE), "--max-ingest-bytes",
                    str(INGEST_BYTES), "--max-ingest-streams", str(STREAMS), "--max-batch-events", str(MAX_EVENTS),
                    "--snapshot-every-events", "0").start()
    results: list = []
    grown = peak_growth(server, lambda: results.extend(concurrently(server.address, raw, STREAMS)))
    print(f"{shape}: {len(raw) / MiB:.1f} MiB x {STREAMS} streams, server grew by {grown / MiB:.0f} MiB "
          f"(bound {BOUND / MiB:.0f} MiB)")
    assert {r[0] for r in results} == {code}, results[:3]
    assert grown < BOUND, grown
    with grpc.insecure_channel(server.address) as channel:  # and it still answers
        stub = pb_stub(channel)
        assert stub.ListTests(pb.ListTestsRequest(), timeout=30) is not None
        quarantine = stub.ListQuarantine(pb.ListQuarantineRequest(limit=10), timeout=30)
    assert quarantine.total <= 100_000
    for entry in quarantine.events:
        assert all(len(getattr(entry.event, f).encode()) <= 256 for f in ("user_id", "test_id", "session_id"))
    server.kill()


def test_many_tiny_batches_on_many_streams_are_each_acked(tmp_path):
    server = Server(tmp_path / "data", "--max-ingest-streams", str(STREAMS)).start()
    request = pb.IngestEventsRequest(events=[to_message(e) for e in random_events(3, seed=4)[:3]])
    acked = [0] * STREAMS

    def stream(i: int) -> None:
        with grpc.insecure_channel(server.address) as channel:
            for ack in pb_stub(channel).IngestEvents(iter([request] * 50), timeout=120):
                acked[i] += ack.accepted + ack.rejected

    def send() -> None:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)

    grown = peak_growth(server, send)
    assert acked == [150] * STREAMS
    assert grown < 256 * MiB, grown
    server.kill()


def test_the_default_memory_high_water_mark_is_a_share_of_the_memory_the_process_may_use():
    assert admission.high_water(-1) == int(admission.memory_limit() * 0.8) > 0
    assert admission.high_water(0) == 0 and admission.high_water(12345) == 12345
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert 0 < admission.memory_limit() <= total


def pb_stub(channel):
    from abstream.v1 import analytics_pb2_grpc

    return analytics_pb2_grpc.AnalyticsServiceStub(channel)


LONG = "q" * 1_000_000


@pytest.mark.parametrize("call, field", [
    (lambda stub: stub.Summary(pb.SummaryRequest(test_id=LONG), timeout=30), "test_id"),
    (lambda stub: stub.Segments(pb.SegmentsRequest(test_id="t", dimension=pb.DIMENSION_DEVICE,
                                                   filters=pb.Filters(country=LONG)), timeout=30), "filters.country"),
    (lambda stub: stub.Timeseries(pb.TimeseriesRequest(test_id=LONG[:257], interval=pb.INTERVAL_DAY), timeout=30),
     "test_id"),
    (lambda stub: stub.Summary(pb.SummaryRequest(test_id="t", analysis=pb.AnalysisOptions(control_variant=LONG)),
                               timeout=30), "control_variant"),
    (lambda stub: stub.Summary(pb.SummaryRequest(test_id="t", analysis=pb.AnalysisOptions(
        expected_weights={LONG: 1.0, "A": 1.0})), timeout=30), "expected_weights"),
    (lambda stub: stub.ListQuarantine(pb.ListQuarantineRequest(test_id=LONG), timeout=30), "test_id"),
])
def test_query_strings_over_the_limit_are_refused_naming_the_field_and_not_echoed(server, stub, call, field):
    from tests.test_service_queries import bad_request

    with pytest.raises(grpc.RpcError) as caught:
        call(stub)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = bad_request(error).field_violations
    assert violation.field == field and "bytes long; at most 256 are accepted" in violation.description
    assert len(error.details()) < 200 and "qqqq" not in error.details()
    assert sum(len(v) for _, v in error.trailing_metadata()) < 1000


def test_a_query_string_at_the_limit_is_a_query_like_any_other(server, stub):
    response = stub.Summary(pb.SummaryRequest(test_id="é" * 128), timeout=30)
    assert response.test_id == "é" * 128 and not response.rows


def test_an_unknown_control_lists_a_bounded_number_of_variants(server, stub):
    from tests.events import BASE_S

    events = [pb.Event(user_id=f"u{i}", test_id="many", variant=f"v{i:04d}", conversion=0) for i in range(500)]
    for e in events:
        e.timestamp.seconds = BASE_S
    list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=events)]), timeout=30))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Summary(pb.SummaryRequest(test_id="many", analysis=pb.AnalysisOptions(control_variant="nope")), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "and 490 more" in caught.value.details() and len(caught.value.details()) < 300
