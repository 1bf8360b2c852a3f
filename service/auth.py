"""Who may call what: bearer tokens with scopes, loaded hashed from a file, checked in one place.

The tokens file (TOML) lists one table per token; only the SHA-256 of each token is stored, so
the file reveals nothing usable (`abstream token NAME --scopes ingest,query` makes one):

    [[token]]
    name = "checkout-ingest"        # shows in logs and metrics, never the token
    sha256 = "9f86d0818…"
    scopes = ["ingest", "query"]    # ingest, query, admin
    test_prefix = "checkout_"       # optional: only tests whose id starts with this
    ingest_rate = 50000             # optional: events per second, averaged over a second

Health checking and (when enabled) reflection stay open.
"""

from __future__ import annotations

import contextvars
import hashlib
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SCOPES = ("ingest", "query", "admin")


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    test_prefix: str = ""
    ingest_rate: float = 0.0  # events per second; 0: unlimited

    def may_use(self, test_id: str) -> bool:
        return test_id.startswith(self.test_prefix)


#: Everyone, when no tokens are configured (the server then listens on loopback only).
ANYONE = Principal("anonymous", frozenset(SCOPES))
#: The caller of the RPC being served, set by the interceptor for its handler (and its threads).
PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal", default=ANYONE)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "abs_" + secrets.token_urlsafe(32)


def load_tokens(path: str | Path) -> dict[str, Principal]:
    """SHA-256 of each token -> who it is. Raises ValueError naming what is wrong in the file."""
    try:
        config = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"tokens file {path}: {error}") from error
    tokens = {}
    for i, entry in enumerate(config.get("token", [])):
        where = f"tokens file {path}, token {i + 1}"
        digest = str(entry.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}: sha256 must be 64 hex digits")
        scopes = frozenset(entry.get("scopes", []))
        if not scopes or not scopes <= set(SCOPES):
            raise ValueError(f"{where}: scopes must be some of {', '.join(SCOPES)}")
        tokens[digest] = Principal(str(entry.get("name", f"token-{i + 1}")), scopes, str(entry.get("test_prefix", "")),
                                   float(entry.get("ingest_rate", 0)))
    if not tokens:
        raise ValueError(f"tokens file {path} defines no [[token]]")
    return tokens


def required_scope(method: str) -> str | None:
    """The scope a method needs; None for the open ones (health, reflection)."""
    if method.startswith("/abstream.v1.AdminService/"):
        return "admin"
    if method == "/abstream.v1.AnalyticsService/IngestEvents":
        return "ingest"
    if method.startswith("/abstream.v1.AnalyticsService/"):
        return "query"
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token against the method's scope before any handler runs."""

    def __init__(self, tokens: dict[str, Principal] | None) -> None:
        self._tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or self._tokens is None:
            return handler
        scope = required_scope(details.method)
        if scope is None:
            return handler
        token = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value[len("Bearer "):].strip()
        principal = self._tokens.get(hash_token(token)) if token else None
        if principal is None:
            why = "no bearer token" if not token else "unknown token"
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            f"{why}: send 'authorization: Bearer <token>' metadata")
        if scope not in principal.scopes:
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"token {principal.name!r} lacks the {scope!r} scope this call needs")
        return _with_principal(handler, principal)


def _refusal(handler, code: grpc.StatusCode, message: str):
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(requests, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


def _with_principal(handler, principal: Principal):
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary(request, context):
            PRINCIPAL.set(principal)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    inner_stream = handler.stream_stream

    async def stream(requests, context):
        PRINCIPAL.set(principal)
        async for response in inner_stream(requests, context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


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
