"""The Python client, the producer and the `abstream` command, against real servers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from abstream.clients import BufferFull, Client, Delivery, Producer

from tests.events import BASE_S, NS, ingest, random_events
from tests.process import Server

BIN = Path(sys.executable).parent
SHARED = Path(__file__).resolve().parents[2] / "shared" / "examples" / "tutorial_events.ndjson"


def test_client_returns_typed_results(server, stub):
    events = random_events(600, seed=4)
    ingest(stub, events)
    with Client(server.address) as client:
        summary = client.summary("checkout", "2025-04-28", "2025-05-10 23:59:59")
        assert [r.variant for r in summary.rows] == ["control", "variant_a", "variant_b"]
        assert summary.analysis.control_variant == "control"
        comparison = summary.analysis.comparisons[0]
        assert comparison.variant == "variant_a" and comparison.metric == "conversion"
        assert comparison.absolute.ci_low <= comparison.absolute.estimate <= comparison.absolute.ci_high
        table = summary.to_arrow()
        assert table.column_names == ["variant", "users", "conversions", "conversion_rate", "total_revenue",
                                      "revenue_per_user", "events", "converted_users", "user_conversion_rate"]
        segments = client.segments("checkout", "country", country="US")
        assert {r.segment for r in segments.rows} == {"US"}
        series = client.timeseries("checkout", "day", cumulative=True)
        assert series.rows and series.rows[0].bucket_start.tzinfo is not None
        assert series.to_arrow().num_rows == len(series.rows)
        tests = client.list_tests()
        assert "checkout" in {t.test_id for t in tests.rows}
        assert client.quarantine().total == 0
        with pytest.raises(grpc.RpcError) as caught:
            client.summary("checkout", timeout=-1.0)  # a deadline already past: the call's own timeout is used
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_callers_wrong_arguments_are_named_before_anything_is_sent(server):
    import pyarrow as pa

    with Client(server.address) as client:
        for call, words in [(lambda: client.summary("x", start=12345), "12345 is not a date and time: give a datetime"),
                            (lambda: client.quarantine(limit=-1), "limit must be a whole number from 1 to"),
                            (lambda: client.ingest_table(pa.table({"user_id": ["u"]}), batch_size=0),
                             "batch_size must be a whole number of events, 1 or more, not 0"),
                            (lambda: client.timeseries("x", interval="days"),
                             "interval must be one of minute, hour, day, week, not 'days'"),
                            (lambda: client.segments("x", "countries"),
                             "dimension must be one of device, country, event_type, not 'countries'")]:
            with pytest.raises(ValueError, match=words):
                call()
        for call, words in [(lambda: client.summary(123), r"test_id must be a string, not int \(123\)"),
                            (lambda: client.segments("x", "device", country=7), "country must be a string, not int"),
                            (lambda: client.erase_user(b"u1"), "user_id must be a string, not bytes")]:
            with pytest.raises(TypeError, match=words):
                call()


def test_client_sends_arrow_tables_in_the_compact_columnar_format(server):
    """Dictionary-encoded, int8, LZ4-compressed batches store what the plain table holds; a bad
    conversion still reaches the server as sent; resending with the same producer stores nothing."""
    import pyarrow as pa
    from abstream.clients.client import arrow_ipc

    from tests.events import to_table
    from tests.oracle import Oracle

    events = [{**e, "test_id": "arrow_" + e["test_id"]} for e in random_events(900, seed=8)]
    events[5]["conversion"] = 7
    table = to_table(events)
    compact = pa.ipc.open_stream(arrow_ipc(table.slice(0, 300))).read_all()
    assert pa.types.is_dictionary(compact.schema.field("variant").type)
    assert compact.schema.field("conversion").type == pa.int64()  # a 7 in this slice: not narrowed
    assert pa.ipc.open_stream(arrow_ipc(table.slice(300, 300))).read_all().schema.field("conversion").type == pa.int8()
    with Client(server.address) as client:
        acks = client.ingest_table(table, producer_id="arrow-loader", sequence=1, batch_size=300)
        sizes = [min(300, len(events) - at) for at in range(0, len(events), 300)]
        assert [(a.accepted, a.rejected) for a in acks] == [(299, 1)] + [(n, 0) for n in sizes[1:]]
        assert acks[0].rejections[0].field == "conversion" and "got 7" in acks[0].rejections[0].message
        again = client.ingest_table(table, producer_id="arrow-loader", sequence=1, batch_size=300)
        assert all(a.duplicate for a in again)
        oracle = Oracle([e for i, e in enumerate(events) if i != 5])
        for test_id in {e["test_id"] for e in events}:
            rows = client.summary(test_id).rows
            expected = oracle.summary(test_id, None, None)
            assert [(r.variant, r.metrics.users, r.metrics.events, r.metrics.conversions) for r in rows] == \
                [(e["variant"], e["users"], e["events"], e["conversions"]) for e in expected]


def test_a_read_file_is_encoded_without_loading_pyarrow_compute_or_pandas(tmp_path):
    """`abstream ingest` narrows the reader's dictionaries and conversions itself: Arrow's casts
    would load pyarrow.compute (and pandas where installed), a fifth of a second before the
    first batch. What is sent decodes to what was read, at every offset of the file."""
    lines = [json.dumps({"timestamp": "2025-04-28 18:42:22", "user_id": f"u{i}", "test_id": f"t{i % 3}",
                         "variant": "AB"[i % 2], "event_type": "click", "conversion": i % 2, "revenue": i / 4,
                         "session_id": f"s{i}", "device": "mobile", "country": "ES"}) for i in range(2_500)]
    path = tmp_path / "e.ndjson"
    path.write_text("\n".join(lines) + "\n")
    script = f"""
