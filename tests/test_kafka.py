"""The Kafka connector against a real Kafka-protocol broker (Tansu) and real servers: exactly once
through crashes, rebalances and bad messages, and honest health while the broker is away."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.request

import grpc
import pytest
from abstream.clients import Client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.kafka import Broker, event_messages, free_port
from tests.process import Server, wait_for

pytest.importorskip("confluent_kafka", reason="confluent-kafka is a dependency")
TOPIC = "ab_test_events"
SESSION = ("--kafka-session-timeout-ms", "3000")


@pytest.fixture
def broker(tmp_path):
    running = Broker(tmp_path / "tansu.log").start()
    yield running
    running.stop()


def consuming(broker: Broker, *extra: str) -> tuple[str, ...]:
    return ("--kafka-bootstrap", broker.bootstrap, "--kafka-topic", TOPIC, *SESSION, *extra)


def events_of(server: Server, test_id: str | None = None) -> int:
    with Client(server.address) as client:
        return sum(t.events for t in client.list_tests().rows if test_id is None or t.test_id == test_id)


def kafka_health(server: Server) -> int:
    with grpc.insecure_channel(server.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="abstream.kafka"),
                                                          timeout=10).status


def http_health(server: Server) -> dict:
    with urllib.request.urlopen(f"http://{server.http_address}/health", timeout=10) as response:
        return json.loads(response.read())


def test_events_across_three_partitions_arrive_exactly_once(broker, tmp_path):
    broker.create_topic(TOPIC, 3)
    broker.produce(TOPIC, event_messages(90_000, 3, "kafka_test", per_message=10)
                   + event_messages(10_000, 3, "kafka_test", start_user=90_000))
    metrics = free_port()
    server = Server(tmp_path / "data", *consuming(broker, "--metrics-addr", f"127.0.0.1:{metrics}")).start()
    wait_for(lambda: events_of(server) >= 100_000, what="100,000 events")
    time.sleep(1.5)  # nothing more arrives
    assert events_of(server) == 100_000
    with Client(server.address) as client:
        summary = client.summary("kafka_test")
        assert sum(r.metrics.users for r in summary.rows) == 100_000  # every user once
        assert sum(r.metrics.conversions for r in summary.rows) == len([u for u in range(100_000) if u % 3 == 0])
    assert kafka_health(server) == health_pb2.HealthCheckResponse.SERVING
    assert http_health(server)["kafka"]["status"] == "SERVING"
    def scraped() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            return response.read().decode()

    assert f'abstream_kafka_events_total{{topic="{TOPIC}"}} 100000.0' in scraped()
    assert f'abstream_kafka_messages_total{{topic="{TOPIC}"}} 19000.0' in scraped()
    wait_for(lambda: all(f'abstream_kafka_lag{{partition="{p}",topic="{TOPIC}"}} 0.0' in scraped() for p in range(3)),
             timeout=30, what="lag 0 on every partition")
    server.terminate()


def test_a_server_killed_mid_stream_stores_everything_once_after_restart(broker, tmp_path):
    broker.create_topic(TOPIC, 3)
    broker.produce(TOPIC, event_messages(150_000, 3, "crash_test", per_message=5))
    server = Server(tmp_path / "data", *consuming(broker)).start()
    wait_for(lambda: events_of(server) > 20_000, what="some events")
    server.kill()  # SIGKILL: stored but not committed offsets are the point
    server = Server(tmp_path / "data", *consuming(broker)).start()
    stored_before = events_of(server)
    assert 20_000 < stored_before < 150_000  # what was acked survived the crash, and the rest was still to come
    wait_for(lambda: events_of(server) >= 150_000, what="150,000 events")
    time.sleep(1.5)
    assert events_of(server) == 150_000
    with Client(server.address) as client:
        assert sum(r.metrics.users for r in client.summary("crash_test").rows) == 150_000
    server.terminate()


def test_offsets_the_group_never_committed_are_not_stored_twice(broker, tmp_path):
    """The store, not the group's commits, says where each partition resumes: a new group (no
    committed offsets at all, so the broker would start it from the beginning) stores nothing
    again, and goes on with what is new."""
    broker.create_topic(TOPIC, 2)
    broker.produce(TOPIC, event_messages(10_000, 2, "resume_test", per_message=10))
    server = Server(tmp_path / "data", *consuming(broker, "--kafka-group", "first")).start()
    wait_for(lambda: events_of(server) >= 10_000, what="10,000 events")
    server.terminate()
    # New messages behind the old ones: the new group's first batch holds both.
    broker.produce(TOPIC, event_messages(1_000, 2, "resume_test", start_user=10_000))
    server = Server(tmp_path / "data", *consuming(broker, "--kafka-group", "second")).start()
    wait_for(lambda: events_of(server) >= 11_000, what="the new events")
    time.sleep(1.5)
    assert events_of(server) == 11_000
    server.terminate()


def test_a_partition_resumes_at_another_stores_commit_past_its_own_and_not_at_its_own():
    """What `_assigned` decides, for every case: the test broker (Tansu) keeps no commit
    metadata, so the cases of a commit naming its store are shown here."""
    from abstream.sources.kafka import resume_at

    assert resume_at(100, 200, "store-b", "store-a") == 200  # another server stored 100..199
    assert resume_at(100, 200, "store-a", "store-a") == 100  # its own: a backup restored, read again
    assert resume_at(100, 200, None, "store-a") == 200  # named no store: taken for another's
    assert resume_at(100, 50, "store-b", "store-a") == 100  # behind the store: the store's
    assert resume_at(0, 200, "store-b", "store-a") is None  # nothing stored: the group's commit (tp.offset unset)
    assert resume_at(0, -1, None, "store-a") is None  # nor committed: the group's reset, its earliest offset
    assert resume_at(0, 200, "store-a", "store-a") == 0  # its own, past nothing it holds: from the beginning


def test_while_ingest_refuses_it_pauses_and_loses_nothing(broker, tmp_path):
    """Above the memory high-water mark (here: always) ingest refuses; the connector pauses every
    partition and says so, stores nothing, and a server without the limit later gets every event
    exactly once."""
    broker.create_topic(TOPIC, 3)
    broker.produce(TOPIC, event_messages(9_000, 3, "paused_test", per_message=3))
    metrics = free_port()
    server = Server(tmp_path / "data", *consuming(broker, "--memory-high-water-bytes", "1", "--metrics-addr",
                                                  f"127.0.0.1:{metrics}")).start()
    wait_for(lambda: http_health(server)["kafka"]["state"].startswith("paused"), timeout=60, what="paused")
    assert kafka_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    time.sleep(2)
    assert events_of(server) == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
        assert "abstream_kafka_messages_total{" not in response.read().decode()  # fetched, not consumed
    # Still said seconds later (the broker's statistics, every second, said SERVING again).
    assert kafka_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert http_health(server)["kafka"]["state"].startswith("paused")
    server.terminate()
    server = Server(tmp_path / "data", *consuming(broker)).start()
    wait_for(lambda: events_of(server) >= 9_000, what="9,000 events")
    time.sleep(1.5)
    assert events_of(server) == 9_000
    server.terminate()


def test_malformed_messages_are_quarantined_with_their_offsets_and_the_rest_stored(broker, tmp_path):
    broker.create_topic(TOPIC, 1)
    good = event_messages(20, 1, "mixed_test")
    bad = [(0, b"not json at all"), (0, b""), (0, json.dumps({"user_id": "u", "test_id": "mixed_test",
                                                               "variant": "a"}).encode()),
           (0, json.dumps({"timestamp": "2025-04-02 10:00:00", "user_id": "u", "test_id": "mixed_test",
                           "variant": "a", "conversion": 7}).encode()),
           (0, b'{"a":\n' + b"[" * 100_000 + b"]" * 100_000 + b"}")]  # past Python's recursion limit
    broker.produce(TOPIC, good[:10] + bad + good[10:])  # offsets 10..14 are the bad ones
    server = Server(tmp_path / "data", *consuming(broker)).start()
    wait_for(lambda: events_of(server, "mixed_test") >= 20, what="the good events")
    with Client(server.address) as client:
        wait_for(lambda: len(client.quarantine().rows) >= 6, what="the quarantined ones")
        rows = client.quarantine().rows
    messages = sorted(r.message for r in rows)
    assert len(rows) == 6  # the deep one's two lines, each refused
    assert any("offset 14:" in m and "nested too deeply" in m for m in messages), messages
    assert kafka_health(server) == 1  # the consumer goes on
    for offset in (10, 11, 12, 13, 14):
        assert any(f"kafka {TOPIC} partition 0 offset {offset}:" in m for m in messages), (offset, messages)
    assert any("conversion must be 0 or 1" in m for m in messages)
    assert any("timestamp" in r.field for r in rows)
    assert events_of(server, "mixed_test") == 20
    server.terminate()


def test_messages_read_apart_in_one_batch_are_stored_together(broker, tmp_path):
    """A message the fast reader leaves (a timestamp in epoch seconds) makes its block's columns
    plain strings where the others' are dictionaries: one batch holds both."""
    broker.create_topic(TOPIC, 1)
    events = [{"timestamp": "2025-04-02 10:00:00", "user_id": f"u{i}", "test_id": "apart", "variant": "a",
               "event_type": "click", "session_id": "s" * 100, "device": "desktop", "country": "AU"} for i in range(30)]
    events[20]["timestamp"] = 1743500000
    broker.produce(TOPIC, [(0, json.dumps(e).encode()) for e in events])
    server = Server(tmp_path / "data", *consuming(broker)).start()
    wait_for(lambda: events_of(server, "apart") >= 30, what="every event")
    assert kafka_health(server) == 1
    server.terminate()


