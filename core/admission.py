"""Admission control: what ingest may hold and do at once, decided before a request is decoded.

The budget of bytes for requests between their arrival and their ack, the memory high-water
mark, the number of open streams and the per-token rate limits.

Every stream reads its requests, prepares them in the one prepare thread and holds them until
their fsync: without a common bound, 64 streams with 8 requests of 64 MiB each in flight could
hold 32 GiB. A request's cost is charged before it is decoded, from a walk over its bytes that
allocates nothing per event (`converters.measure_request`), and released once it is acked or
has failed; a stream whose request does not fit waits, and so stops reading from its client.

A request's cost is what preparing it was measured to hold at its peak (100,000 events per
request, tests/test_hostile.py and the numbers below): its own bytes three times over (as
received, as columns, as the log record) plus 700 bytes per event (masks, codes, rejections;
empty events that are all rejected take the most), plus what its Arrow stream decompresses to.
Measured per event at its peak: 463 bytes for typical row events of 81 bytes, 709 for empty
events of 2, 162 for the compact columnar format of 30, 4,914 for events whose seven strings all
have 256 bytes (1,824 on the wire).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from abstream.core.auth import Principal

PER_WIRE_BYTE = 3
PER_EVENT = 700


@dataclass(frozen=True)
class RequestSize:
    """What preparing a request will hold, and whether it may be stored with the requests before
    it, known without decoding it (each transport measures its own requests:
    service/converters.py for gRPC)."""

    wire_bytes: int
    events: int  # as messages and as Arrow rows
    decoded_bytes: int  # what its Arrow IPC stream decompresses to; 0 without one
    producer_id: str = ""
    sequence: int = 0
    #: Requests of equal shapes (their transport's choice: the same columns and types) may be
    #: decoded and stored together as one batch; None: alone (an Arrow stream, logged as it came).
    shape: object = None


@dataclass(frozen=True)
class Limits:
    """What one server accepts at once (see Settings)."""

    max_batch_events: int = 100_000
    max_ingest_streams: int = 64
    memory_high_water_bytes: int = 0  # resolved: 0 is off
    max_ingest_bytes: int = 256 << 20
    max_query_seconds: float = 0.0  # 0: none
    max_queries: int = 64


def cost(size: RequestSize) -> int:
    """Bytes a request is charged until its ack."""
    return PER_WIRE_BYTE * size.wire_bytes + PER_EVENT * size.events + size.decoded_bytes


class IngestBudget:
    """Bytes of ingest in flight across every stream; callers wait for room (event loop only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._room = asyncio.Condition()

    async def acquire(self, amount: int) -> int:
        """Waits until `amount` fits, then holds it; returns what it holds (a request bigger than
        the whole budget is charged the whole budget and goes alone)."""
        amount = min(amount, self.capacity)
        async with self._room:
            await self._room.wait_for(lambda: self.used + amount <= self.capacity)
            self.used += amount
        return amount

    async def release(self, amount: int) -> None:
        if amount:
            async with self._room:
                self.used -= amount
                self._room.notify_all()


def memory_limit() -> int:
    """The memory this process may use: its cgroup's limit when it has one, else the machine's."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits)


#: The default memory high-water mark: ingest is refused above this share of `memory_limit`.
HIGH_WATER_SHARE = 0.8


def high_water(setting: int) -> int:
    """The high-water mark in bytes for a setting: -1 for the default share, 0 for none."""
    return int(memory_limit() * HIGH_WATER_SHARE) if setting < 0 else setting


class RateLimiter:
    """Token buckets per principal: `ingest_rate` events per second, bursts up to one second's worth."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last refill)

    def wait_for(self, principal: Principal, events: int) -> float:
        """0 if `events` may go now (and takes them), else seconds until they could."""
        rate = principal.ingest_rate
        if rate <= 0 or events == 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(principal.name, (rate, now))
            tokens = min(rate, tokens + (now - last) * rate)
            if events <= tokens or (tokens >= rate and events > rate):  # a batch above the burst goes alone
                self._buckets[principal.name] = (tokens - events, now)
                return 0.0
            self._buckets[principal.name] = (tokens, now)
            return (min(events, rate) - tokens) / rate