import sys
import pyarrow as pa
from abstream.clients import files
from abstream.clients.columnar import arrow_ipc
chunks = [(chunk, arrow_ipc(chunk.table)) for chunk in map(files.sendable, files.read({str(path)!r}, "ndjson", 1_000))]
print(sorted(m for m in ("pyarrow.compute", "pandas") if m in sys.modules))
for chunk, ipc in chunks:
    sent = pa.ipc.open_stream(ipc).read_all()
    assert sent.schema.field("conversion").type == pa.int8() and sent.schema.field("variant").type.index_type == pa.int8()
    assert sent.to_pylist() == chunk.table.to_pylist(), chunk.lines[0]
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_producer_resolves_every_event(server):
    good = {"timestamp": "2025-04-28 18:42:22", "user_id": "user_455", "test_id": "prod", "variant": "variant_a",
            "event_type": "click", "conversion": 1, "revenue": 84.55}
    seen: list[Delivery] = []
    with Producer(server.address, batch_size=50, linger_ms=5) as producer:
        futures = [producer.send({**good, "user_id": f"u{i}"}) for i in range(120)]
        bad = producer.send({**good, "conversion": 2}, callback=lambda f: seen.append(f.result()))
        assert producer.flush(timeout=30)
    assert all(f.result() == Delivery(True) for f in futures)
    assert bad.result().accepted is False and bad.result().field == "conversion"
    assert "0 or 1" in bad.result().message and seen == [bad.result()]
    with Client(server.address) as client:
        assert sum(r.metrics.events for r in client.summary("prod").rows) == 120