def test_a_partition_whose_offsets_start_again_is_stored_not_skipped(tmp_path):
    """A topic created again (here: a broker keeping its log in memory, restarted) numbers its
    messages from offset 0 again, below the offset already stored from it: its messages are
    stored (not taken for ones stored before), the restart is logged and counted, and a server
    restarted afterwards resumes the new offsets, storing nothing twice."""
    broker = Broker(tmp_path / "tansu.log").start()
    metrics = free_port()
    try:
        broker.create_topic(TOPIC, 1)
        broker.produce(TOPIC, event_messages(1_000, 1, "again_test", per_message=10))  # offsets 0 to 99
        server = Server(tmp_path / "data", *consuming(broker, "--metrics-addr", f"127.0.0.1:{metrics}")).start()
        wait_for(lambda: events_of(server) >= 1_000, what="the first 1,000 events")
        broker.stop()
        broker = Broker(tmp_path / "tansu.log", port=broker.port).start()
        broker.create_topic(TOPIC, 1)
        broker.produce(TOPIC, event_messages(200, 1, "again_test", per_message=10, start_user=1_000))  # 0 to 19
        wait_for(lambda: events_of(server) >= 1_200, what="the events after the restart")
        time.sleep(1.5)
        assert events_of(server) == 1_200
        # where it ends when it is looked at: the broker may be part way through the 20 messages
        assert re.search(rf"kafka: {TOPIC}\[0\] ends at offset \d+, below the 100 already stored from it", server.log())
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            assert f'abstream_kafka_partition_restarts_total{{topic="{TOPIC}"}} 1.0' in response.read().decode()
        server.terminate()
        broker.produce(TOPIC, event_messages(100, 1, "again_test", per_message=10, start_user=1_200))  # 20 to 29
        server = Server(tmp_path / "data", *consuming(broker)).start()
        wait_for(lambda: events_of(server) >= 1_300, what="the events sent while it was down")
        time.sleep(1.5)
        assert events_of(server) == 1_300
        with Client(server.address) as client:
            assert sum(r.metrics.users for r in client.summary("again_test").rows) == 1_300  # each user once
        server.terminate()
    finally:
        broker.stop()


