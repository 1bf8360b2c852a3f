"""The servicers: convert each request, run the store's work in a thread, convert back.

Query and ingest work is numpy/Arrow code that releases the GIL; running it in worker threads
keeps the event loop free to serve every other stream meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc
from google.protobuf import duration_pb2

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from abstream.service import admission, converters
from abstream.service.admission import IngestBudget
from abstream.service.auth import PRINCIPAL, Principal, RateLimiter
from abstream.service.errors import PermissionDenied, ResourceExhausted
from abstream.service.metrics import Metrics, resident_bytes
from abstream.store import EventStore, IngestResult, PreparedBatch, Unavailable
from abstream.store.queries import QueryStats
from abstream.store.schema import Rejection
from abstream.v1 import admin_pb2, admin_pb2_grpc
from abstream.v1 import analytics_pb2 as pb
from abstream.v1 import analytics_pb2_grpc as pb_grpc

QUARANTINE_DEFAULT_LIMIT = 100
#: Batches of one stream applied but not yet acknowledged (waiting for their fsync).
PIPELINE_DEPTH = 8
QUARANTINE_MAX_LIMIT = 10_000
#: Requests up to this size are measured on the event loop (well under a millisecond).
INLINE_MEASURE_BYTES = 1 << 20
#: Longest an ingest step waits for running queries to finish (see _yield_to_queries).
QUERY_PRIORITY_WAIT_S = 0.05


class StoreHolder:
    """The store once it has recovered; until then, and once draining, calls are UNAVAILABLE."""

    def __init__(self) -> None:
        self.store: EventStore | None = None
        self.draining = False

    def get(self) -> EventStore:
        if self.store is None:
            raise Unavailable("the server is starting: recovering its data directory")
        return self.store


@dataclass(frozen=True)
class Limits:
    """What one server accepts at once (see Settings)."""

    max_batch_events: int = 100_000
    max_ingest_streams: int = 64
    memory_high_water_bytes: int = 0  # resolved: 0 is off
    max_ingest_bytes: int = 256 << 20


def _in_thread(pool: ThreadPoolExecutor, fn, *args):
    """`fn(*args)` in `pool`, with the caller's context (request id, principal), as to_thread does."""
    return asyncio.get_running_loop().run_in_executor(pool, functools.partial(contextvars.copy_context().run, fn, *args))