def test_a_future_cancelled_before_its_batch_is_sent_is_not_sent_and_the_producer_goes_on(server):
    """A caller may cancel a future it no longer waits for (asyncio.wait_for on a wrapped one
    does): its event is not sent, and the producer's thread, which resolved it regardless and
    died of the InvalidStateError, sends the events after it."""
    good = {"timestamp": "2025-04-28 18:42:22", "user_id": "u", "test_id": "cancelled", "variant": "a",
            "event_type": "click", "conversion": 0, "revenue": 1.0}
    with Producer(server.address, batch_size=50, linger_ms=500) as producer:
        gone = producer.send({**good, "user_id": "gone"})
        assert gone.cancel()  # still lingering in its batch
        kept = [producer.send({**good, "user_id": f"kept{i}"}) for i in range(3)]
        assert producer.flush(timeout=30)
        later = producer.send({**good, "user_id": "later"})
        assert producer.flush(timeout=30)
    assert gone.cancelled() and all(f.result() == Delivery(True) for f in [*kept, later])
    with Client(server.address) as client:
        assert sum(r.metrics.events for r in client.summary("cancelled").rows) == 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_producer_buffer_full_raises_when_asked_to(tmp_path):
    # Nothing listens on this port: the batch in hand waits on retries while the buffer fills.
    producer = Producer(f"127.0.0.1:{free_port()}", max_buffered=3, when_full="raise", linger_ms=1,
                        give_up_after_s=2)
    event = {"timestamp": "2025-04-28 18:42:22", "user_id": "u", "test_id": "t", "variant": "v"}
    with pytest.raises(BufferFull):
        for _ in range(20):
            producer.send(event)
            time.sleep(0.01)
    producer.close(timeout=10)


def test_closing_before_everything_is_sent_resolves_every_future_and_closing_again_does_nothing():
    from abstream.clients import ProducerClosed

    event = {"timestamp": "2025-04-28 18:42:22", "user_id": "u", "test_id": "t", "variant": "v"}
    closed = threading.Event()

    def body() -> None:
        with Producer(f"127.0.0.1:{free_port()}", batch_size=10, retry_max_s=0.2) as producer:
            futures = [producer.send({**event, "user_id": f"u{i}"}) for i in range(100)]
            producer.close(timeout=1)
            assert all(f.done() for f in futures)
            assert all(isinstance(f.exception(), (ProducerClosed, grpc.RpcError)) for f in futures)
            assert producer.flush(timeout=1)
        closed.set()  # the with-block's own close() returned

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(60)
    assert closed.is_set()