def assigned(server: Server) -> int:
    """How many partitions the server's last assignment gave it (its log says each one)."""
    lines = [line for line in server.log_path.read_text().splitlines() if "kafka: assigned" in line]
    return len(re.findall(r"\[\d+\]@", lines[-1])) if lines else 0


def test_two_servers_in_one_group_share_the_partitions_and_hand_them_back(broker, tmp_path):
    """The first server stores from every partition, shares them with a second, and takes them
    back when it leaves: it resumes each at the group's offset (the second stored what came
    between, in its own store), not after the offsets its own store holds, which would store
    the second's share again."""
    broker.create_topic(TOPIC, 4)
    group = ("--kafka-group", "shared")
    first = Server(tmp_path / "one", *consuming(broker, *group)).start()
    broker.produce(TOPIC, event_messages(4_000, 4, "shared_test", per_message=10))
    wait_for(lambda: events_of(first) >= 4_000, what="the first server's events from every partition")
    second = Server(tmp_path / "two", *consuming(broker, *group)).start()
    # the events are sent once the group has rebalanced between the two (else the first may take all)
    wait_for(lambda: 0 < assigned(first) < 4 and 0 < assigned(second) < 4, what="both assigned partitions")
    broker.produce(TOPIC, event_messages(40_000, 4, "shared_test", per_message=10, start_user=4_000))
    wait_for(lambda: events_of(first) + events_of(second) >= 44_000, what="every event, between the two")
    time.sleep(1.5)
    one, two = events_of(first), events_of(second)
    assert one + two == 44_000
    assert one > 4_000 and two > 0  # both had partitions
    second.terminate()
    wait_for(lambda: assigned(first) == 4, what="the first server taking every partition back")
    broker.produce(TOPIC, event_messages(4_000, 4, "shared_test", per_message=10, start_user=44_000))
    wait_for(lambda: events_of(first) + two >= 48_000, what="the events sent after the second left")
    time.sleep(1.5)
    assert events_of(first) + two == 48_000
    first.terminate()


