"""Prometheus metrics, on a registry of the server's own (several servers may share a process).

Recorded by the core, whichever transport a call came by; engines add gauges of their own.
"""

from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING

from abstream.core.engine import Engine, Gauge
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client import Gauge as PromGauge

if TYPE_CHECKING:
    from abstream.core.types import IngestResult

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ingested = Counter("abstream_events_ingested", "Events stored", registry=r)
        self.rejected = Counter("abstream_events_rejected", "Events rejected, by the field that failed", ["field"],
                                registry=r)
        self.batches = Counter("abstream_batches", "Batches acknowledged, by outcome", ["outcome"], registry=r)
        self._stored, self._duplicate = self.batches.labels("stored"), self.batches.labels("duplicate")
        self.ack_seconds = Histogram("abstream_batch_ack_seconds", "From a batch's arrival to its ack",
                                     buckets=_LATENCY, registry=r)
        self.stored_together = Histogram("abstream_requests_per_stored_batch",
                                         "Requests of one stream stored as one batch (they queued up meanwhile)",
                                         buckets=(1, 2, 4, 8, 16), registry=r)
        self.query_seconds = Histogram("abstream_query_seconds", "Query latency by RPC", ["rpc"], buckets=_LATENCY,
                                       registry=r)
        self.removed = Counter("abstream_events_removed", "Events removed, by operation (delete_test, erase_user, "
                               "retention; quarantine_retention: quarantined events)", ["operation"], registry=r)
        self.active_streams = PromGauge("abstream_active_ingest_streams", "Open IngestEvents streams", registry=r)
        self.http_requests = Counter("abstream_http_requests", "HTTP requests, by route and status",
                                     ["route", "status"], registry=r)
        self.http_seconds = Histogram("abstream_http_seconds", "HTTP request latency by route", ["route"],
                                      buckets=_LATENCY, registry=r)
        self.ingest_yield_seconds = Counter("abstream_ingest_yield_seconds",
                                            "Time ingest waited for running queries: its store thread's and its "
                                            "sealer's, added (the two may wait at once)", registry=r)
        self._store_gauges: list[PromGauge] = []

    def acked(self, result: IngestResult, seconds: float) -> None:
        self.ack_seconds.observe(seconds)
        (self._duplicate if result.duplicate else self._stored).inc()
        self.ingested.inc(result.accepted)
        if result.rejections:
            for field, count in collections.Counter(r.field for r in result.rejections).items():
                self.rejected.labels(field).inc(count)

    def watch(self, engine: Engine) -> None:
        """Gauges read from the engine, and the process's resident memory, when scraped."""
        for g in [*engine.gauges(), Gauge("abstream_resident_bytes", "Resident memory of the process", resident_bytes)]:
            gauge = PromGauge(g.name, g.help, registry=self.registry)
            gauge.set_function(g.read)
            self._store_gauges.append(gauge)

    def serve(self, addr: str) -> int:
        """Starts the HTTP endpoint (/metrics); returns the port bound."""
        host, _, port = addr.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if getattr(self, "_http", None) is not None:
            self._http.shutdown()


_PAGE = os.sysconf("SC_PAGE_SIZE")
_statm: tuple[int, int] | None = None  # (the process that opened it, the descriptor)


def resident_bytes() -> int:
    """Read before every ingest request (admission), so from a descriptor kept open: opening the
    file each time cost more than the rest of the check."""
    global _statm
    if _statm is None or _statm[0] != os.getpid():  # a descriptor opened before a fork reads the parent
        _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
    return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE
