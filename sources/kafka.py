"""Kafka topics into the core, exactly once, with confluent-kafka (librdkafka).

Each partition is a producer, `kafka:<topic>:<partition>`, and a batch's sequence is the offset
after its last message: the store remembers, durably and with the events, how far each partition
got. When a partition is assigned (at start, after a crash, after a rebalance) consumption
resumes from there, whatever offset this store had committed to the group; so what was stored
but not committed before a crash is neither lost nor stored twice, without Kafka transactions.
Commits name their store (their metadata): a partition handed back resumes at another store's
commit past its own (that server stored what came between). Offsets
are committed after the events they cover are durable, for the group's lag and for other tools.
A partition whose log ends below the stored offset (the topic was deleted and created again, or a
broker lost its storage) is read again from its start as a new producer,
`kafka:<topic>:<partition>#<n>`: under the old one every new message would look stored.

Messages are JSON events as the tutorial sends them, one per message or NDJSON in a message. One
that cannot be read or fails validation is quarantined with its topic, partition and offset, and
the stream goes on. When ingest refuses (memory high-water mark, shutting down), the connector
pauses its partitions and retries the same messages until they are taken.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import io
import json
import logging
import re
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
from abstream.clients import files
from abstream.core import threads
from abstream.core.auth import ANYONE
from abstream.core.dataplane import Core
from abstream.core.errors import AbstreamError, InvalidArgument, ResourceExhausted, Unavailable
from abstream.core.metrics import Metrics
from abstream.sources.ingest import Ingest, Outcome
from prometheus_client import Counter, Gauge

log = logging.getLogger("abstream.kafka")

#: Most messages, and bytes of them, stored as one batch.
BATCH_MESSAGES = 20_000
class _Stored(enum.Enum):
    """What became of a batch of one partition's messages."""
    NOT = 0  # not stored: the server is stopping, or the partition went to another server
    YES = 1
    AFTER_A_PAUSE = 2  # stored once ingest took it again; the group may have rebalanced meanwhile


BATCH_BYTES = 8 << 20
BATCH_LINES = 50_000  # below the core's --max-batch-events
#: How long to wait before trying refused messages again when ingest gave no time.
RETRY_SECONDS = 1.0
#: A broker's address as librdkafka takes it: an optional protocol, a host name or an address
#: ([bracketed] for IPv6), an optional port (9092).
_BROKER = re.compile(r"(?:[A-Za-z_]+://)?(?:\[[0-9A-Fa-f:.]+\]|[^\s:,/\[\]]+)(?::(\d{1,5}))?")
#: A consumer that raised is replaced after this long, doubled at each failure up to the most.
RESTART_BACKOFF_SECONDS = 1.0
RESTART_BACKOFF_MOST = 30.0
RESTART_SECONDS = 5.0  # a partition's log ends below what was stored from it this long: it started again
#: A topic name Kafka takes.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
#: librdkafka properties the connector sets itself: exactly once rests on committing only what is
#: durable (auto commit off), and health on the statistics.
_OWN_PROPERTIES = ("bootstrap.servers", "metadata.broker.list", "group.id", "enable.auto.commit",
                   "statistics.interval.ms", "error_cb", "stats_cb", "logger", "on_commit")


class _Partition(NamedTuple):
    topic: str
    partition: int


