"""The gRPC servicers: each converts its request, hands it to the core, converts the answer back.

The work (admission, validation, the engine, the analysis) is the core's (core/dataplane.py);
the conversion of answers runs in the core's worker thread with the query.
"""

from __future__ import annotations

from typing import AsyncIterator

import grpc
from abstream.core.auth import PRINCIPAL
from abstream.core.dataplane import Core
from abstream.service import converters
from abstream.sources.objects import Importer
from abstream.v1 import admin_pb2, admin_pb2_grpc
from abstream.v1 import analytics_pb2 as pb
from abstream.v1 import analytics_pb2_grpc as pb_grpc
from google.protobuf import duration_pb2


class AnalyticsServicer(pb_grpc.AnalyticsServiceServicer):
    def __init__(self, core: Core) -> None:
        self._core = core

    async def IngestEvents(self, request_iterator: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.IngestEventsResponse]:
        """Requests arrive as bytes (server.py), which converters read straight into columns."""
        max_events = self._core.limits.max_batch_events
        results = self._core.ingest(PRINCIPAL.get(), request_iterator,
                                    lambda raw: converters.measure_request(raw, max_events),
                                    lambda raws: converters.decode_request(raws, max_events))
        batch = 0
        async for result in results:
            yield converters.ingest_response(batch, result)
            batch += 1

    async def Summary(self, request: pb.SummaryRequest, context: grpc.aio.ServicerContext) -> pb.SummaryResponse:
        return await self._core.summary(PRINCIPAL.get(), converters.summary_query(request), context.time_remaining(),
                                        converters.summary_response)

    async def Segments(self, request: pb.SegmentsRequest, context: grpc.aio.ServicerContext) -> pb.SegmentsResponse:
        return await self._core.segments(PRINCIPAL.get(), converters.segments_query(request),
                                         context.time_remaining(), converters.segments_response)

    async def Timeseries(self, request: pb.TimeseriesRequest,
                         context: grpc.aio.ServicerContext) -> pb.TimeseriesResponse:
        return await self._core.timeseries(PRINCIPAL.get(), converters.timeseries_query(request),
                                           context.time_remaining(), converters.timeseries_response)

    async def ListTests(self, request: pb.ListTestsRequest,
                        context: grpc.aio.ServicerContext) -> pb.ListTestsResponse:
        return await self._core.list_tests(PRINCIPAL.get(), converters.list_tests_response)

    async def ListQuarantine(self, request: pb.ListQuarantineRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListQuarantineResponse:
        return await self._core.quarantine(PRINCIPAL.get(), request.test_id, request.limit,
                                           converters.quarantine_response)

    async def Power(self, request: pb.PowerRequest, context: grpc.aio.ServicerContext) -> pb.PowerResponse:
        return await self._core.power(PRINCIPAL.get(), converters.power_query(request), context.time_remaining(),
                                      converters.power_response)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: Core, data_dir: str, importer: Importer) -> None:
        self._core = core
        self._data_dir = data_dir
        self._importer = importer

    async def DeleteTest(self, request: admin_pb2.DeleteTestRequest,
                         context: grpc.aio.ServicerContext) -> admin_pb2.DeleteTestResponse:
        return admin_pb2.DeleteTestResponse(events=await self._core.delete_test(PRINCIPAL.get(), request.test_id))

    async def EraseUser(self, request: admin_pb2.EraseUserRequest,
                        context: grpc.aio.ServicerContext) -> admin_pb2.EraseUserResponse:
        removed = await self._core.erase_user(PRINCIPAL.get(), request.user_id, list(request.test_ids))
        return admin_pb2.EraseUserResponse(events=removed)

    async def SetRetention(self, request: admin_pb2.SetRetentionRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.SetRetentionResponse:
        plan = await self._core.set_retention(PRINCIPAL.get(), request.test_id, request.days)
        return admin_pb2.SetRetentionResponse(experiment=converters.experiment_message(plan))

    async def ExportEvents(self, request: admin_pb2.ExportEventsRequest, context: grpc.aio.ServicerContext):
        start, end = converters.time_range(request)
        async for piece in self._core.export(PRINCIPAL.get(), request.test_id, start, end):
            yield admin_pb2.ExportEventsResponse(arrow_ipc=converters.ipc_stream(piece), events=piece.num_rows)

    async def ImportEvents(self, request: admin_pb2.ImportEventsRequest, context: grpc.aio.ServicerContext):
        async for progress in self._importer.run(PRINCIPAL.get(), request.uri, request.format, request.endpoint_url,
                                                 request.region):
            yield converters.import_progress(progress)

    async def CreateSnapshot(self, request: admin_pb2.CreateSnapshotRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.CreateSnapshotResponse:
        elapsed = duration_pb2.Duration()
        with converters.timed(elapsed):
            info = await self._core.snapshot(PRINCIPAL.get())
        return admin_pb2.CreateSnapshotResponse(path=converters.relative(info.path, self._data_dir), events=info.events,
                                                elapsed=elapsed)

    async def CreateExperiment(self, request: admin_pb2.CreateExperimentRequest,
                               context: grpc.aio.ServicerContext) -> admin_pb2.CreateExperimentResponse:
        plan = await self._core.create_experiment(PRINCIPAL.get(), converters.experiment(request.experiment))
        return admin_pb2.CreateExperimentResponse(experiment=converters.experiment_message(plan))

    async def UpdateExperiment(self, request: admin_pb2.UpdateExperimentRequest,
                               context: grpc.aio.ServicerContext) -> admin_pb2.UpdateExperimentResponse:
        plan = await self._core.update_experiment(PRINCIPAL.get(), converters.experiment(request.experiment))
        return admin_pb2.UpdateExperimentResponse(experiment=converters.experiment_message(plan))

    async def ListExperiments(self, request: admin_pb2.ListExperimentsRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.ListExperimentsResponse:
        plans = await self._core.list_experiments(PRINCIPAL.get())
        return admin_pb2.ListExperimentsResponse(experiments=[converters.experiment_message(p) for p in plans])

    async def StopExperiment(self, request: admin_pb2.StopExperimentRequest,
                             context: grpc.aio.ServicerContext) -> admin_pb2.StopExperimentResponse:
        stop = converters.to_ns(request.stop_time) if request.HasField("stop_time") else None
        plan = await self._core.stop_experiment(PRINCIPAL.get(), request.test_id, stop)
        return admin_pb2.StopExperimentResponse(experiment=converters.experiment_message(plan))
