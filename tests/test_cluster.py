"""The cluster engine against a real ClickHouse cluster (2 shards x 2 replicas, ZooKeeper) with
processes really killed: exactly-once retries through two gateways, a replica, a shard and
ZooKeeper down, `make cluster` queried with grpcurl. Every statement runs on chDB too."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from abstream.clickhouse.backend import Cluster as Backend
from abstream.clickhouse.cluster import Cluster
from abstream.clickhouse.engine import ClickHouseEngine
from abstream.clients import Client
from abstream.core.engine import append
from abstream.core.errors import Unavailable
from abstream.core.events import Rejection
from abstream.v1 import analytics_pb2 as pb
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests import engines
from tests.events import BASE_S, NS, random_events, to_message, to_table
from tests.process import Server, wait_for

ROOT = Path(__file__).resolve().parent.parent
BATCH = 50


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A cluster of this module's own: its tests kill and restart its processes."""
    c = Cluster().start(tmp_path_factory.mktemp("faults"))
    yield c
    c.stop()


def database(cluster: Cluster, **settings) -> tuple[str, list[str]]:
    """A new database with the schema, and the `abstream serve` arguments for it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = ClickHouseEngine(Backend(cluster.hosts().split(","), cluster.cluster_name, name))
    engine.init_schema()
    engine.close()
    args = ["--engine", "clickhouse", "--clickhouse", cluster.hosts(), "--clickhouse-cluster", cluster.cluster_name,
            "--clickhouse-database", name]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return name, args


def gateway(tmp_path: Path, args: list[str], name: str) -> Server:
    return Server(tmp_path / name, *args).start()


def batch_events(producer: str, seq: int) -> list[dict]:
    return [dict(timestamp=(BASE_S + seq) * NS + i, user_id=f"{producer}-{seq}-{i}", test_id="dur", variant="AB"[i % 2],
                 event_type="click", conversion=i % 2, revenue=1.0, session_id="s", device="d", country="c")
            for i in range(BATCH)]


def send(address: str, producer: str, seq: int, timeout: float = 20) -> pb.IngestEventsResponse:
    with grpc.insecure_channel(address) as channel:
        request = pb.IngestEventsRequest(events=[to_message(e) for e in batch_events(producer, seq)],
                                         producer_id=producer, sequence=seq)
        (ack,) = list(pb_stub(channel).IngestEvents(iter([request]), timeout=timeout))
        return ack


def send_once_taken(address: str, producer: str, seq: int) -> None:
    """Sends a batch again while the cluster answers UNAVAILABLE (for up to a minute), as a
    producer does; it is then stored, or found stored before."""
    deadline = time.monotonic() + 60
    while True:
        try:
            ack = send(address, producer, seq, timeout=30)
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, error.details()
            time.sleep(0.5)
    assert ack.accepted == BATCH or ack.duplicate


def totals(address: str, test_id: str = "dur") -> tuple[int, int]:
    with grpc.insecure_channel(address) as channel:
        rows = pb_stub(channel).Summary(pb.SummaryRequest(test_id=test_id), timeout=30).rows
    return sum(r.metrics.events for r in rows), sum(r.metrics.users for r in rows)


def pb_stub(channel):
    from abstream.v1 import analytics_pb2_grpc

    return analytics_pb2_grpc.AnalyticsServiceStub(channel)


def retry_delay(error: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def wait_for_health(g: Server, status: str, timeout: float = 30) -> None:
    """The gateway's gRPC health becomes `status` (it checks its shards every second)."""
    from grpc_health.v1 import health_pb2

    want = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
    deadline = time.monotonic() + timeout
    with g.channel() as channel:
        while g.health(channel) != want:
            assert time.monotonic() < deadline, f"health did not become {status}"
            time.sleep(0.2)