def test_a_stream_ended_without_an_ack_is_sent_again_then_fails_and_the_producer_goes_on():
    """A peer between the producer and the server (a proxy) that ends a stream without an answer
    stopped the producer's thread (StopIteration): every later future stayed pending, and
    close() waited for them for ever. Such a batch is sent again until the retries give up."""
    from concurrent import futures as pool

    from abstream.clients import NoAck
    from abstream.v1 import analytics_pb2_grpc

    calls = []

    class Cutting(analytics_pb2_grpc.AnalyticsServiceServicer):
        def IngestEvents(self, requests, context):
            calls.append(sum(len(r.events) for r in requests))
            return iter(())

    server = grpc.server(pool.ThreadPoolExecutor(2))
    analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server(Cutting(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    event = {"timestamp": "2025-04-28 18:42:22", "user_id": "u", "test_id": "t", "variant": "v"}
    done = threading.Event()

    def body() -> None:
        with Producer(f"127.0.0.1:{port}", batch_size=5, linger_ms=1, retry_initial_s=0.01, retry_max_s=0.05,
                      give_up_after_s=0.3) as producer:
            first = [producer.send(event) for _ in range(5)]
            assert all(isinstance(f.exception(timeout=30), NoAck) for f in first)
            later = producer.send(event)  # the producer still sends
            assert isinstance(later.exception(timeout=30), NoAck)
        done.set()

    thread = threading.Thread(target=body, daemon=True)
    try:
        thread.start()
        thread.join(60)
        assert done.is_set()
        assert len(calls) >= 3 and set(calls) <= {1, 2, 3, 4, 5}  # each batch sent again before it failed
    finally:
        server.stop(None)


def test_a_batch_larger_than_the_server_takes_is_sent_in_halves_and_only_an_event_too_large_fails(tmp_path):
    server = Server(tmp_path / "data", "--max-message-bytes", str(256 << 10)).start()
    event = {"timestamp": "2025-04-28 18:42:22", "test_id": "halves", "variant": "v", "event_type": "e" * 200}
    with Producer(server.address, batch_size=5_000, linger_ms=200) as producer:
        futures = [producer.send({**event, "user_id": f"u{i}"}) for i in range(1_000)]  # ~500 KB in one batch
        huge = producer.send({**event, "user_id": "x" * (300 << 10)})  # more than the server takes alone
        futures += [producer.send({**event, "user_id": f"u{i}"}) for i in range(1_000, 2_000)]
        assert producer.flush(timeout=120)
    assert [f.result() for f in futures] == [Delivery(True)] * 2_000
    assert (huge.result().accepted, huge.result().field) == (False, "event")
    assert huge.result().message.startswith("is larger than the server takes in one request (")
    with Client(server.address) as client:
        assert sum(r.metrics.events for r in client.summary("halves").rows) == 2_000
    server.terminate()


def test_values_of_other_python_types_are_taken_or_rejected_never_raised(server):
    import datetime as dt
    import uuid

    import numpy as np

    event = {"timestamp": "2025-04-28 18:42:22", "user_id": "u", "test_id": "types", "variant": "v"}
    with Producer(server.address, linger_ms=5) as producer:
        taken = producer.send({**event, "conversion": np.int64(1), "revenue": np.float64(2.5), "user_id": np.int64(7)})
        by_date = producer.send({**event, "timestamp": dt.date(2025, 4, 28)})
        by_uuid = producer.send({**event, "user_id": uuid.UUID(int=5)})
        assert producer.flush(timeout=30)
    assert taken.result() == Delivery(True)
    assert by_date.result() == Delivery(False, "timestamp", "timestamp must be 'YYYY-MM-DD HH:MM:SS' (UTC), RFC 3339 "
                                                            'or seconds since the Unix epoch, got "2025-04-28"')
    assert by_uuid.result() == Delivery(False, "user_id", 'user_id must be a string, got '
                                                          '"00000000-0000-0000-0000-000000000005"')


def test_producer_survives_a_server_restart_without_loss_or_duplicates(tmp_path):
    port = free_port()
    server = Server(tmp_path / "data", "--addr", f"127.0.0.1:{port}").start()  # the same port after a restart
    total = 3000
    futures = []
    with Producer(f"127.0.0.1:{port}", batch_size=100, linger_ms=2, retry_max_s=0.5) as producer:
        def send_all():
            for i in range(total):
                futures.append(producer.send({"timestamp": (BASE_S + i) * NS / 1e9, "user_id": f"u{i}",
                                              "test_id": "restart", "variant": "AB"[i % 2]}))
                if i % 100 == 0:
                    time.sleep(0.02)  # ~0.6 s of sending: the kill lands in the middle of it

        sender = threading.Thread(target=send_all)
        sender.start()
        time.sleep(0.3)
        server.kill()
        time.sleep(0.5)
        server.start()
        sender.join(timeout=60)
        assert producer.flush(timeout=120)
    deliveries = [f.result() for f in futures]
    assert all(d.accepted for d in deliveries) and len(deliveries) == total
    with Client(server.address) as client:
        rows = client.summary("restart").rows
    assert sum(r.metrics.events for r in rows) == total and sum(r.metrics.users for r in rows) == total
    server.kill()


def run_cli(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "abstream"), *args], capture_output=True, text=True, timeout=120, input=input,
                          env=env)