class AnalyticsServicer(pb_grpc.AnalyticsServiceServicer):
    def __init__(self, holder: StoreHolder, limits: Limits = Limits(), metrics: Metrics | None = None) -> None:
        self._holder = holder
        self._limits = limits
        self._rates = RateLimiter()
        self._streams = 0
        self._metrics = metrics or Metrics(None)
        self._queries = 0
        self._no_queries = threading.Event()
        self._no_queries.set()
        # One thread prepares batches and one applies them, for every stream: with a thread per
        # step from the shared pool, up to 8 prepares per stream fought over the GIL (~555 futex
        # calls per 1,000-event batch under strace, against ~117 with these two).
        self._preparing = ThreadPoolExecutor(1, thread_name_prefix="abstream-prepare")
        self._applying = ThreadPoolExecutor(1, thread_name_prefix="abstream-apply")
        self._budget = IngestBudget(limits.max_ingest_bytes)

    async def IngestEvents(self, request_iterator: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.IngestEventsResponse]:
        """Decodes, applies and acks batches in order, pipelined: while one batch waits for its
        fsync, the next is applied and later ones are decoded. Requests arrive as bytes, which
        `converters.decode_request` reads into columns."""
        store = self._holder.get()
        if self._holder.draining:
            raise Unavailable("the server is shutting down; send to another server or retry later")
        if self._streams >= self._limits.max_ingest_streams:
            raise ResourceExhausted(f"{self._streams} ingest streams are open, the most this server takes; "
                                    "send on an open stream or retry", retry_after=1.0)
        self._streams += 1
        self._metrics.active_streams.inc()
        principal = PRINCIPAL.get()
        decoding: asyncio.Queue = asyncio.Queue(maxsize=PIPELINE_DEPTH)
        acking: asyncio.Queue = asyncio.Queue(maxsize=PIPELINE_DEPTH)
        cut_short = False
        held: list[int] = []  # budget this stream holds, one entry per request not yet acked, in order

        async def read_all() -> None:
            nonlocal cut_short
            try:
                async for raw in request_iterator:
                    started = time.perf_counter()
                    measure = functools.partial(converters.measure_request, raw, self._limits.max_batch_events)
                    # A walk over the request's top level: inline for small ones, a thread for large.
                    size = measure() if len(raw) <= INLINE_MEASURE_BYTES else await asyncio.to_thread(measure)
                    self._check_memory()
                    held.append(await self._budget.acquire(admission.cost(size)))
                    await decoding.put((started, asyncio.ensure_future(
                        _in_thread(self._preparing, self._prepare, store, raw, principal))))
                    del raw  # the prepare thread holds it now, and lets go of it once done
                    if self._holder.draining:
                        cut_short = True
                        break
            finally:
                await decoding.put(None)

        async def apply_all() -> None:
            try:
                batch = 0
                while (item := await decoding.get()) is not None:
                    started, prepared = item
                    prepared = await prepared
                    result = await _in_thread(self._applying, self._apply, store, prepared, principal)
                    durable = asyncio.ensure_future(asyncio.to_thread(store.commit, result))
                    await acking.put((batch, result, durable, started))
                    batch += 1
            finally:
                await acking.put(None)

        reading, applying = asyncio.create_task(read_all()), asyncio.create_task(apply_all())
        try:
            while (item := await acking.get()) is not None:
                batch, result, durable, started = item
                await durable
                await self._budget.release(held.pop(0))
                self._metrics.acked(result, time.perf_counter() - started)
                yield converters.ingest_response(batch, result)
            await applying  # raises what decoding or applying a batch raised, after every earlier ack
            await reading
        finally:
            reading.cancel()
            applying.cancel()
            await self._budget.release(sum(held))
            self._streams -= 1
            self._metrics.active_streams.dec()
        if cut_short:  # the batches in hand are acked; send the rest elsewhere
            raise Unavailable("the server is shutting down; send the remaining batches again")

    def _yield_to_queries(self) -> None:
        """Ingest waits while queries run, up to QUERY_PRIORITY_WAIT_S per step (in the ingest
        threads, at the start of preparing and of applying each batch).

        A query is someone waiting for an answer; a batch is a producer with a buffer. On two
        cores, a stream ingesting at full speed would otherwise take the core (and the GIL) a
        query needs and make it several times slower.
        """
        if self._queries:
            started = time.perf_counter()
            self._no_queries.wait(QUERY_PRIORITY_WAIT_S)
            self._metrics.ingest_yield_seconds.inc(time.perf_counter() - started)

    @property
    def streams(self) -> int:
        """Ingest streams open now."""
        return self._streams

    def close(self) -> None:
        """Ends the ingest threads (once no stream is open)."""
        self._preparing.shutdown(wait=False)
        self._applying.shutdown(wait=False)

    def _prepare(self, store: EventStore, raw: bytes, principal: Principal) -> PreparedBatch:
        """Reads and checks one request (beside the previous batch being applied)."""
        self._yield_to_queries()
        batch = converters.decode_request(raw, self._limits.max_batch_events)
        table = batch.table
        refuse = batch.refuse
        if principal.test_prefix:
            tests = table.column("test_id").fill_null("") if "test_id" in table.column_names else None
            if tests is not None and pa.types.is_dictionary(tests.type):
                tests = tests.cast(pa.string())
            allowed = (pc.starts_with(tests, principal.test_prefix).to_numpy(zero_copy_only=False) if tests is not None
                       else np.zeros(table.num_rows, dtype=bool))
            why = f"token {principal.name!r} may only write tests whose id starts with {principal.test_prefix!r}"
            refuse = [*refuse, *(Rejection(i, "test_id", why) for i in np.flatnonzero(~allowed).tolist())]
        return store.prepare(table, batch.producer_id, batch.sequence, refuse, batch.ipc)

    def _check_memory(self) -> None:
        """Refuses ingest while the process is above its memory high-water mark."""
        mark = self._limits.memory_high_water_bytes
        if mark and (resident := resident_bytes()) > mark:
            raise ResourceExhausted(f"the server holds {resident:,} bytes, above its memory high-water mark of "
                                    f"{mark:,}; retry later", retry_after=1.0)

    def _apply(self, store: EventStore, prepared: PreparedBatch, principal: Principal) -> IngestResult:
        self._yield_to_queries()
        wait = self._rates.wait_for(principal, prepared.events)
        if wait > 0:
            raise ResourceExhausted(f"token {principal.name!r} is over its ingest rate of "
                                    f"{principal.ingest_rate:g} events/s", retry_after=wait)
        return store.apply(prepared, wait=False)

    async def _query(self, name: str, query, run, respond, context: grpc.aio.ServicerContext):
        """Runs one query in a thread, if the caller may read the test, with the caller's deadline."""
        principal = PRINCIPAL.get()
        if query.test_id and not principal.may_use(query.test_id):
            raise PermissionDenied(f"token {principal.name!r} may only read tests whose id starts with "
                                   f"{principal.test_prefix!r}")
        remaining = context.time_remaining()
        if remaining is not None:
            query = dataclasses.replace(query, deadline=time.monotonic() + remaining)
        return await self._in_worker(name, lambda: respond(run(query)))

    async def _in_worker(self, name: str, work):
        """`work()` in a worker thread, counted as a running query (ingest yields to it), timed."""
        started = time.perf_counter()
        self._queries += 1
        self._no_queries.clear()
        try:
            return await asyncio.to_thread(work)
        finally:
            self._queries -= 1
            if not self._queries:
                self._no_queries.set()
            self._metrics.query_seconds.labels(name).observe(time.perf_counter() - started)

    async def Summary(self, request: pb.SummaryRequest, context: grpc.aio.ServicerContext) -> pb.SummaryResponse:
        return await self._query("Summary", converters.summary_query(request), self._holder.get().summary,
                                 converters.summary_response, context)

    async def Segments(self, request: pb.SegmentsRequest, context: grpc.aio.ServicerContext) -> pb.SegmentsResponse:
        return await self._query("Segments", converters.segments_query(request), self._holder.get().segments,
                                 converters.segments_response, context)

    async def Timeseries(self, request: pb.TimeseriesRequest,
                         context: grpc.aio.ServicerContext) -> pb.TimeseriesResponse:
        return await self._query("Timeseries", converters.timeseries_query(request), self._holder.get().timeseries,
                                 converters.timeseries_response, context)

    async def ListTests(self, request: pb.ListTestsRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListTestsResponse:
        store, prefix = self._holder.get(), PRINCIPAL.get().test_prefix

        def work() -> pb.ListTestsResponse:
            started = time.perf_counter_ns()
            tests = [t for t in store.list_tests() if t.test_id.startswith(prefix)]
            return converters.list_tests_response(tests, QueryStats(0, time.perf_counter_ns() - started))

        return await self._in_worker("ListTests", work)

    async def ListQuarantine(self, request: pb.ListQuarantineRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListQuarantineResponse:
        store, prefix = self._holder.get(), PRINCIPAL.get().test_prefix
        limit = min(request.limit or QUARANTINE_DEFAULT_LIMIT, QUARANTINE_MAX_LIMIT)
        return await self._in_worker("ListQuarantine", lambda: converters.quarantine_response(
            *store.quarantine(request.test_id, limit, prefix)))


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, holder: StoreHolder, data_dir: str) -> None:
        self._holder = holder
        self._data_dir = Path(data_dir)

    async def CreateSnapshot(self, request: admin_pb2.CreateSnapshotRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.CreateSnapshotResponse:
        store = self._holder.get()
        started = time.perf_counter_ns()
        info = await asyncio.to_thread(store.snapshot)
        seconds, nanos = divmod(time.perf_counter_ns() - started, 1_000_000_000)
        path = info.path.relative_to(self._data_dir) if info.path.is_relative_to(self._data_dir) else info.path
        return admin_pb2.CreateSnapshotResponse(path=str(path), events=info.events,
                                                elapsed=duration_pb2.Duration(seconds=seconds, nanos=nanos))