def test_a_retry_after_a_gateway_crash_is_stored_once_through_another_gateway(cluster, tmp_path):
    """A producer streams tagged batches to gateway A; A is SIGKILLed mid-stream; the producer
    sends what was not acked to gateway B, and then everything again: each batch is stored once."""
    _, args = database(cluster)
    a, b = gateway(tmp_path, args, "a"), gateway(tmp_path, args, "b")
    acked, stop, wrong = [], threading.Event(), []

    def produce() -> None:
        seq = 1
        with grpc.insecure_channel(a.address) as channel:
            stub = pb_stub(channel)
            while not stop.is_set() and seq < 200:
                request = pb.IngestEventsRequest(events=[to_message(e) for e in batch_events("p", seq)],
                                                 producer_id="p", sequence=seq)
                try:
                    (ack,) = list(stub.IngestEvents(iter([request]), timeout=20))
                except grpc.RpcError:
                    return  # the gateway is gone
                if ack.accepted != BATCH:
                    wrong.append(ack)  # asserted below: an assert here would be lost with the thread
                acked.append(seq)
                seq += 1

    thread = threading.Thread(target=produce)
    thread.start()
    deadline = time.monotonic() + 60
    while len(acked) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    a.kill()  # mid-stream: the batch in flight may be in the cluster, or not, or in part
    stop.set()
    thread.join(timeout=60)
    assert not wrong and len(acked) >= 10
    last = acked[-1] + 1  # possibly stored, never acked
    outcomes = [send(b.address, "p", seq) for seq in range(last, last + 5)]
    assert all(o.accepted == BATCH or o.duplicate for o in outcomes)
    again = [send(b.address, "p", seq) for seq in range(1, last + 5)]  # everything, once more
    assert all(o.duplicate for o in again)
    assert totals(b.address) == ((last + 4) * BATCH, (last + 4) * BATCH)
    a.start()  # the restarted gateway agrees: nothing it needs was kept in it
    assert totals(a.address) == ((last + 4) * BATCH, (last + 4) * BATCH)
    assert send(a.address, "p", last).duplicate


