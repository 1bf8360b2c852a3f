"""The one place where exceptions become gRPC status codes, with google.rpc details."""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from abstream.service.auth import PRINCIPAL
from abstream.service.logs import REQUEST_ID, new_request_id
from abstream.store import DeadlineExceeded, InvalidArgument, StoreError, Unavailable

log = logging.getLogger("abstream.service")
access = logging.getLogger("abstream.access")


class ResourceExhausted(Exception):
    """Too much at once (a rate limit, memory, streams): retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermissionDenied(Exception):
    """The caller's token does not cover what it asked for."""


def to_status(error: BaseException) -> grpc.Status:
    """The status a caller sees for `error`: specific for ours, opaque for anything unexpected."""
    if isinstance(error, ResourceExhausted):
        detail = any_pb2.Any()
        seconds, fraction = divmod(max(error.retry_after, 0.001), 1)
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(seconds),
                                                                                 nanos=int(fraction * 1e9))))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(error), details=[detail])
    elif isinstance(error, PermissionDenied):
        status = status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=str(error))
    elif isinstance(error, DeadlineExceeded):
        status = status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=str(error))
    elif isinstance(error, InvalidArgument):
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


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Around every call: a request id, the mapping of exceptions to a status, and one log line.

    Unexpected exceptions are logged with their trace and reach the caller as INTERNAL.
    """

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        incoming = dict(handler_call_details.invocation_metadata or ()).get("x-request-id", "")
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = _begin(incoming)
                try:
                    return await inner(request, context)
                except Exception as error:  # noqa: BLE001 - every error gets a status here
                    await _abort(context, method, error)
                finally:
                    _log_call(method, context, started)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            inner_stream = handler.stream_stream

            async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                started = _begin(incoming)
                try:
                    async for response in inner_stream(requests, context):
                        yield response
                except Exception as error:  # noqa: BLE001
                    await _abort(context, method, error)
                finally:
                    _log_call(method, context, started)

            return grpc.stream_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer)
        return handler


def _begin(incoming: str) -> float:
    REQUEST_ID.set(new_request_id(incoming))
    return time.perf_counter()


def _log_call(method: str, context: grpc.aio.ServicerContext, started: float) -> None:
    if method.startswith("/grpc.health.v1.") or method.startswith("/grpc.reflection."):
        return  # probes would drown the calls that matter
    code = context.code()
    name = code.name if isinstance(code, grpc.StatusCode) else ("OK" if code in (None, 0) else str(code))
    access.info("call", extra={"method": method, "code": name, "ms": round((time.perf_counter() - started) * 1000, 3),
                               "caller": PRINCIPAL.get().name})


async def _abort(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    if isinstance(error, grpc.aio.AbortError):
        raise error
    if not isinstance(error, (StoreError, ResourceExhausted, PermissionDenied)):
        log.exception("unexpected error in %s", method)
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