def test_a_rebalance_while_paused_loses_nothing_and_stalls_nothing(broker, tmp_path):
    """Ingest refuses the first server (its one ingest stream is taken) while a second joins the
    group: the partitions it keeps or gets stay paused until ingest takes batches again, then
    every one resumes (a revoked batch's partition left the others paused for good), and
    between the two every event is stored once."""
    import threading

    from abstream.v1 import analytics_pb2 as pb
    from abstream.v1 import analytics_pb2_grpc

    from tests.events import to_message

    broker.create_topic(TOPIC, 2)
    group = ("--kafka-group", "moving")
    first = Server(tmp_path / "one", *consuming(broker, *group, "--max-ingest-streams", "1")).start()
    wait_for(lambda: assigned(first) == 2, what="the first server's partitions")
    release = threading.Event()

    def held():
        yield pb.IngestEventsRequest(events=[to_message(dict(
            timestamp=1_743_500_000_000_000_000, user_id="u", test_id="held", variant="a", event_type="click",
            conversion=0, revenue=0.0, session_id="s", device="d", country="AU"))])
        release.wait(120)

    channel = grpc.insecure_channel(first.address)
    responses = analytics_pb2_grpc.AnalyticsServiceStub(channel).IngestEvents(held(), timeout=180)
    stream = threading.Thread(target=lambda: list(responses), daemon=True)
    stream.start()
    try:
        wait_for(lambda: events_of(first, "held") == 1, what="the held stream's event")
        broker.produce(TOPIC, event_messages(2_000, 2, "moving_test", per_message=10))
        wait_for(lambda: http_health(first)["kafka"]["state"].startswith("paused"), what="paused")
        second = Server(tmp_path / "two", *consuming(broker, *group)).start()
        wait_for(lambda: assigned(first) == 1 and assigned(second) == 1, what="one partition each")
        # Its partition's next batch is refused again (or the one in hand still is, if it kept it).
        wait_for(lambda: http_health(first)["kafka"]["state"].startswith("paused"), what="paused again")
        assert kafka_health(first) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert events_of(first, "moving_test") == 0
    finally:
        release.set()
        stream.join(30)
        channel.close()
    broker.produce(TOPIC, event_messages(2_000, 2, "moving_test", per_message=10, start_user=2_000))
    wait_for(lambda: events_of(first, "moving_test") + events_of(second, "moving_test") >= 4_000,
             what="every event, between the two")
    time.sleep(1.5)
    assert events_of(first, "moving_test") + events_of(second, "moving_test") == 4_000
    assert events_of(first, "moving_test") > 0 and events_of(second, "moving_test") > 0
    assert kafka_health(first) == health_pb2.HealthCheckResponse.SERVING
    first.terminate()
    second.terminate()


