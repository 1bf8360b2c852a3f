"""The servicers: convert each request, run the store's work in a thread, convert back.

Query and ingest work is numpy/Arrow code that releases the GIL; running it in worker threads
keeps the event loop free to serve every other stream meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

import grpc
from google.protobuf import duration_pb2

from abstream.service import converters
from abstream.store import EventStore, Unavailable
from abstream.store.queries import QueryStats
from abstream.v1 import admin_pb2, admin_pb2_grpc
from abstream.v1 import analytics_pb2 as pb
from abstream.v1 import analytics_pb2_grpc as pb_grpc

QUARANTINE_DEFAULT_LIMIT = 100
#: Batches of one stream applied but not yet acknowledged (waiting for their fsync).
PIPELINE_DEPTH = 8
QUARANTINE_MAX_LIMIT = 10_000


class StoreHolder:
    """The store once it has recovered; until then, and once draining, calls are UNAVAILABLE."""

    def __init__(self) -> None:
        self.store: EventStore | None = None
        self.draining = False

    def get(self) -> EventStore:
        if self.store is None:
            raise Unavailable("the server is starting: recovering its data directory")
        return self.store


class AnalyticsServicer(pb_grpc.AnalyticsServiceServicer):
    def __init__(self, holder: StoreHolder) -> None:
        self._holder = holder

    async def IngestEvents(self, request_iterator: AsyncIterator[pb.IngestEventsRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.IngestEventsResponse]:
        """Applies batches in order and acks each once durable. Batches are pipelined: the next
        one is applied while the previous one's fsync runs, and one fsync may cover several."""
        store = self._holder.get()
        pending: asyncio.Queue = asyncio.Queue(maxsize=PIPELINE_DEPTH)
        cut_short = False

        async def apply_all() -> None:
            nonlocal cut_short
            try:
                batch = 0
                async for request in request_iterator:
                    result = await asyncio.to_thread(self._apply, store, request)
                    await pending.put((batch, result, asyncio.ensure_future(asyncio.to_thread(store.commit, result))))
                    batch += 1
                    if self._holder.draining:
                        cut_short = True
                        break
            finally:
                await pending.put(None)

        applying = asyncio.create_task(apply_all())
        try:
            while (item := await pending.get()) is not None:
                batch, result, durable = item
                await durable
                yield converters.ingest_response(batch, result)
            await applying  # raises what applying a batch raised, after every earlier ack
        finally:
            applying.cancel()
        if cut_short:  # the batches in hand are acked; send the rest elsewhere
            raise Unavailable("the server is shutting down; send the remaining batches again")

    @staticmethod
    def _apply(store: EventStore, request: pb.IngestEventsRequest):
        return store.append(converters.request_to_table(request), request.producer_id, request.sequence, wait=False)

    async def Summary(self, request: pb.SummaryRequest, context: grpc.aio.ServicerContext) -> pb.SummaryResponse:
        store, query = self._holder.get(), converters.summary_query(request)
        return await asyncio.to_thread(lambda: converters.summary_response(store.summary(query)))

    async def Segments(self, request: pb.SegmentsRequest, context: grpc.aio.ServicerContext) -> pb.SegmentsResponse:
        store, query = self._holder.get(), converters.segments_query(request)
        return await asyncio.to_thread(lambda: converters.segments_response(store.segments(query)))

    async def Timeseries(self, request: pb.TimeseriesRequest,
                         context: grpc.aio.ServicerContext) -> pb.TimeseriesResponse:
        store, query = self._holder.get(), converters.timeseries_query(request)
        return await asyncio.to_thread(lambda: converters.timeseries_response(store.timeseries(query)))

    async def ListTests(self, request: pb.ListTestsRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListTestsResponse:
        started = time.perf_counter_ns()
        tests = self._holder.get().list_tests()  # maintained per-test counters: no event is scanned
        return converters.list_tests_response(tests, QueryStats(0, time.perf_counter_ns() - started))

    async def ListQuarantine(self, request: pb.ListQuarantineRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListQuarantineResponse:
        limit = min(request.limit or QUARANTINE_DEFAULT_LIMIT, QUARANTINE_MAX_LIMIT)
        entries, total = self._holder.get().quarantine(request.test_id, limit)
        return converters.quarantine_response(entries, total)


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