class KafkaConfigError(ValueError):
    pass


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap: str
    topics: tuple[str, ...]
    group: str = "abstream"
    session_timeout_ms: int = 10_000
    client: dict[str, str] = field(default_factory=dict)  # more librdkafka properties

    def consumer(self) -> dict:
        return {"bootstrap.servers": self.bootstrap, "group.id": self.group, "client.id": "abstream",
                "enable.auto.commit": False, "auto.offset.reset": "earliest",
                "session.timeout.ms": self.session_timeout_ms,
                "heartbeat.interval.ms": max(100, min(3000, self.session_timeout_ms // 3)),
                "statistics.interval.ms": 1000, **self.client}


def kafka_config(bootstrap: str, topics: str, group: str, session_timeout_ms: int, path: str) -> KafkaConfig | None:
    """The connector's configuration from its flags, and a TOML file's `[kafka]` section under
    them (bootstrap, topics, group, and `[kafka.client]` librdkafka properties); None when no
    topic is to be consumed."""
    section: dict = {}
    if path:
        try:
            section = tomllib.loads(Path(path).read_text()).get("kafka", {})
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise KafkaConfigError(f"kafka config {path}: {error}") from None
        if not isinstance(section, dict):
            raise KafkaConfigError(f"kafka config {path}: kafka must be a table ([kafka]), not {section!r}"[:200])
        for key in ("bootstrap", "group"):
            if not isinstance(section.get(key, ""), str):
                raise KafkaConfigError(f"kafka config {path}: {key} must be a string, not {section[key]!r}"[:200])
        if not isinstance(section.get("client", {}), dict):
            raise KafkaConfigError(f"kafka config {path}: client must be a table of librdkafka properties "
                                   f"([kafka.client]), not {section['client']!r}"[:200])
    listed = section.get("topics", [])
    if not isinstance(listed, list) or not all(isinstance(t, str) and t for t in listed):
        raise KafkaConfigError(f"kafka config {path}: topics must be a list of topic names, as topics = "
                               f"[\"events\"], not {listed!r}"[:200])
    names = [t.strip() for t in topics.split(",") if t.strip()] or listed
    bootstrap = bootstrap or section.get("bootstrap", "")
    if not names and not bootstrap:
        return None
    if not names:
        raise KafkaConfigError("--kafka-bootstrap needs --kafka-topic (or topics in the [kafka] section)")
    if not bootstrap:
        raise KafkaConfigError("--kafka-topic needs --kafka-bootstrap HOST:PORT (or bootstrap in [kafka])")
    for broker in bootstrap.split(","):
        address = _BROKER.fullmatch(broker.strip())
        if address is None or not 0 < int(address.group(1) or 9092) < 65536:
            raise KafkaConfigError(f"kafka bootstrap: {broker.strip()[:100]!r} is not HOST:PORT (a port of 1 to "
                                   "65535; brokers separated by commas)")
    for name in names:
        if not name.startswith("^") and (not _TOPIC.fullmatch(name) or name in (".", "..")):  # ^: a pattern
            raise KafkaConfigError(f"kafka topic {name[:100]!r}: a topic name is 1 to 249 letters, digits, '.', "
                                   "'_' or '-'")
    client = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in section.get("client", {}).items()}
    if own := [k for k in client if k in _OWN_PROPERTIES]:
        raise KafkaConfigError(f"kafka config {path}: {', '.join(own)} cannot be set in [kafka.client]: the "
                               "connector sets it (bootstrap and group: their own keys or flags)")
    if "cooperative" in client.get("partition.assignment.strategy", ""):
        raise KafkaConfigError(f"kafka config {path}: partition.assignment.strategy: the connector takes its "
                               "partitions eagerly (range or roundrobin), not cooperatively")
    timeout = section.get("session_timeout_ms", session_timeout_ms)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise KafkaConfigError(f"kafka config {path}: session_timeout_ms must be a whole number of milliseconds, "
                               f"not {timeout!r}"[:200])
    config = KafkaConfig(bootstrap, tuple(names), group or section.get("group", "abstream"), timeout, client)
    _check_properties(config, path)
    return config


def _check_properties(config: KafkaConfig, path: str) -> None:
    """librdkafka's own checks of the properties, at start: a client made and closed, without
    subscribing (an unknown property or value, a certificate it cannot read)."""
    from confluent_kafka import Consumer, KafkaException

    try:
        Consumer({**config.consumer(), "logger": log}).close()
    except KafkaException as error:
        raise KafkaConfigError(f"kafka config {path or '(flags)'}: {error.args[0].str()}"[:500]) from None
    except (ValueError, TypeError) as error:
        raise KafkaConfigError(f"kafka config {path or '(flags)'}: {error}"[:500]) from None


def resume_at(stored: int, committed: int, owner: str | None, identity: str) -> int | None:
    """Where a partition resumes: after what the store holds of it (0: from its beginning), or
    at the group's commit past that when another store made it (its metadata names the store):
    another server of the group stored, in a store of its own, what came between while it had
    the partition. A commit of this store's own past what it holds (a power loss with --fsync
    interval, a backup restored) is read again, even when it holds nothing of the partition. A
    commit that names no store (one made before commits named them, or a broker that keeps no
    commit metadata) is taken for another's. None: the group's commit, where the store holds
    nothing of the partition and the commit (if any) is another's."""
    if owner == identity or (stored and committed <= stored):
        return stored
    return committed if stored else None


def producer_of(topic: str, partition: int, generation: int = 0) -> str:
    """The producer of a partition's offsets; `generation` counts the times its log started again."""
    return f"kafka:{topic}:{partition}" + (f"#{generation}" if generation else "")


def as_lines(value: bytes | None) -> bytes:
    """A message's value as NDJSON lines: a JSON object printed over several lines made one, an
    empty message a line that says so (it is quarantined like any unreadable one)."""
    value = (value or b"").strip()
    if not value:
        return b"null"
    if b"\n" in value and value[:1] == b"{":
        try:
            return json.dumps(json.loads(value), separators=(",", ":")).encode()
        except (ValueError, RecursionError):  # NDJSON, one event per line; or nested too deeply
            return value  # to read as one: its lines are read (and refused) one by one
    return value


def one_chunk(chunks) -> files.Chunk:
    """A batch's chunks as one: its sequence covers every message in it."""
    chunks = list(chunks)
    if len(chunks) == 1:
        return chunks[0]
    tables = [c.table for c in chunks]
    if len({t.schema for t in tables}) > 1:  # blocks read apart may differ in encoding (dictionary or not)
        tables = [t.cast(files.FILE_SCHEMA) for t in tables]
    return files.Chunk(pa.concat_tables(tables) if chunks else files.FILE_SCHEMA.empty_table(),
                       np.concatenate([np.asarray(c.lines) for c in chunks]) if chunks else np.zeros(0, np.int64),
                       [p for c in chunks for p in c.problems], max((c.last for c in chunks), default=0))


class KafkaSource:
    """The consumer, in a thread of its own; `state` says what it is doing, for health."""

    def __init__(self, core: Core, config: KafkaConfig, metrics: Metrics,
                 on_state: Callable[[bool, str], None] = lambda serving, state: None) -> None:
        self.core, self.config = core, config
        self.state = "starting"
        self.serving = False
        self._on_state = on_state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ingest = Ingest(core, 2)
        self._next: dict[tuple[str, int], int] = {}  # the next offset to store, per assigned partition
        self._generation: dict[tuple[str, int], int] = {}  # of each assigned partition's log (producer_of)
        self._below: dict[tuple[str, int], float] = {}  # since when each one's log ends below _next
        self._paused = False  # every assigned partition, while ingest refuses (`_store`)
        self._missing: set[str] = set()  # topics the broker says it does not have, while others are read
        self._fatal = None  # a fatal error librdkafka reported (`_error`)
        self._made = False  # a consumer was made: one that cannot be made later is tried again
        r = metrics.registry
        self.consumed = Counter("abstream_kafka_messages", "Kafka messages consumed (stored, or passed as unreadable), "
                                "by topic", ["topic"], registry=r)
        self.stored = Counter("abstream_kafka_events", "Events stored from Kafka, by topic", ["topic"], registry=r)
        self.quarantined = Counter("abstream_kafka_quarantined", "Events from Kafka quarantined, by topic",
                                   ["topic"], registry=r)
        self.lag = Gauge("abstream_kafka_lag", "Messages not yet consumed, by topic and partition",
                         ["topic", "partition"], registry=r)
        self.connected = Gauge("abstream_kafka_connected", "1 when a broker is reachable", registry=r)
        self.restarts = Counter("abstream_kafka_consumer_restarts", "Consumers replaced after they raised (see the "
                                "server's log)", registry=r)
        self.restarted = Counter("abstream_kafka_partition_restarts", "Partitions whose log ended below the offset "
                                 "already stored from them (recreated), by topic", ["topic"], registry=r)

    # ---- the thread ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="abstream-kafka", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finishes the batch in hand, commits, leaves the group."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._ingest.close()
        self._set(False, "stopped")

    @property
    def _consuming(self) -> str:
        missing = sorted(self._missing)
        return (f"consuming {', '.join(t for t in self.config.topics if t not in missing)} from "
                f"{self.config.bootstrap}" + (f"; topic {', '.join(missing)} does not exist there, waiting for it"
                                              if missing else ""))

    def _set(self, serving: bool, state: str) -> None:
        if (serving, state) != (self.serving, self.state):
            log.info("kafka: %s", state)
            self.serving, self.state = serving, state
            self._on_state(serving, state)

    def _run(self) -> None:
        """Consumes until stopped. A consumer that raised (a callback that could not reach the
        store during a rebalance, a fatal librdkafka error) leaves the group and a new one joins,
        after RESTART_BACKOFF_SECONDS doubling up to RESTART_BACKOFF_MOST: its partitions resume
        from the store, as after a crash, and nothing is lost or stored twice."""
        threads.name_native("abstream-kafka")
        backoff = RESTART_BACKOFF_SECONDS
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if not self._consume():
                    return  # a bad property: said, nothing to try again
            except Exception as error:  # noqa: BLE001 - logged, said in health, and started again
                log.exception("kafka consumer failed")
                if time.monotonic() - started >= RESTART_BACKOFF_MOST:
                    backoff = RESTART_BACKOFF_SECONDS  # it ran a while: not a failure in a loop
                self.restarts.inc()
                self._set(False, f"failed ({type(error).__name__}: {error}); restarting in {backoff:g} s")
                self._stop.wait(backoff)
                backoff = min(2 * backoff, RESTART_BACKOFF_MOST)

    def _consume(self) -> bool:
        """One consumer's life in the group: until stopped (True), or until it raises; False
        when the first cannot be made at all (a bad property). One that cannot be made in place
        of another raises: what it reads (a certificate being replaced) may be back soon."""
        from confluent_kafka import Consumer, KafkaException

        settings = {**self.config.consumer(), "error_cb": self._error, "stats_cb": self._stats, "logger": log}
        try:
            consumer = Consumer(settings)
        except Exception as error:  # noqa: BLE001 - a bad property: said, and the server goes on
            if self._made:
                raise
            self._set(False, f"failed: {error}")
            return False
        self._made = True
        self._set(False, f"connecting to {self.config.bootstrap}")
        try:
            consumer.subscribe(list(self.config.topics), on_assign=self._assigned, on_revoke=self._revoked,
                               on_lost=self._revoked)
            checked = time.monotonic()
            while not self._stop.is_set():
                if (fatal := self._fatal) is not None:
                    self._fatal = None
                    raise KafkaException(fatal)
                messages = consumer.consume(BATCH_MESSAGES, timeout=0.2)
                if messages:
                    self._handle(consumer, messages)
                if time.monotonic() - checked >= 1:
                    self._check_restarts(consumer)
                    checked = time.monotonic()
            return True
        finally:
            self._forget()
            try:
                consumer.close()
            except Exception as error:  # noqa: BLE001 - the group times the member out instead
                log.warning("kafka: closing the consumer failed: %s", error)

    def _forget(self) -> None:
        """Drops what this consumer's assignment held: a new consumer is assigned afresh."""
        self._revoked(None, [_Partition(topic, partition) for topic, partition in self._next])
        self._paused = False

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # ---- the group -------------------------------------------------------------------------

    def _assigned(self, consumer, partitions) -> None:
        """Each partition resumes after what the store has of it, in its latest generation (one
        the store has offsets of, or the first), or where `resume_at` says."""
        from confluent_kafka import OFFSET_BEGINNING

        committed = self._committed(consumer, partitions)
        identity = self.core.engine.identity
        self._missing -= {tp.topic for tp in partitions}
        for tp in partitions:
            generation = 0
            def stored_of(generation: int) -> int:
                return self._call(self.core.last_sequence(ANYONE, producer_of(tp.topic, tp.partition, generation)))
            stored = stored_of(0)
            while later := stored_of(generation + 1):
                generation, stored = generation + 1, later
            key = (tp.topic, tp.partition)
            offset, owner = committed.get(key, (-1, None))
            at = stored if generation else resume_at(stored, offset, owner, identity)
            if at is not None and at != stored:
                log.info("kafka: %s[%d] resumes at the group's offset %d: the store holds it up to %d, the rest "
                         "was stored by another server of the group", *key, at, stored)
                stored = at
            if at is not None:
                tp.offset = stored or OFFSET_BEGINNING
            self._next[key], self._generation[key] = stored, generation
        consumer.assign(partitions)
        if self._paused:  # a rebalance while ingest refuses: nothing fetched meanwhile from these either
            consumer.pause(partitions)
        else:  # a partition paused before, revoked and given back, stays paused in librdkafka
            consumer.resume(partitions)
        log.info("kafka: assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in partitions))
        if not self._paused:
            self._set(True, self._consuming)

    def _committed(self, consumer, partitions) -> dict[tuple[str, int], tuple[int, str | None]]:
        """The group's committed offset of each of `partitions`, and the store that committed it
        (its metadata); {} if they cannot be read."""
        from confluent_kafka import KafkaException

        try:
            return {(c.topic, c.partition): (c.offset, c.metadata or None)
                    for c in consumer.committed(partitions, timeout=10)}
        except KafkaException as error:
            log.warning("kafka: reading the group's offsets failed: %s", error)
            return {}

    def _revoked(self, consumer, partitions) -> None:
        # Nothing is in flight here (batches are stored and committed before the next consume).
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)
            self._generation.pop((tp.topic, tp.partition), None)
            self._below.pop((tp.topic, tp.partition), None)
            try:
                self.lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass

    def _error(self, error) -> None:
        from confluent_kafka import KafkaError

        if error.fatal():  # the consumer can do nothing more: `_consume` raises it, and a new one joins
            self._fatal = error
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.connected.set(0)
            self._set(False, f"broker unreachable ({self.config.bootstrap}): {error.str()}")
        else:  # one broker of several gone (_TRANSPORT, _RESOLVE): the statistics say if none answers
            log.warning("kafka: %s", error.str())

    def _stats(self, text: str) -> None:
        stats = json.loads(text)
        up = any(b.get("state") == "UP" for b in stats.get("brokers", {}).values())
        self.connected.set(1 if up else 0)
        if up and not self.serving and self._next and not self._paused:
            self._set(True, self._consuming)
        elif not up and self.serving:
            self._set(False, f"broker unreachable ({self.config.bootstrap})")
        for topic, t in stats.get("topics", {}).items():
            for number, p in t.get("partitions", {}).items():
                if (topic, int(number)) in self._next and p.get("consumer_lag", -1) >= 0:
                    self.lag.labels(topic, number).set(p["consumer_lag"])

    # ---- messages --------------------------------------------------------------------------

    def _handle(self, consumer, messages) -> None:
        from confluent_kafka import KafkaError

        groups: dict[tuple[str, int], list] = {}
        for m in messages:
            if m.error():
                if m.error().code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    self._missing.add(m.topic())  # said beside the topics read (`_consuming`), until assigned
                    if not self._next:
                        self._set(False, f"topic {m.topic()} does not exist on {self.config.bootstrap}; waiting for it")
                    elif self.serving:
                        self._set(True, self._consuming)
                else:
                    log.warning("kafka: %s", m.error().str())
                continue
            key = (m.topic(), m.partition())
            if m.offset() < self._next.get(key, 0):
                continue  # stored before (a redelivery), or a log that started again (`_check_restarts`)
            groups.setdefault(key, []).append(m)
        for (topic, partition), batch in groups.items():
            start = size = lines = 0
            for i, m in enumerate(batch):
                value = m.value() or b""
                size += len(value)
                lines += value.count(b"\n") + 1
                if size >= BATCH_BYTES or lines >= BATCH_LINES or i == len(batch) - 1:
                    stored = self._store(consumer, topic, partition, batch[start:i + 1])
                    if stored is _Stored.NOT:
                        # Stopping (a restart resumes from the store), or the partition was taken
                        # away meanwhile: what this consume fetched for the others is fetched again.
                        if not self._stop.is_set():
                            self._rewind(consumer, consumer.assignment())
                        return
                    self.consumed.labels(topic).inc(i + 1 - start)  # once: those fetched again were not
                    if stored is _Stored.AFTER_A_PAUSE:
                        # The group may have rebalanced while it waited: the rest of what was fetched
                        # may be another server's now, and each partition still here was sent back to
                        # what is stored, to be fetched again.
                        return
                    start, size, lines = i + 1, 0, 0

    def _check_restarts(self, consumer) -> None:
        """Notices partitions whose log started again: the end the broker gives in its fetch
        answers is below the offset stored from them (the topic was created again, or its
        broker lost its storage), for `RESTART_SECONDS` on end (a new leader's end may lag for
        a moment) and by the end it lists too. Each one is read again from its first offset as
        its log's next generation (`producer_of`): under the old producer its offsets would all
        look stored. A topic created again and grown past the stored offset while no server
        consumed it cannot be told apart by offsets."""
        from confluent_kafka import KafkaException, TopicPartition

        now = time.monotonic()
        for key, stored in list(self._next.items()):
            low, end = consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
            if not 0 <= end < stored:
                self._below.pop(key, None)
                continue
            if now - self._below.setdefault(key, now) < RESTART_SECONDS:
                continue
            try:
                _, listed = consumer.get_watermark_offsets(TopicPartition(*key), timeout=10, cached=False)
            except KafkaException as error:
                log.warning("kafka: reading where %s[%d] ends failed: %s", *key, error)
                continue
            if listed >= stored:
                continue
            generation = self._generation.get(key, 0) + 1
            log.error("kafka: %s[%d] ends at offset %d, below the %d already stored from it: the topic was created "
                      "again or its broker lost its storage. It is read again from offset %d, as producer %s",
                      *key, end, stored, low, producer_of(*key, generation))
            self.restarted.labels(key[0]).inc()
            self._generation[key], self._next[key] = generation, 0
            self._below.pop(key, None)
            try:
                consumer.seek(TopicPartition(*key, max(low, 0)))
            except KafkaException as error:  # checked again once it is assigned again
                log.warning("kafka: seeking %s[%d] to %d failed: %s", *key, low, error)

    def _store(self, consumer, topic: str, partition: int, messages: list) -> _Stored:
        """Stores the messages (one batch, durable when this returns) and commits past them; NOT
        if it did not (the server is stopping, or the partition was revoked meanwhile)."""
        from confluent_kafka import KafkaException, TopicPartition

        lines = [as_lines(m.value()) for m in messages]
        starts = np.cumsum([0] + [v.count(b"\n") + 1 for v in lines[:-1]]) + 1  # each message's first line
        offsets = [m.offset() for m in messages]
        body = b"\n".join(lines) + b"\n"
        total = int(starts[-1]) + lines[-1].count(b"\n")

        def where(line: int) -> str:
            return f"kafka {topic} partition {partition} offset {offsets[bisect.bisect_right(starts, line) - 1]}"

        def read():
            return iter([one_chunk(files.read_stream(io.BytesIO(body), "ndjson", total + 1, f"{topic}[{partition}]",
                                                     lambda warning: None))])

        producer, sequence = producer_of(topic, partition, self._generation.get((topic, partition), 0)), offsets[-1] + 1
        while True:
            outcome = self._try(read, producer, sequence, where)
            if isinstance(outcome, Outcome):
                break
            if isinstance(outcome, InvalidArgument):  # these messages can never be stored: said, and passed
                log.error("kafka: %s[%d] offsets %d to %d skipped: %s", topic, partition, offsets[0],
                          offsets[-1], outcome)
                outcome = Outcome()
                break
            if not self._paused:  # every partition (and those assigned meanwhile): nothing is fetched
                self._paused = True
                consumer.pause(consumer.assignment())
                self._set(False, f"paused: {outcome}")
            deadline = time.monotonic() + (getattr(outcome, "retry_after", None) or RETRY_SECONDS)
            while time.monotonic() < deadline and not self._stop.is_set():
                consumer.consume(1, timeout=0.1)  # stays in the group (a paused partition delivers nothing)
            if self._stop.is_set():
                return _Stored.NOT
            if self._next.get((topic, partition), offsets[-1] + 1) > offsets[0]:
                # Revoked, or given back to resume past these (another server stored them).
                self._resume(consumer)
                return _Stored.NOT
        stored = _Stored.YES
        if self._paused:
            self._resume(consumer)
            self._rewind(consumer, consumer.assignment())
            stored = _Stored.AFTER_A_PAUSE
        self._next[(topic, partition)] = sequence
        self.stored.labels(topic).inc(outcome.stored)
        self.quarantined.labels(topic).inc(outcome.quarantined)
        try:
            consumer.commit(offsets=[TopicPartition(topic, partition, sequence, metadata=self.core.engine.identity)],
                            asynchronous=False)
        except KafkaException as error:  # the store's sequence is what resumes the partition, not this
            log.warning("kafka: committing %s[%d] at %d failed: %s", topic, partition, sequence, error)
        return stored

    def _resume(self, consumer) -> None:
        """Ends a pause: every partition assigned now (those assigned later are resumed by
        `_assigned`: a pause outlives a partition's revocation and reassignment)."""
        if self._paused:
            self._paused = False
            consumer.resume(consumer.assignment())
            self._set(True, self._consuming)

    def _rewind(self, consumer, partitions) -> None:
        """Each partition back to the next offset not stored (where nothing is stored yet: the
        group's commit, else the beginning), so that nothing fetched and dropped is passed over
        (what is fetched twice is skipped: it is below `_next`)."""
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

        committed = {}
        if any(not self._next.get((tp.topic, tp.partition)) for tp in partitions):
            committed = self._committed(consumer, partitions)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            offset, owner = committed.get(key, (-1, None))
            at = self._next.get(key) or (offset if offset >= 0 and owner != self.core.engine.identity
                                         and not self._generation.get(key) else OFFSET_BEGINNING)
            if key in self._next:
                try:
                    consumer.seek(TopicPartition(tp.topic, tp.partition, at))
                except KafkaException as error:
                    log.warning("kafka: seeking %s[%d] to %d failed: %s", tp.topic, tp.partition, at, error)

    def _try(self, read, producer: str, sequence: int, where) -> Outcome | Exception:
        try:
            outcome = self._call(self._ingest.chunks(ANYONE, read, producer, sequence=lambda chunk, k: sequence,
                                                     where=where))
        except (ResourceExhausted, Unavailable) as refused:
            return refused
        except AbstreamError as error:  # InvalidArgument is skipped; anything else is tried again
            return error
        return outcome.failure if isinstance(outcome.failure, (ResourceExhausted, Unavailable)) else outcome