def test_a_fatal_client_error_replaces_the_consumer_which_resumes_from_the_store(broker, tmp_path):
    """A fatal error librdkafka reports (here given to the consumer's error callback as librdkafka
    would: Tansu fences no static members, the one source of fatal consumer errors) leaves the
    consumer unable to do anything: a new one joins in its place, says so in health and the
    restarts metric, and resumes where the store is, neither losing nor storing twice."""
    from confluent_kafka import KafkaError

    from abstream.core.settings import Settings

    from tests.conftest import ServerThread

    broker.create_topic(TOPIC, 2)
    broker.produce(TOPIC, event_messages(3_000, 2, "fatal_test", per_message=10))
    running = ServerThread(Settings(addr="127.0.0.1:0", http_addr="", data_dir=str(tmp_path / "data"),
                                    kafka_bootstrap=broker.bootstrap, kafka_topic=TOPIC,
                                    kafka_session_timeout_ms=3000)).start()
    try:
        source = running.server.kafka
        wait_for(lambda: events_of(running) >= 3_000, what="the first 3,000 events")
        states: list[str] = []
        was = source._on_state
        source._on_state = lambda serving, state: (states.append(state), was(serving, state))
        source._error(KafkaError(KafkaError._FENCED, "fenced by another member", fatal=True))
        wait_for(lambda: source.restarts._value.get() == 1, timeout=30, what="the consumer replaced")
        assert any(s.startswith("failed (KafkaException") and "restarting in 1 s" in s for s in states), states
        broker.produce(TOPIC, event_messages(3_000, 2, "fatal_test", per_message=10, start_user=3_000))
        wait_for(lambda: events_of(running) >= 6_000, what="the next 3,000 events, by the new consumer")
        wait_for(lambda: kafka_health(running) == health_pb2.HealthCheckResponse.SERVING, timeout=30,
                 what="SERVING again")
        time.sleep(1.5)
        assert events_of(running) == 6_000
        with Client(running.address) as client:
            assert sum(r.metrics.users for r in client.summary("fatal_test").rows) == 6_000
        assert source.restarts._value.get() == 1
        # The consumer in its place cannot be made for a while (what it reads, a certificate
        # being replaced, is not there): it is tried again until it can, not given up for good.
        config = source.config
        source.config = dataclasses.replace(config, client={"ssl.ca.location": str(tmp_path / "not-yet.pem"),
                                                            "security.protocol": "ssl"})
        source._error(KafkaError(KafkaError._FENCED, "fenced by another member", fatal=True))
        wait_for(lambda: source.restarts._value.get() >= 3, timeout=30, what="the consumer tried again")
        source.config = config
        broker.produce(TOPIC, event_messages(1_000, 2, "fatal_test", per_message=10, start_user=6_000))
        wait_for(lambda: events_of(running) >= 7_000, timeout=60, what="the events after it, by the consumer made")
        time.sleep(1.5)
        assert events_of(running) == 7_000
        wait_for(lambda: kafka_health(running) == health_pb2.HealthCheckResponse.SERVING, timeout=30,
                 what="SERVING again")
        # One broker of several gone is not the source's failure (another answers); all of them is.
        source._error(KafkaError(KafkaError._TRANSPORT, "127.0.0.1:9/bootstrap: Connect failed"))
        assert source.serving and kafka_health(running) == health_pb2.HealthCheckResponse.SERVING
        source._error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "2/2 brokers are down"))
        assert not source.serving and source.state.startswith("broker unreachable")
    finally:
        running.stop()
    assert (source.serving, source.state) == (False, "stopped")


def test_health_says_the_broker_is_missing_then_it_connects_when_it_appears(tmp_path):
    port = free_port()
    waiting = Broker(tmp_path / "tansu.log", port)
    server = Server(tmp_path / "data", "--kafka-bootstrap", waiting.bootstrap, "--kafka-topic", TOPIC, *SESSION).start()
    try:
        wait_for(lambda: "unreachable" in http_health(server)["kafka"]["state"], timeout=30, what="unreachable")
        assert kafka_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(server.address) as channel:  # the server itself serves all the same
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status \
                == health_pb2.HealthCheckResponse.SERVING
        waiting.start()
        waiting.create_topic(TOPIC, 1)
        waiting.produce(TOPIC, event_messages(100, 1, "late_test"))
        wait_for(lambda: events_of(server, "late_test") == 100, what="the events, once the broker is up")
        wait_for(lambda: kafka_health(server) == health_pb2.HealthCheckResponse.SERVING, timeout=30, what="SERVING")
        assert http_health(server)["kafka"]["status"] == "SERVING"
    finally:
        server.kill()
        waiting.stop()


def test_health_says_the_topic_is_missing_while_the_broker_answers(broker, tmp_path):
    metrics = free_port()
    server = Server(tmp_path / "data", "--kafka-bootstrap", broker.bootstrap, "--kafka-topic", "no_such_topic",
                    "--metrics-addr", f"127.0.0.1:{metrics}", *SESSION).start()
    wait_for(lambda: "does not exist" in http_health(server)["kafka"]["state"], timeout=30, what="the topic missing")
    assert http_health(server)["kafka"]["state"] == \
        f"topic no_such_topic does not exist on {broker.bootstrap}; waiting for it"
    assert kafka_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING

    def connected() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            return "abstream_kafka_connected 1.0" in response.read().decode()

    wait_for(connected, timeout=30, what="the broker counted as connected")
    server.terminate()


def test_a_topic_missing_beside_one_being_read_is_said_in_health(broker, tmp_path):
    """One topic of several missing was a warning in the log alone: health said every topic was
    being consumed. It still serves (the other is read), and says which topic it waits for."""
    broker.create_topic(TOPIC, 1)
    broker.produce(TOPIC, event_messages(30, 1, "beside_missing"))
    server = Server(tmp_path / "data", "--kafka-bootstrap", broker.bootstrap, "--kafka-topic",
                    f"{TOPIC},not_yet", *SESSION).start()
    try:
        wait_for(lambda: events_of(server) >= 30, what="30 events")
        wait_for(lambda: "does not exist" in http_health(server)["kafka"]["state"], timeout=30,
                 what="the topic said missing")
        assert http_health(server)["kafka"]["state"] == (f"consuming {TOPIC} from {broker.bootstrap}; topic not_yet "
                                                         "does not exist there, waiting for it")
        assert kafka_health(server) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.terminate()


