"""Randomized events with the awkward cases the queries must get right, and an ingest helper."""

from __future__ import annotations

import random
from typing import Iterable

import pyarrow as pa
from abstream.store import EVENT_SCHEMA
from abstream.v1 import analytics_pb2 as pb

NS = 1_000_000_000
BASE_S = 1_745_800_000  # 2025-04-28, a Monday-spanning range is covered below
TESTS = ["checkout", "homepage_redesign", "tëst-ünïcode-✓", "solo"]
VARIANTS = {"checkout": ["control", "variant_a", "variant_b"],
            "homepage_redesign": ["A", "B"],
            "tëst-ünïcode-✓": ["contrôle", "変種", "B"],
            "solo": ["only"]}
DEVICES = ["desktop", "mobile", "tablet", ""]
COUNTRIES = ["US", "AU", "DE", "BR", "日本"]
EVENT_TYPES = ["page_view", "click", "purchase", "refund"]


def random_events(n: int, seed: int) -> list[dict]:
    """Events as dicts of EVENT_SCHEMA fields; timestamps in ns, some duplicates, refunds, etc."""
    rng = random.Random(seed)
    users = [f"user_{i}" for i in range(300)] + ["ユーザー_1", "usér_2", "user 3 with space"]
    events = []
    for _ in range(n):
        test = rng.choice(TESTS)
        conversion = 1 if rng.random() < 0.2 else 0
        revenue = rng.choice([0.0, round(rng.uniform(0, 200), 2), -round(rng.uniform(0, 50), 2)])
        events.append({
            # 10 days at second resolution plus some sub-second instants
            "timestamp": (BASE_S + rng.randrange(10 * 86400)) * NS + rng.choice([0, 0, 0, 500_000_000]),
            "user_id": rng.choice(users),
            "test_id": test,
            "variant": rng.choice(VARIANTS[test]),
            "event_type": rng.choice(EVENT_TYPES),
            "conversion": conversion,
            "revenue": revenue,  # revenue without conversion, conversion with 0, negative refunds
            "session_id": f"session_{rng.randrange(1000)}",
            "device": rng.choice(DEVICES),
            "country": rng.choice(COUNTRIES),
        })
    events += [dict(e) for e in rng.sample(events, n // 20)]  # exact duplicates
    rng.shuffle(events)
    return events


def to_table(events: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(events, schema=EVENT_SCHEMA)


def to_message(e: dict) -> pb.Event:
    message = pb.Event(**{k: v for k, v in e.items() if k != "timestamp"})
    if e.get("timestamp") is not None:
        message.timestamp.seconds, message.timestamp.nanos = divmod(e["timestamp"], NS)
    return message


def batches(events: list[dict], size: int) -> Iterable[pb.IngestEventsRequest]:
    for i in range(0, len(events), size):
        yield pb.IngestEventsRequest(events=[to_message(e) for e in events[i:i + size]])


def ingest(stub, events: list[dict], size: int = 250) -> list[pb.IngestEventsResponse]:
    """Streams `events` in batches over one IngestEvents call; returns every ack."""
    return list(stub.IngestEvents(batches(events, size), timeout=60))
