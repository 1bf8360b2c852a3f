"""The connectors' figures, each beside what bounds it measured in the same run: Kafka ingest
through one partition against a bare consumer reading the same messages from the same broker
(Tansu), and an S3 Parquet import (moto's server) against columnar ingest of the same events
from memory."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

KAFKA_EVENTS = 300_000
S3_EVENTS = 1_000_000
S3_RUNS = 5  # imports and local ingests, alternating; a run is under a second, so the median of five


def tutorial_lines(table: pa.Table) -> list[bytes]:
    out = []
    for r in table.to_pylist():
        r["timestamp"] = r["timestamp"].strftime("%Y-%m-%d %H:%M:%S.%f")
        out.append(json.dumps(r).encode())
    return out


def _wait_for_events(address: str, expected: int, timeout: float = 600) -> tuple[float, float, int]:
    """(time the first events were visible, time all were, events then), polling ListTests."""
    from abstream.clients import Client

    first = None
    deadline = time.monotonic() + timeout
    with Client(address) as client:
        while time.monotonic() < deadline:
            count = sum(t.events for t in client.list_tests().rows if t.test_id.startswith("kafka_"))
            now = time.perf_counter()
            if count and first is None:
                first = (now, count)
            if count >= expected:
                time.sleep(1.0)  # anything more would be a duplicate
                final = sum(t.events for t in client.list_tests().rows if t.test_id.startswith("kafka_"))
                if final != expected:
                    raise RuntimeError(f"kafka: {final:,} events stored of {expected:,} sent")
                return first[0], now, count - first[1]
            time.sleep(0.02)
    raise RuntimeError(f"kafka: only {count:,} of {expected:,} events arrived")


def kafka(table: pa.Table, server_process) -> dict:
    try:
        from confluent_kafka import Consumer, TopicPartition

        from tests.kafka import Broker
    except ImportError as error:
        return {"skipped": f"{error}"}
    sample = table.slice(0, KAFKA_EVENTS)
    sample = sample.set_column(sample.schema.get_field_index("test_id"), "test_id",
                               pc.binary_join_element_wise("kafka_", sample.column("test_id"), ""))
    lines = tutorial_lines(sample)
    out = {"events": len(lines)}
    with tempfile.TemporaryDirectory() as d:
        broker = Broker(Path(d) / "tansu.log").start()
        try:
            for shape, per in (("one_event_per_message", 1), ("ndjson_100_per_message", 100)):
                topic = f"bench_{per}"
                broker.create_topic(topic, 1)
                messages = [(0, b"\n".join(lines[i:i + per])) for i in range(0, len(lines), per)]
                broker.produce(topic, messages)
                consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"raw_{per}",
                                     "enable.auto.commit": False})
                consumer.assign([TopicPartition(topic, 0, 0)])
                got, started = 0, time.perf_counter()
                while got < len(messages):
                    got += sum(1 for m in consumer.consume(10_000, timeout=1.0) if not m.error())
                raw = time.perf_counter() - started
                consumer.close()
                server = server_process(os.path.join(d, f"data_{per}"), "--kafka-bootstrap", broker.bootstrap,
                                        "--kafka-topic", topic, "--kafka-session-timeout-ms", "3000")
                try:
                    t0, t1, events = _wait_for_events(server.address, len(lines))
                finally:
                    server.stop()
                out[shape] = {"messages": len(messages), "broker_events_per_s": len(lines) / raw,
                              "broker_messages_per_s": len(messages) / raw,
                              "abstream_events_per_s": events / (t1 - t0) if t1 > t0 else None}
                print(f"  kafka {shape}: abstream {out[shape]['abstream_events_per_s'] or 0:,.0f} events/s, "
                      f"a bare consumer {out[shape]['broker_events_per_s']:,.0f}", file=sys.stderr)
        finally:
            broker.stop()
    return out


def s3(table: pa.Table, server_process, timed_ingest, columnar_requests) -> dict:
    try:
        import boto3

        from tests.kafka import free_port, reachable
    except ImportError as error:
        return {"skipped": f"{error}"}
    import subprocess

    sample = table.slice(0, S3_EVENTS)
    n = sample.num_rows
    body = io.BytesIO()
    pq.write_table(sample, body, row_group_size=65_536)
    port = free_port()
    moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while not reachable(port):
            if time.monotonic() > deadline:
                return {"skipped": "moto_server did not start"}
            time.sleep(0.05)
        s3client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        s3client.create_bucket(Bucket="bench-events")
        s3client.put_object(Bucket="bench-events", Key="events/all.parquet", Body=body.getvalue())
        from abstream.clients import Client

        runs, local = [], []
        for k in range(S3_RUNS):
            with tempfile.TemporaryDirectory() as d:
                server = server_process(os.path.join(d, "data"))
                try:
                    started = time.perf_counter()
                    with Client(server.address) as client:
                        progress = [p for p in client.import_events("s3://bench-events/events/")
                                    if p.state != "started"]
                    seconds = time.perf_counter() - started
                    assert progress[-1].total_accepted == n, progress
                    runs.append(n / seconds)
                finally:
                    server.stop()
            with tempfile.TemporaryDirectory() as d:
                server = server_process(os.path.join(d, "data"))
                try:
                    local.append(timed_ingest(server.address, columnar_requests(sample), 1)["events_per_s"])
                finally:
                    server.stop()
        runs.sort()
        local.sort()
        middle = S3_RUNS // 2
        print(f"  s3 parquet import: {runs[middle]:,.0f} events/s, local columnar ingest {local[middle]:,.0f}",
              file=sys.stderr)
        return {"events": n, "bytes": len(body.getvalue()), "import_events_per_s": runs[middle],
                "runs_events_per_s": runs, "columnar_events_per_s": local[middle], "columnar_runs_events_per_s": local,
                "columnar_over_import": local[middle] / runs[middle]}
    finally:
        moto.kill()
        moto.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
