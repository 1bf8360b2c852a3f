"""The one place where exceptions become gRPC status codes, with google.rpc details."""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from abstream.store import InvalidArgument, StoreError, Unavailable

log = logging.getLogger("abstream.service")


def to_status(error: BaseException) -> grpc.Status:
    """The status a caller sees for `error`: specific for ours, opaque for anything unexpected."""
    if isinstance(error, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.reason)]))
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(error), details=[detail])
    elif isinstance(error, Unavailable):
        status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(error))
    elif isinstance(error, StoreError):
        status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=str(error))
    else:
        status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see the server log")
    return rpc_status.to_status(status)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by any handler to a status; logs the unexpected ones with a trace."""

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except Exception as error:  # noqa: BLE001 - every error gets a status here
                    await _abort(context, method, error)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            inner_stream = handler.stream_stream

            async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for response in inner_stream(requests, context):
                        yield response
                except Exception as error:  # noqa: BLE001
                    await _abort(context, method, error)

            return grpc.stream_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer)
        return handler


async def _abort(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    if isinstance(error, grpc.aio.AbortError):
        raise error
    if not isinstance(error, StoreError):
        log.exception("unexpected error in %s", method)
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
