"""Around every call, outermost first: its request id and access log line, the mapping of errors to
a status, and the check of its token. Each is a context entered around the handler (`around`),
wrapped onto unary and streaming handlers alike by one helper (`intercepted`).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from abstream.core.auth import PRINCIPAL, Tokens
from abstream.core.errors import Kind, kind_of
from abstream.core.logs import REQUEST_ID, new_request_id
from abstream.service.errors import to_status

log = logging.getLogger("abstream.service")
access = logging.getLogger("abstream.access")

Around = Callable[[grpc.aio.ServicerContext], Any]  # an async context manager factory


def intercepted(handler: grpc.RpcMethodHandler | None, around: Around) -> grpc.RpcMethodHandler | None:
    """`handler` with each of its calls run inside `around(context)`: every kind of method the
    services have (a kind left out here would run without its token checked)."""
    if handler is None:
        return None
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        inner_responses = handler.unary_stream

        async def responses(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                async for response in inner_responses(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(responses, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_stream:
        inner_stream = handler.stream_stream

        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                async for response in inner_stream(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                     handler.response_serializer)
    if handler.stream_unary:
        inner_collect = handler.stream_unary

        async def collect(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await inner_collect(requests, context)

        return grpc.stream_unary_rpc_method_handler(collect, handler.request_deserializer,
                                                    handler.response_serializer)
    raise TypeError(f"a method handler of no kind gRPC has: {handler!r}")


class _Interceptor(grpc.aio.ServerInterceptor):
    def around(self, details: grpc.HandlerCallDetails) -> Around | None:
        raise NotImplementedError

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        around = self.around(handler_call_details)
        return handler if around is None else intercepted(handler, around)


def _quiet(method: str) -> bool:
    return method.startswith("/grpc.health.v1.") or method.startswith("/grpc.reflection.")


class RequestInterceptor(_Interceptor):
    """A request id per call (the caller's `x-request-id` when sane), returned in the trailing
    metadata, and one access log line (probes would drown the calls that matter)."""

    def around(self, details: grpc.HandlerCallDetails) -> Around:
        method = details.method
        incoming = dict(details.invocation_metadata or ()).get("x-request-id", "")

        @asynccontextmanager
        async def call(context: grpc.aio.ServicerContext):
            REQUEST_ID.set(request_id := new_request_id(incoming))
            context.set_trailing_metadata((("x-request-id", request_id),))
            started = time.perf_counter()
            try:
                yield
            finally:
                if not _quiet(method):
                    code = context.code()
                    name = code.name if isinstance(code, grpc.StatusCode) else (
                        "OK" if code in (None, 0) else str(code))
                    access.info("call", extra={"method": method, "code": name,
                                               "ms": round((time.perf_counter() - started) * 1000, 3),
                                               "caller": PRINCIPAL.get().name})
        return call


class ErrorInterceptor(_Interceptor):
    """Every error becomes its status (service/errors.py); an unexpected one is logged with its
    trace and reaches the caller as INTERNAL."""

    def around(self, details: grpc.HandlerCallDetails) -> Around:
        method = details.method

        @asynccontextmanager
        async def call(context: grpc.aio.ServicerContext):
            try:
                yield
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - every error gets a status here
                if kind_of(error) is Kind.INTERNAL:
                    log.exception("unexpected error in %s", method)
                status = to_status(error)
                await context.abort(status.code, status.details,
                                    (*status.trailing_metadata, ("x-request-id", REQUEST_ID.get())))
        return call


def required_scope(method: str) -> str | None:
    """The scope a method needs; None for the open ones (health, reflection)."""
    if method.startswith("/abstream.v1.AdminService/"):
        return "admin"
    if method == "/abstream.v1.AnalyticsService/IngestEvents":
        return "ingest"
    if method.startswith("/abstream.v1.AnalyticsService/"):
        return "query"
    return None


#: How a gRPC caller sends a token, for the error when none came.
HOW = "send 'authorization: Bearer <token>' metadata (the abstream command: --token or ABSTREAM_TOKEN)"


class AuthInterceptor(_Interceptor):
    """The caller's bearer token, checked against the method's scope before its handler runs."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    def around(self, details: grpc.HandlerCallDetails) -> Around | None:
        scope = required_scope(details.method)
        if scope is None or not self._tokens.enabled:
            return None
        token = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                token = value[7:].strip()  # the scheme in any case (RFC 6750), as over HTTP

        @asynccontextmanager
        async def call(context: grpc.aio.ServicerContext):
            PRINCIPAL.set(self._tokens.principal(token, scope, HOW))
            yield
        return call
