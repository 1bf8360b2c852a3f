"""The transport's ceiling for row ingest: a grpc.aio server that takes each IngestEvents request
as bytes, decodes nothing, stores nothing, and answers a constant ack. `make bench` sends it the
same payloads as abstream, in the same run, and reports abstream as a share of it.

    python -m bench.null_server --accepted 1000     # prints "port N", serves until killed
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from abstream.v1 import analytics_pb2 as pb

METHOD = "/abstream.v1.AnalyticsService/IngestEvents"


async def serve(accepted: int) -> None:
    ack = pb.IngestEventsResponse(accepted=accepted).SerializeToString()

    async def ingest(requests, context):
        async for _ in requests:
            yield ack

    handler = grpc.method_handlers_generic_handler("abstream.v1.AnalyticsService", {
        "IngestEvents": grpc.stream_stream_rpc_method_handler(ingest, request_deserializer=None,
                                                              response_serializer=None)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"port {port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accepted", type=int, required=True, help="events each ack says were stored")
    asyncio.run(serve(parser.parse_args().accepted))


if __name__ == "__main__":
    main()
