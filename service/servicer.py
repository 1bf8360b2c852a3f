"""AnalyticsService: converts each request, runs the store's work in a thread, converts back.

Query and ingest work is numpy/Arrow code that releases the GIL; running it in worker threads
keeps the event loop free to serve every other stream meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc

from abstream.service import converters
from abstream.store import EventStore
from abstream.store.queries import QueryStats
from abstream.v1 import analytics_pb2 as pb
from abstream.v1 import analytics_pb2_grpc as pb_grpc

QUARANTINE_DEFAULT_LIMIT = 100
QUARANTINE_MAX_LIMIT = 10_000


class AnalyticsServicer(pb_grpc.AnalyticsServiceServicer):
    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def IngestEvents(self, request_iterator: AsyncIterator[pb.IngestEventsRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.IngestEventsResponse]:
        batch = 0
        async for request in request_iterator:
            yield await asyncio.to_thread(self._ingest, batch, request)
            batch += 1

    def _ingest(self, batch: int, request: pb.IngestEventsRequest) -> pb.IngestEventsResponse:
        result = self._store.append(converters.request_to_table(request))
        return converters.ingest_response(batch, result)

    async def Summary(self, request: pb.SummaryRequest, context: grpc.aio.ServicerContext) -> pb.SummaryResponse:
        query = converters.summary_query(request)
        return await asyncio.to_thread(lambda: converters.summary_response(self._store.summary(query)))

    async def Segments(self, request: pb.SegmentsRequest, context: grpc.aio.ServicerContext) -> pb.SegmentsResponse:
        query = converters.segments_query(request)
        return await asyncio.to_thread(lambda: converters.segments_response(self._store.segments(query)))

    async def Timeseries(self, request: pb.TimeseriesRequest,
                         context: grpc.aio.ServicerContext) -> pb.TimeseriesResponse:
        query = converters.timeseries_query(request)
        return await asyncio.to_thread(lambda: converters.timeseries_response(self._store.timeseries(query)))

    async def ListTests(self, request: pb.ListTestsRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListTestsResponse:
        started = time.perf_counter_ns()
        tests = self._store.list_tests()  # maintained per-test counters: no event is scanned
        return converters.list_tests_response(tests, QueryStats(0, time.perf_counter_ns() - started))

    async def ListQuarantine(self, request: pb.ListQuarantineRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListQuarantineResponse:
        limit = min(request.limit or QUARANTINE_DEFAULT_LIMIT, QUARANTINE_MAX_LIMIT)
        entries, total = self._store.quarantine(request.test_id, limit)
        return converters.quarantine_response(entries, total)