def test_the_configuration_from_flags_and_a_toml_file(tmp_path):
    from abstream.sources.kafka import KafkaConfigError, kafka_config

    path = tmp_path / "kafka.toml"
    path.write_text('[kafka]\nbootstrap = "k1:9092"\ntopics = ["a", "b"]\ngroup = "g"\n'
                    '[kafka.client]\n"security.protocol" = "SASL_SSL"\n"sasl.mechanisms" = "PLAIN"\n'
                    '"sasl.username" = "u"\n"sasl.password" = "p"\n')
    config = kafka_config("", "", "", 3000, str(path))
    assert (config.bootstrap, config.topics, config.group) == ("k1:9092", ("a", "b"), "g")
    assert config.consumer()["security.protocol"] == "SASL_SSL" and config.consumer()["enable.auto.commit"] is False
    flags = kafka_config("k2:9092", "x, y", "h", 3000, str(path))  # flags over the file
    assert (flags.bootstrap, flags.topics, flags.group) == ("k2:9092", ("x", "y"), "h")
    assert kafka_config("", "", "abstream", 3000, "") is None
    with pytest.raises(KafkaConfigError, match="needs --kafka-bootstrap"):
        kafka_config("", "t", "abstream", 3000, "")
    for text, words in [('[kafka]\nbootstrap = "k1:9092"\ntopics = "r8"', "topics must be a list of topic names"),
                        ('[kafka]\nbootstrap = "k1:9092"\ntopics = ["a"]\nsession_timeout_ms = "abc"',
                         "session_timeout_ms must be a whole number"),
                        ('kafka = 5', "kafka must be a table"),
                        ('[kafka]\nbootstrap = 9092\ntopics = ["a"]', "bootstrap must be a string"),
                        ('[kafka]\nbootstrap = "k1:9092"\ntopics = ["a"]\nclient = "x"', "client must be a table"),
                        ('[kafka]\nbootstrap = "k1:9092"\ntopics = ["bad topic!"]', "a topic name is 1 to 249"),
                        ('[kafka]\nbootstrap = "k1:9092"\ntopics = ["a"]\n[kafka.client]\n"bogus.prop" = "1"',
                         'No such configuration property: "bogus.prop"'),
                        ('[kafka]\nbootstrap = "k1:9092"\ntopics = ["a"]\n[kafka.client]\n"enable.auto.commit" = true',
                         "enable.auto.commit cannot be set in [kafka.client]"),
                        ('[kafka]\nbootstrap = "k1:9092"\ntopics = ["a"]\n[kafka.client]\n"metadata.broker.list" = "k9:9092"',
                         "metadata.broker.list cannot be set in [kafka.client]"),  # bootstrap.servers by another name
                        ('[kafka]\nbootstrap = "k1:9092"\ntopics = ["a"]\n[kafka.client]\n'
                         '"partition.assignment.strategy" = "cooperative-sticky"', "not cooperatively")]:
        path.write_text(text + "\n")
        with pytest.raises(KafkaConfigError, match=re.escape(words)):
            kafka_config("", "", "", 3000, str(path))
        if "bogus" in text or "cooperative" in text or "kafka = 5" in text:  # serve says them as they are said here
            code, log = Server(tmp_path / "data", "--kafka-config", str(path)).start_expecting_failure()
            assert code != 0 and words in log and "Traceback" not in log, log
    path.write_text('[kafka]\ntopics = ["a"]\n[kafka.client]\n"fetch.wait.max.ms" = 50\n"check.crcs" = true\n')
    assert kafka_config("k1:9092", "", "", 3000, str(path)).consumer()["check.crcs"] == "true"  # TOML's types taken
    code, log = Server(tmp_path / "data", "--kafka-topic", "t").start_expecting_failure()
    assert code != 0 and "needs --kafka-bootstrap" in log
    for bootstrap in ("127.0.0.1:notaport", "k1:9092,k2:70000", "k1:9092,,k2:9092", "a b:9092"):
        with pytest.raises(KafkaConfigError, match="is not HOST:PORT"):
            kafka_config(bootstrap, "t", "abstream", 3000, "")
    for bootstrap in ("k1", "k1:9092,k2:9093", "SASL_SSL://k1:9093", "[::1]:9092", "10.0.0.1:1"):
        assert kafka_config(bootstrap, "t", "abstream", 3000, "").bootstrap == bootstrap
    code, log = Server(tmp_path / "data", "--kafka-bootstrap", "127.0.0.1:notaport", "--kafka-topic", "t"
                       ).start_expecting_failure()
    assert code != 0 and "is not HOST:PORT" in log and "Traceback" not in log, log