def test_cli_ingests_files_as_users_send_them_and_reports_rejections(server, tmp_path):
    ndjson = tmp_path / "events.ndjson"
    lines = SHARED.read_text().splitlines() if SHARED.exists() else [
        json.dumps({"timestamp": "2025-04-28 18:42:22", "user_id": "user_455", "test_id": "test_5",
                    "variant": "variant_a", "event_type": "click", "conversion": 1, "revenue": 84.55,
                    "session_id": "session_3455", "device": "desktop", "country": "AU"})]
    lines += ['{"timestamp": "2025-04-28 18:50:00", "user_id": "u2", "test_id": "test_5", "variant": "variant_b"}',
              "{not json",
              '{"timestamp": "2025-04-28 18:51:00", "user_id": "u3", "test_id": "test_5", "variant": "variant_b", '
              '"conversion": 2}',
              '{"timestamp": "2025-04-28 18:52:00", "test_id": "test_5", "variant": "variant_b"}']
    ndjson.write_text("\n".join(lines) + "\n")
    result = run_cli("ingest", "--addr", server.address, str(ndjson))
    assert result.returncode == 1, result.stderr
    good = len(lines) - 3
    assert f"accepted {good}, rejected 3" in result.stdout
    assert "conversion: conversion must be 0 or 1, got 2" in result.stdout
    assert "user_id: user_id is required" in result.stdout and "not valid JSON" in result.stdout
    assert f"{ndjson}:{len(lines) - 2}" in result.stdout  # the bad JSON line, by number

    csv_file = tmp_path / "events.csv"
    csv_file.write_text("timestamp,user_id,test_id,variant,conversion,revenue\n"
                        "2025-04-29 10:00:00,c1,test_5,variant_a,1,10.5\n"
                        "2025-04-29 10:01:00,c2,test_5,variant_b,0,0\n")
    result = run_cli("ingest", "--addr", server.address, str(csv_file))
    assert result.returncode == 0 and "accepted 2, rejected 0" in result.stdout
    result = run_cli("ingest", "--addr", server.address, "--input-format", "ndjson", "-", input=lines[0] + "\n")
    assert result.returncode == 0 and "accepted 1, rejected 0" in result.stdout

    summary = json.loads(run_cli("summary", "test_5", "--addr", server.address, "--format", "json").stdout)
    assert {r["variant"] for r in summary["rows"]} == {"variant_a", "variant_b"}
    assert summary["analysis"]["control_variant"] == "variant_a"
    table = run_cli("summary", "test_5", "--addr", server.address).stdout
    assert "variant" in table and "users" in table and "compared with 'variant_a'" in table
    csv_out = run_cli("segments", "test_5", "country", "--addr", server.address, "--format", "csv").stdout
    assert csv_out.splitlines()[0].startswith("variant,segment,users")
    ndjson_out = run_cli("timeseries", "test_5", "--interval", "hour", "--addr", server.address,
                         "--format", "ndjson").stdout
    assert all("bucket_start" in json.loads(line) for line in ndjson_out.splitlines())
    env = {**__import__("os").environ, "ABSTREAM_ADDR": server.address}
    tests = run_cli("tests", env=env)
    assert tests.returncode == 0 and "test_5" in tests.stdout
    quarantine = run_cli("quarantine", "--format", "json", env=env)
    assert json.loads(quarantine.stdout)["total"] == 2  # the two the server rejected (bad JSON never left)


def test_cli_help_shows_examples():
    result = run_cli("--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "abstream ingest" in result.stdout
    for command in ("ingest", "summary", "segments", "timeseries", "tests", "quarantine"):
        assert "examples:" in run_cli(command, "--help").stdout


def test_cli_reports_server_errors_clearly(server):
    result = run_cli("summary", "", "--addr", server.address)
    assert result.returncode == 2 and "INVALID_ARGUMENT" in result.stderr and "test_id" in result.stderr


def test_cli_shows_progress_on_long_files(server, tmp_path):
    path = tmp_path / "long.ndjson"
    path.write_text("".join(json.dumps({"timestamp": "2025-04-28 18:42:22", "user_id": f"u{i}", "test_id": "long",
                                        "variant": "AB"[i % 2]}) + "\n" for i in range(12_000)))
    env = {**__import__("os").environ, "ABSTREAM_PROGRESS": "1"}
    result = run_cli("ingest", "--addr", server.address, "--batch-size", "5000", str(path), env=env)
    assert result.returncode == 0 and "accepted 12,000, rejected 0" in result.stdout
    assert "5,000 / 12,000 lines" in result.stderr and "12,000 / 12,000 lines" in result.stderr