def test_a_killed_replica_leaves_queries_answered_and_ingest_to_the_quorum_setting(cluster, tmp_path):
    """Every gateway of a database must use the same quorum (docs/scale.md): reads are sequentially
    consistent only with a quorum, and would not see inserts made without one."""
    _, args = database(cluster)
    _, args1 = database(cluster)
    quorum2 = gateway(tmp_path, args, "q2")
    quorum1 = gateway(tmp_path, [*args1, "--clickhouse-insert-quorum", "1"], "q1")
    assert send(quorum2.address, "r", 1).accepted == BATCH
    cluster.kill_node(1)  # shard 1, replica 2
    try:
        assert totals(quorum2.address) == (BATCH, BATCH)  # the other replica answers
        with pytest.raises(grpc.RpcError) as refused:
            send(quorum2.address, "r", 2, timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and retry_delay(refused.value)
        assert "quorum" in refused.value.details() or "replica" in refused.value.details()
        assert send(quorum1.address, "r1", 1).accepted == BATCH  # one replica is enough for it
    finally:
        cluster.start_node(1)
    send_once_taken(quorum2.address, "r", 2)  # the restarted replica catches up, and the quorum is met again
    assert totals(quorum2.address) == (2 * BATCH, 2 * BATCH)
    deadline = time.monotonic() + 30
    while totals(quorum1.address) != (BATCH, BATCH):  # without a quorum, seen once a replica has it
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_shard_down_is_unavailable_naming_the_shard(cluster, tmp_path):
    _, args = database(cluster)
    g = gateway(tmp_path, args, "g")
    assert send(g.address, "s", 1).accepted == BATCH
    with Client(g.address) as client:
        client.create_experiment("dur", control="A")
    cluster.kill_node(2)
    cluster.kill_node(3)  # both replicas of shard 2
    try:
        wait_for_health(g, "NOT_SERVING")  # a load balancer sends its calls elsewhere
        with pytest.raises(urllib.error.HTTPError) as http_health:
            urllib.request.urlopen(f"http://{g.http_address}/health", timeout=10)
        said = json.loads(http_health.value.read())
        assert http_health.value.code == 503 and "shard 2" in said["error"], said
        with grpc.insecure_channel(g.address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_stub(channel).Summary(pb.SummaryRequest(test_id="dur"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        shard2 = [n for n in cluster.nodes if n.shard == 2]
        assert "shard 2" in refused.value.details()
        assert all(f"127.0.0.1:{n.tcp_port}" in refused.value.details() for n in shard2)
        with Client(g.address, timeout=30) as client:
            # every shard holds every plan: read from the one that answers; written to all, or refused
            assert [(p.test_id, p.control_variant) for p in client.list_experiments()] == [("dur", "A")]
            with pytest.raises(grpc.RpcError) as refused:
                client.create_experiment("other", control="B")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shard 2" in refused.value.details()
    finally:
        cluster.start_node(2)
        cluster.start_node(3)
    wait_for_health(g, "SERVING")
    assert totals(g.address) == (BATCH, BATCH)
    with Client(g.address, timeout=30) as client:
        deadline = time.monotonic() + 60
        while True:  # the retry completes the create, once shard 2's replicas are back in ZooKeeper
            try:
                client.create_experiment("other", control="B")
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, error.details()
                time.sleep(0.5)
        assert sorted(p.test_id for p in client.list_experiments()) == ["dur", "other"]
    cluster.kill_node(0)
    cluster.kill_node(1)  # now shard 1 is down: shard 2 has every plan too
    time.sleep(1.5)  # past the gateway's cache of plans
    try:
        with Client(g.address, timeout=30) as client:
            assert sorted(p.test_id for p in client.list_experiments()) == ["dur", "other"]
    finally:
        cluster.start_node(0)
        cluster.start_node(1)


def test_a_kafka_consumer_that_cannot_reach_a_shard_in_a_rebalance_is_replaced_and_loses_nothing(cluster, tmp_path):
    """A rebalance while a shard is down: the partitions' stored offsets cannot be read, the
    consumer raises, and a new one joins once the shard is back, from where the store got."""
    from confluent_kafka import Consumer

    from tests.kafka import Broker, event_messages

    broker = Broker(tmp_path / "tansu.log").start()
    try:
        broker.create_topic("events", 2)
        _, args = database(cluster)
        g = gateway(tmp_path, args + ["--kafka-bootstrap", broker.bootstrap, "--kafka-topic", "events",
                                      "--kafka-session-timeout-ms", "3000"], "g")
        broker.produce("events", event_messages(1_000, 2, "dur"))
        wait_for(lambda: totals(g.address)[0] == 1_000, 60, "the first events")
        cluster.kill_node(2)
        cluster.kill_node(3)
        other = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "abstream", "session.timeout.ms": 3000,
                          "enable.auto.commit": False})
        try:
            other.subscribe(["events"])  # the group rebalances: the gateway is assigned a partition again
            wait_for(lambda: other.poll(0.2) is None and "failed" in kafka_state(g), 60, "the consumer failing")
        finally:
            other.close()
            cluster.start_node(2)
            cluster.start_node(3)
        wait_for_health(g, "SERVING")
        broker.produce("events", event_messages(1_000, 2, "dur", start_user=1_000))
        wait_for(lambda: totals(g.address)[0] >= 2_000, 120, "the events sent after the shard came back")
        time.sleep(1.5)
        assert totals(g.address) == (2_000, 2_000)  # each once
        assert "kafka consumer failed" in g.log_path.read_text()
        g.terminate()
    finally:
        broker.stop()


def kafka_state(g: Server) -> str:
    """What /health says of the Kafka consumer (answered 503 while a shard is down)."""
    try:
        with urllib.request.urlopen(f"http://{g.http_address}/health", timeout=10) as response:
            said = json.loads(response.read())
    except urllib.error.HTTPError as error:
        said = json.loads(error.read())
    return said.get("kafka", {}).get("state", "")


def test_a_hung_replica_is_passed_over_after_the_timeout_and_then_tried_last(cluster, tmp_path):
    """A server that hangs (SIGSTOP: it still accepts connections, and answers nothing) is given
    up after --clickhouse-timeout-seconds, not the driver's 300 s, and its shard answered by the
    other replica; then it is tried last, so the next calls do not wait for it at all."""
    _, args = database(cluster)
    g = gateway(tmp_path, [*args, "--clickhouse-timeout-seconds", "2"], "hung")
    assert send(g.address, "h", 1).accepted == BATCH
    assert totals(g.address) == (BATCH, BATCH)
    hung = cluster.nodes[0]  # shard 1, replica 1: the first tried
    os.kill(hung.process.pid, signal.SIGSTOP)
    try:
        assert totals(g.address) == (BATCH, BATCH)  # within the call's 30 s deadline
        started = time.monotonic()
        for _ in range(3):
            assert totals(g.address) == (BATCH, BATCH)
        waited = time.monotonic() - started
        assert f"ClickHouse at 127.0.0.1:{hung.tcp_port} did not answer: tried last" in g.log()
    finally:
        os.kill(hung.process.pid, signal.SIGCONT)
        # Restarted: its ZooKeeper session expired while it was stopped, and the next test's
        # schema statements ON CLUSTER would meet it.
        cluster.kill_node(0)
        cluster.start_node(0)
    assert waited < 2 * 3, f"three queries took {waited:.1f} s: each waited for the hung replica"
    assert totals(g.address) == (BATCH, BATCH)
    g.terminate()


def test_a_replica_that_lacks_a_table_is_passed_over_for_its_shards_other_one(cluster, tmp_path):
    """After an unclean stop a ClickHouse server may come back without a table (one whose parts
    ZooKeeper does not list: "doesn't look like the set of parts in ZooKeeper"). Its shard's other
    replica answers meanwhile, and the one without it is tried last, said once in the log."""
    name, args = database(cluster)
    g = gateway(tmp_path, args, "lacking")
    assert send(g.address, "l", 1).accepted == BATCH
    lacking = cluster.nodes[0]  # shard 1, replica 1: the first tried
    from clickhouse_driver import Client as Native

    on_it = Native("127.0.0.1", lacking.tcp_port)
    on_it.execute(f"DETACH TABLE {name}.events_local")
    try:
        # An insert cannot reach its quorum on that shard meanwhile: UNAVAILABLE, retried as for a
        # replica down (the replica's "doesn't exist" was FAILED_PRECONDITION, which no client retries).
        with pytest.raises(grpc.RpcError) as refused:
            send(g.address, "l", 2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        seen = totals(g.address)  # with the other shard's part of the refused batch, which took it
        assert BATCH <= seen[0] < 2 * BATCH and seen[0] == seen[1]
        for _ in range(2):
            assert totals(g.address) == seen
    finally:
        on_it.execute(f"ATTACH TABLE {name}.events_local")
        on_it.disconnect()
    said = [line for line in g.log().splitlines() if "tried last" in line]
    assert len(said) == 1 and f"ClickHouse at 127.0.0.1:{lacking.tcp_port} cannot" in said[0], said
    send_once_taken(g.address, "l", 2)  # once the table is back, the retry goes in, once
    assert totals(g.address) == (2 * BATCH, 2 * BATCH)
    g.terminate()


def test_a_query_waiting_for_a_hung_replica_leaves_every_other_call_answered(cluster, tmp_path):
    """The plans a query reads first come from every shard (once a second): a replica that hangs
    holds that query, and no other call of the gateway (they share one event loop)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, args = database(cluster)
    g = gateway(tmp_path, [*args, "--clickhouse-timeout-seconds", "8"], "held")
    assert send(g.address, "h", 1).accepted == BATCH
    hung = cluster.nodes[0]  # shard 1, replica 1: the first tried
    os.kill(hung.process.pid, signal.SIGSTOP)
    try:
        time.sleep(1.2)  # past the gateway's cache of plans
        waiting = threading.Thread(target=totals, args=(g.address,))
        waiting.start()
        time.sleep(0.5)  # the query is waiting for the hung replica
        assert waiting.is_alive()
        with grpc.insecure_channel(g.address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert waiting.is_alive()  # answered while the query still waited
        waiting.join(60)
    finally:
        os.kill(hung.process.pid, signal.SIGCONT)
        cluster.kill_node(0)  # its ZooKeeper session expired while it was stopped
        cluster.start_node(0)
    g.terminate()


def test_a_retention_sweep_waiting_for_a_replica_leaves_health_checked(cluster, tmp_path):
    """A removal returns once every replica applied it: with one down, the sweep waits for it
    (up to 10 minutes), and meanwhile the gateway still checks its shards every second
    (NOT_SERVING once the other replica of the shard goes too, SERVING once they are back), and
    stops when told to (each replica applies the removal when it can)."""
    _, args = database(cluster)
    g = gateway(tmp_path, [*args, "--retention-sweep-seconds", "1", "--clickhouse-insert-quorum", "1"], "swept")
    old = [dict(e, timestamp=(int(time.time()) - 10 * 86400) * NS + i) for i, e in enumerate(batch_events("o", 1))]
    with grpc.insecure_channel(g.address) as channel:
        (ack,) = list(pb_stub(channel).IngestEvents(iter([pb.IngestEventsRequest(
            events=[to_message(e) for e in old])]), timeout=30))
    assert ack.accepted == BATCH
    cluster.kill_node(3)  # shard 2's second replica: the removal waits for it
    try:
        with Client(g.address, timeout=30) as client:
            client.set_retention("dur", 1)
        time.sleep(3)  # the sweep has begun its removal, and waits
        cluster.kill_node(2)  # now shard 2 is down
        wait_for_health(g, "NOT_SERVING", timeout=60)
    finally:
        cluster.start_node(2)
        cluster.start_node(3)
    wait_for_health(g, "SERVING", timeout=60)
    with Client(g.address, timeout=30) as client:  # hidden at once, whether or not removed yet
        assert sum(r.metrics.events for r in client.summary("dur").rows) == 0
    assert g.terminate(timeout=60) == 0  # a sweep that waits still does not hold the stop


def test_the_gateway_connects_with_the_user_and_password_it_is_given(cluster, tmp_path, monkeypatch):
    """The user and password go to every server (here: a password the cluster's `default` user
    does not have, refused by name, and never printed); with none given, `default` without one."""
    _, args = database(cluster)
    monkeypatch.setenv("ABSTREAM_CLICKHOUSE_PASSWORD", "not-its-password")
    code, said = Server(tmp_path / "refused", *args).start_expecting_failure()
    assert code == 1 and re.search("Wrong password for user default|Authentication failed", said), said
    assert "not-its-password" not in said
    init = subprocess.run([str(Path(sys.executable).parent / "abstream"), "clickhouse", "init", "--clickhouse",
                           cluster.hosts(), "--clickhouse-cluster", cluster.cluster_name, "--clickhouse-user",
                           "nobody_here"], capture_output=True, text=True, timeout=120)
    assert init.returncode != 0 and "nobody_here" in init.stderr and "Traceback" not in init.stderr, init.stderr
    monkeypatch.delenv("ABSTREAM_CLICKHOUSE_PASSWORD")
    g = gateway(tmp_path, args, "allowed")
    assert send(g.address, "c", 1).accepted == BATCH
    g.terminate()


def test_zookeeper_down_refuses_ingest_with_retry_info_and_answers_queries(cluster, tmp_path):
    _, args = database(cluster)
    g = gateway(tmp_path, args, "z")
    assert send(g.address, "z", 1).accepted == BATCH
    cluster.kill_zookeeper()
    try:
        with pytest.raises(grpc.RpcError) as refused:
            send(g.address, "z", 2, timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and retry_delay(refused.value)
        assert totals(g.address) == (BATCH, BATCH)
    finally:
        cluster.start_zookeeper()
    send_once_taken(g.address, "z", 2)
    assert totals(g.address) == (2 * BATCH, 2 * BATCH)


@pytest.mark.parametrize("kind", ["chdb", "clickhouse"])
def test_quarantine_and_producers_live_in_the_cluster(kind, request):
    """Rejected events and producer sequences are the cluster's: every gateway sees the same."""
    engine = engines.make(kind, request)
    events = random_events(40, seed=5)
    events[3]["conversion"], events[7]["test_id"] = 5, ""
    result = append(engine, to_table(events), producer_id="q", sequence=3)
    assert [(r.index, r.field) for r in result.rejections] == [(3, "conversion"), (7, "test_id")]
    assert append(engine, to_table(events), producer_id="q", sequence=3).duplicate
    assert append(engine, to_table(events), producer_id="q", sequence=2).duplicate
    assert append(engine, to_table(events[:5]), producer_id="q", sequence=4).accepted == 4
    # An event its sender may not write is said in the ack, not quarantined (core/events.py's Rejection).
    refused = append(engine, to_table(events[:2]), refuse=[Rejection(1, "test_id", "not yours", quarantined=False)])
    assert refused.accepted == 1 and [(r.index, r.quarantined) for r in refused.rejections] == [(1, False)]
    entries, total = engine.quarantine("", 10, "")
    assert total == 3 and [(e.index, e.field) for e in entries] == [(3, "conversion"), (7, "test_id"), (3, "conversion")]
    assert entries[0].event["conversion"] == 5 and entries[0].received_ns >= entries[1].received_ns
    # A batch whose sequence was not recorded (a shard down, a gateway killed) is sent again: its
    # rejected events, received anew, are not counted twice (they were, as rows that differ).
    insert = engine._b.insert

    def sequence_lost(table, columns):
        if table == "producers":
            raise Unavailable("the producers' shard is down")
        insert(table, columns)
    engine._b.insert = sequence_lost
    with pytest.raises(Unavailable):
        append(engine, to_table(events[:8]), producer_id="q", sequence=5)
    engine._b.insert = insert
    time.sleep(0.01)
    assert append(engine, to_table(events[:8]), producer_id="q", sequence=5).accepted == 6
    entries, total = engine.quarantine("", 10, "")
    assert total == 5 and [(e.index, e.field) for e in entries] == [
        (7, "test_id"), (3, "conversion"), (3, "conversion"), (7, "test_id"), (3, "conversion")]
    only, total = engine.quarantine(events[3]["test_id"], 10, "")
    assert total == 3 and all(e.event["test_id"] == events[3]["test_id"] for e in only)
    assert engine.quarantine("", 10, "zzz")[1] == 0
    engine.close()


def test_a_removals_mark_is_in_its_partitions_month_in_every_time_zone():
    """Partitions are months in the ClickHouse servers' time zone: a mark at the month's first
    instant in UTC fell in the month before on a server west of Greenwich."""
    from abstream.clickhouse import sql
    from abstream.clickhouse.engine import _mark

    for table, column in ((sql.EVENTS, "ns"), (sql.QUARANTINE, "received_ns")):
        for partition in ("202501", "202503", "202512"):
            at = dt.datetime.fromtimestamp(_mark(table, partition)[column][0] / 1e9, dt.timezone.utc)
            for hours in range(-12, 15):
                local = at.astimezone(dt.timezone(dt.timedelta(hours=hours)))
                assert local.strftime("%Y%m") == partition, (table, partition, hours)


def test_a_quorum_of_more_replicas_than_a_shard_has_is_refused_at_start(request):
    """Every insert would have waited for replicas there are not, answered UNAVAILABLE for ever
    while health said SERVING."""
    from abstream.core.errors import AbstreamError

    cluster = request.getfixturevalue("clickhouse_cluster")
    with pytest.raises(AbstreamError, match=r"--clickhouse-insert-quorum is 3, but shard 1 .* has 2 replica"):
        Backend(cluster.hosts().split(","), cluster.cluster_name, "any", insert_quorum=3)


def test_clickhouses_passing_refusals_are_said_retriable():
    """Merges behind inserts, a replica behind the quorum, a server too busy or out of memory:
    each was FAILED_PRECONDITION, which clients do not retry, mid-batch."""
    from abstream.clickhouse.backend import translate
    from abstream.core.errors import AbstreamError, Kind, ResourceExhausted, kind_of
    from clickhouse_driver.errors import ServerException

    for code, kind in ((252, Kind.UNAVAILABLE), (289, Kind.UNAVAILABLE), (244, Kind.UNAVAILABLE),
                       (202, Kind.RESOURCE_EXHAUSTED), (241, Kind.RESOURCE_EXHAUSTED), (62, Kind.FAILED_PRECONDITION)):
        error = translate(ServerException("DB::Exception: what the server said", code), "shard 1")
        assert kind_of(error) == kind, code
        assert isinstance(error, AbstreamError) and "what the server said" in str(error)
        if kind != Kind.FAILED_PRECONDITION:
            assert error.retry_after == 1.0 and (not isinstance(error, ResourceExhausted) or code in (202, 241))


@pytest.mark.parametrize("kind", ["chdb", "clickhouse"])
def test_long_statements_and_extreme_numbers_are_answered_as_the_embedded_engine_does(kind, request):
    """A retention sweep over 1,100 tests of long ids, an erasure from 600 long test ids and a cumulative
    lift over 300 long variant names made statements past the 256 KiB a server parses by
    default (refused: 'Code: 62.'); a revenue of 1e160 overflowed the merge of two shards'
    variances (INTERNAL), and a mean revenue of 1e-310 was written as a number ClickHouse 18.16
    does not read (refused)."""
    from abstream.core.types import AnalysisOptions, Interval, SummaryQuery, TimeseriesQuery
    from abstream.store import EventStore

    def event(i: int, test_id: str, **fields) -> dict:
        return {"timestamp": (BASE_S + i) * NS, "user_id": f"u{i}", "test_id": test_id, "variant": "A",
                "event_type": "click", "conversion": 1, "revenue": 1.0, "session_id": "s", "device": "mobile",
                "country": "DE", **fields}

    variants = [f"{i:03d}" + "v" * 250 for i in range(300)]
    rows = ([event(i, "many", variant=v) for i, v in enumerate(variants)]
            + [event(i, "huge", variant="AB"[i % 2], revenue=1e160 if i == 0 else 1.0) for i in range(40)]
            + [event(i, "tiny", variant="AB"[i % 2], revenue=1e-310) for i in range(8)]
            + [event(0, "victim_test", user_id="victim")]
            + [event(i, f"{i:05d}" + "o" * 240) for i in range(1_100)])
    cluster, embedded = engines.make(kind, request), EventStore()
    try:
        for engine in (cluster, embedded):
            for i in range(0, len(rows), 1_000):
                assert append(engine, to_table(rows[i:i + 1_000])).rejections == []
        lift = TimeseriesQuery("many", Interval.DAY, cumulative=True, lift=AnalysisOptions())
        huge, tiny = SummaryQuery("huge"), TimeseriesQuery("tiny", Interval.DAY, cumulative=True, lift=AnalysisOptions())
        for engine in (cluster, embedded):
            assert len(engine.timeseries(lift).variants) == 300
            assert list(engine.summary(huge).metrics.total_revenue) == [1e160, 20.0]
            assert len(engine.timeseries(tiny).bucket_start_ns) == 2
            assert engine.erase_user("victim", ["victim_test"] + [f"{i:05d}" + "'" * 250 for i in range(600)]) == 1
            assert engine.retain({f"{i:05d}" + "o" * 240: (BASE_S + 10 ** 6) * NS for i in range(1_100)}) == 1_100
    finally:
        cluster.close()
        embedded.close()


def test_a_batch_over_more_than_a_hundred_months_is_taken_as_the_embedded_engine_takes_it(request):
    """Current ClickHouse refused an insert block of over 100 partitions (months, here), and with
    it the whole batch. 18.16 has no such limit; its quorum inserts of a part per month, one after
    the other, outlast the quorum's timeout instead (UNAVAILABLE, docs/scale.md), so chDB only."""
    months = [{"timestamp": int(dt.datetime(2000 + m // 12, m % 12 + 1, 1, tzinfo=dt.timezone.utc).timestamp()) * NS,
               "user_id": f"u{m}", "test_id": "months", "variant": "AB"[m % 2]} for m in range(120)]
    engine = engines.make("chdb", request)
    try:
        assert append(engine, to_table(months)).accepted == 120
        assert [t.events for t in engine.list_tests()] == [120]
    finally:
        engine.close()


def test_a_test_deleted_through_one_gateway_loses_the_plan_another_gateway_just_made(request):
    """Gateways read the plans at most once a second: one that had read them before another
    created a plan deleted the test's events and left the plan."""
    from abstream.core.types import Experiment

    first, cluster = engines.make("clickhouse", request), request.getfixturevalue("clickhouse_cluster")
    second = ClickHouseEngine(Backend(cluster.hosts().split(","), cluster.cluster_name, first.database))
    try:
        append(first, to_table([{"timestamp": BASE_S * NS, "user_id": "u", "test_id": "gone", "variant": "A"}]))
        assert first.experiments() == {}  # read now: known for a second
        now = time.time_ns()
        second.put_experiment(Experiment("gone", control_variant="A", created_ns=now, updated_ns=now))
        assert first.delete_test("gone") == 1
        time.sleep(1.2)
        assert first.experiments() == {} and second.experiments() == {}
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("kind", ["chdb", "clickhouse"])
def test_one_caller_reads_the_plans_and_none_is_answered_plans_read_before_its_write(kind, request):
    """Callers that want the plans while a read is slow (a hung replica) take the last ones read
    instead of each reading them; but plans whose reading began before this gateway wrote one
    are never answered after the write."""
    from abstream.core.types import Experiment

    engine = engines.make(kind, request)
    real, reads, wrote = engine._b.each_shard, [], threading.Event()

    def slow(sql, **kwargs):  # the plans as the shards have them now, handed back a while later
        answer = real(sql, **kwargs)
        if "updated_ns" in sql:
            reads.append(sql)
            wrote.wait(1.0)
        return answer

    now = time.time_ns()
    try:
        engine.put_experiment(Experiment("first", control_variant="A", created_ns=now, updated_ns=now))
        assert set(engine.experiments()) == {"first"}
        time.sleep(1.1)  # past the plans' second
        engine._b.each_shard = slow
        answers: list[set[str]] = []
        callers = [threading.Thread(target=lambda: answers.append(set(engine.experiments()))) for _ in range(6)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(30)
        assert answers == [{"first"}] * 6
        assert len(reads) == 1  # one read; the other five took the plans read before

        time.sleep(1.1)
        reads.clear()
        reader = threading.Thread(target=engine.experiments)
        reader.start()
        wait_for(lambda: reads, timeout=10, what="a read under way")
        engine.put_experiment(Experiment("second", control_variant="A", created_ns=now, updated_ns=now))
        wrote.set()
        assert set(engine.experiments()) == {"first", "second"}  # not the read that began before it
        reader.join(30)
        assert len(reads) == 2
        assert set(engine.experiments()) == {"first", "second"}  # nor once that read ends
    finally:
        engine._b.each_shard = real
        engine.close()


def test_a_cluster_or_database_name_that_is_not_a_plain_name_is_refused_before_any_statement():
    from abstream.core.errors import AbstreamError

    for cluster, name, option in [("c", "ab-test", "--clickhouse-database"), ("x'y", "abstream", "--clickhouse-cluster")]:
        with pytest.raises(AbstreamError, match=f"{option} must be a name of letters, digits and underscores"):
            Backend(["127.0.0.1:1"], cluster, name)


def test_make_cluster_serves_and_stops_everything(tmp_path):
    """`make cluster` in the foreground: grpcurl ingests and queries; SIGTERM stops all it started."""
    port = free_port()
    directory = tmp_path / "made"
    log = tmp_path / "make.log"
    with open(log, "w") as out:
        process = subprocess.Popen(["make", "-s", "cluster", f"ADDR=127.0.0.1:{port}", f"DIR={directory}"], cwd=ROOT,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"serving \S+ on port", log.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        grpcurl = str(Path(sys.executable).parent / "grpcurl")
        event = ('{"events": [{"timestamp": "2025-04-28T18:42:22Z", "user_id": "user_455", "test_id": "test_5", '
                 '"variant": "variant_a", "event_type": "click", "conversion": 1, "revenue": 84.55}]}')
        ingest = subprocess.run([grpcurl, "-plaintext", "-d", event, f"127.0.0.1:{port}",
                                 "abstream.v1.AnalyticsService/IngestEvents"], capture_output=True, text=True, timeout=60)
        assert ingest.returncode == 0 and '"accepted": 1' in ingest.stdout, ingest.stderr
        summary = subprocess.run([grpcurl, "-plaintext", "-d", '{"test_id": "test_5"}', f"127.0.0.1:{port}",
                                  "abstream.v1.AnalyticsService/Summary"], capture_output=True, text=True, timeout=60)
        assert summary.returncode == 0 and '"total_revenue": 84.55' in summary.stdout, summary.stderr
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    left = subprocess.run(["pgrep", "-f", str(directory)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"still running: {left.stdout}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_migration_stopped_between_batches_resumes_with_another_batch_size(request, tmp_path):
    """Batches were numbered by their index: a re-run with another --batch-rows skipped or stored
    again events (and its count check then failed for good). They are numbered by the events up
    to their last now."""
    import io

    from abstream.clickhouse.migrate import migrate
    from abstream.store import Durability, EventStore

    store = EventStore(durability=Durability(tmp_path / "data"))
    append(store, to_table(random_events(3000, seed=12)))
    expected = {t.test_id: t.events for t in store.list_tests()}
    store.close()
    engine = engines.make("chdb", request)
    apply, applied = engine.apply, []

    def stopping(prepared):
        if len(applied) == 7:
            raise KeyboardInterrupt  # stopped between two batches
        applied.append(prepared)
        return apply(prepared)
    engine.apply = stopping
    with pytest.raises(KeyboardInterrupt):
        migrate(tmp_path / "data", engine, io.StringIO(), rows=100)
    engine.apply = apply
    said = io.StringIO()
    assert migrate(tmp_path / "data", engine, said, rows=65) == 0, said.getvalue()  # across 700 recorded
    assert {t.test_id: t.events for t in engine.list_tests()} == expected
    engine.close()


def test_migrate_copies_an_embedded_store_resumably_and_verifies_it(cluster, tmp_path):
    """`abstream migrate` into a cluster, SIGKILLed after its first test, then run again: every
    test's events are there once, and the counts are verified."""
    from abstream.store import Durability, EventStore

    events = random_events(6000, seed=11)
    store = EventStore(durability=Durability(tmp_path / "data"))
    for i in range(0, len(events), 500):
        append(store, to_table(events[i:i + 500]))
    expected = {t.test_id: (t.events, t.users) for t in store.list_tests()}
    store.close()
    name, args = database(cluster)
    command = [str(Path(sys.executable).parent / "abstream"), "migrate", "--data-dir", str(tmp_path / "data"),
               "--to-clickhouse", cluster.hosts(), "--clickhouse-cluster", cluster.cluster_name,
               "--clickhouse-database", name, "--batch-rows", "100"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = first.stdout.readline()  # one test copied: kill it in the middle of the next
    first.kill()
    first.wait(timeout=30)
    assert "events" in line
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(expected)} of {len(expected)} tests verified" in again.stdout
    g = gateway(tmp_path, args, "m")
    with grpc.insecure_channel(g.address) as channel:
        there = pb_stub(channel).ListTests(pb.ListTestsRequest(), timeout=30).tests
    assert {t.test_id: (t.events, t.users) for t in there} == expected
    third = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "(0 sent now)" in third.stdout and "MISMATCH" not in third.stdout
