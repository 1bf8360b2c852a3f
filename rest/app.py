"""The HTTP API: the tutorial's platform's routes (Events API, pipes, Data Sources API, what its
CLI asks first) on the core every transport calls, in the server's own event loop beside gRPC.

Handlers convert: parameters to a core call, its answer to the platform's JSON. Errors come from
one table (rest/errors.py). Tokens are gRPC's (a header `Authorization: Bearer` or `?token=`);
the scopes: ingest to append, query to read pipes, any valid token for what describes the
server (workspace, data sources).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import ipaddress
import logging
import ssl
import time
import uuid
from typing import Awaitable, Callable, TypeVar

import pyarrow as pa
from abstream.clients import files
from abstream.core.auth import Principal
from abstream.core.dataplane import Core
from abstream.core.errors import (AbstreamError, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted,
                                  Unauthenticated)
from abstream.core.events import check_query_string
from abstream.core.logs import REQUEST_ID, new_request_id
from abstream.core.metrics import Metrics
from abstream.core.settings import Settings
from abstream.rest import body, formats, pipes
from abstream.rest.errors import BodyTooLarge, HttpError, error_response, status_of
from abstream.rest.results import ResultsPage
from abstream.sources.ingest import BATCH_LINES, Ingest, Outcome, reader_for
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("abstream.http")

DATASOURCE = "ab_test_events"
QUARANTINE = "ab_test_events_quarantine"
HOW = "send 'Authorization: Bearer <token>' or add ?token=<token> (docs/http.md)"
PRINCIPAL_KEY = "principal"
T = TypeVar("T")
#: The longest request line or header the parser takes (a long parameter is then refused in JSON).
MAX_LINE_BYTES = 64 << 10
#: An Events API body up to this size is read whole before it is parsed.
SMALL_BODY_BYTES = 1 << 20


#: What a browser's preflight is told: any route, these methods and headers, for a day.
_PREFLIGHT = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
              "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding, Idempotency-Key, "
                                              "X-Request-Id",
              "Access-Control-Max-Age": "86400"}
#: Response headers a page's script may read.
_EXPOSED = "X-Request-Id, Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset"


#: What aiohttp raises for a form it cannot read: no or a wrong boundary, bytes its charset cannot
#: decode, a charset nobody knows, a part cut short, a part's headers malformed, too many or too long.
_UNREADABLE_FORM = (ValueError, LookupError, AssertionError, HttpProcessingError)


async def _form(request: web.Request):
    """A POSTed form's fields, or 400 (415 when compressed: a form is read as sent)."""
    if request.headers.get("Content-Encoding", "").lower() not in ("", "identity"):
        raise HttpError(415, "a form is read as sent: send it without a Content-Encoding")
    try:
        return await request.post()
    except _UNREADABLE_FORM as error:
        raise InvalidArgument("body", f"is not a form the server can read ({error})"[:300]) from None


def _part_reader(part: BodyPartReader):
    """The file part's next piece, as the body reader asks for it; a part the form cannot give
    whole (its closing boundary malformed) is a 400 for the rows after what was stored."""
    async def read() -> bytes:
        try:
            return await part.read_chunk(1 << 16)
        except _UNREADABLE_FORM as error:
            raise HttpError(400, f"the form's file part cannot be read ({error})"[:300]) from None
    return read


def _pieces(data: bytes) -> Callable[[], Awaitable[bytes]]:
    """A body already read, as `body.stream` reads one: all of it, then its end."""
    pieces = iter([data, b""])

    async def read() -> bytes:
        return next(pieces, b"")
    return read


def _token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token", "")


#: The slowest a body may come on average, past its first --http-body-idle-seconds.
MIN_BODY_RATE = 8 << 10


class _Pace:
    """How much of a body came since when: what it may still take to come (`left`)."""

    def __init__(self, whole: int | None = None) -> None:
        self.started = time.monotonic()
        self.whole = whole is not None  # read at once (a small body): its whole length is allowed for
        self.received = whole or 0

    def left(self, idle: float) -> float:
        return max(self.started + idle + self.received / MIN_BODY_RATE - time.monotonic(), 0.001)


class HttpApi:
    """The aiohttp application and its listening site; `port` is the one bound."""

    def __init__(self, core: Core, settings: Settings, metrics: Metrics) -> None:
        self.core, self.settings, self.metrics = core, settings, metrics
        self.port = 0
        self.started = dt.datetime.now(dt.timezone.utc)
        self.ingest = Ingest(core, max(settings.max_ingest_streams, 1))
        self._bodies = 0  # being read now (`_read`)
        # A body is stored in batches of at most --max-batch-events, as gRPC's are.
        self._batch_lines = min(BATCH_LINES, settings.max_batch_events)
        self._cors_origins = frozenset(o.strip() for o in settings.http_cors_origins.split(",") if o.strip())
        # Without a tokens file every caller may do anything, so a page of another site must not
        # be one (see _refused_without_tokens).
        self._open = not core.tokens.enabled
        if self._open and "*" in self._cors_origins:
            self._cors_origins -= {"*"}
            if settings.http_cors_origins.strip() != "*":  # '*' among others: given, not the default
                log.warning("without a tokens file, --http-cors-origins '*' lets no other site's page call the HTTP "
                            "API; the origins listed with it still may")
        self.workspace_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"abstream:{settings.data_dir or settings.addr}"))
        # A request line or header up to 64 KiB reaches the handlers, which refuse a long parameter
        # in JSON (aiohttp's parser answers past 8 KiB itself, in text).
        app = web.Application(middlewares=[self._middleware], client_max_size=settings.http_max_body_bytes,
                              handler_args={"max_line_size": MAX_LINE_BYTES, "max_field_size": MAX_LINE_BYTES})
        route = self._route
        app.router.add_get("/v0/workspace", route("workspace", "", self.workspace))
        app.router.add_get("/v1/workspace", route("workspace", "", self.workspace))
        app.router.add_get("/v0/regions", route("regions", None, self.regions))
        app.router.add_get("/health", route("health", None, self.health))
        app.router.add_post("/v0/events", route("events", "ingest", self.events))
        app.router.add_get("/v0/datasources", route("datasources", "", self.datasources))
        app.router.add_post("/v0/datasources", route("append", "ingest", self.append))
        app.router.add_get("/v0/datasources/{name}", route("datasource", "", self.datasource))
        app.router.add_get("/v0/pipes", route("pipes", "", self.pipes))
        app.router.add_route("GET", "/v0/pipes/{name}.{fmt}", route("pipe", "query", self.pipe))
        app.router.add_route("POST", "/v0/pipes/{name}.{fmt}", route("pipe", "query", self.pipe))
        app.router.add_route("*", "/v0/sql", route("sql", "query", self.sql))
        ResultsPage(core, route).add_routes(app)
        # Bodies are inflated here (rest/body.py), bounded, not by aiohttp as they arrive.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False,
                                     shutdown_timeout=settings.grace_seconds)

    # ---- plumbing ----------------------------------------------------------------------------

    def _route(self, name: str, scope: str | None, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        """`handler` for route `name`, after the token is checked for `scope` ("": any valid
        token; None: open)."""
        async def handle(request: web.Request) -> web.StreamResponse:
            request["route"] = name
            if scope is not None:
                request[PRINCIPAL_KEY] = self.core.tokens.principal(_token(request), scope, HOW)
            if scope == "query":
                return await _while_connected(request, handler(request))
            return await handler(request)
        return handle

    def _cors_origin(self, request: web.Request) -> str | None:
        """What Access-Control-Allow-Origin says to a page's script, if its origin may call: any
        (`*`) or the ones listed. A token is sent by the script, never a cookie, so answering any
        page lets no page act as a visitor without the visitor's token."""
        origin = request.headers.get("Origin")
        if origin is None or not self._cors_origins:
            return None
        if "*" in self._cors_origins:
            return "*"
        return origin if origin in self._cors_origins else None

    def _refused_without_tokens(self, request: web.Request) -> str | None:
        """Why a server without tokens refuses a request a browser may have made for another site.

        Such a server answers anyone who reaches it, which on loopback is its own machine's users
        and programs, but a browser on that machine also reaches it for any site it visits: a
        page's form or script can post events (a form needs no CORS) or, through a DNS name the
        site points at 127.0.0.1, read answers. So a request that names another site as its
        origin is refused, unless that origin is listed in --http-cors-origins; and one addressed
        to a name that is not loopback is refused, unless the server was told to listen beyond
        loopback (--insecure)."""
        # (Browsers always send Host; without one, aiohttp names the machine, which is no site.)
        if not self.settings.insecure and "Host" in request.headers and not _loopback_name(_host_of(request)):
            return (f"this server has no tokens file, so it answers only requests addressed to a loopback name "
                    f"(localhost, 127.0.0.1, [::1]), not {request.host!r}: a page on another site could reach it "
                    "through a name of its own")
        origin = request.headers.get("Origin")
        own = f"{request.scheme}://{request.host}"
        if origin is not None and origin.lower() != own.lower() and origin not in self._cors_origins:
            return (f"this server has no tokens file, so pages of other sites may not call it ({origin!r} is not "
                    f"{own!r}); list the page's origin in --http-cors-origins, or give the server a tokens file")
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Request ids, errors as JSON, CORS, a log line and metrics for every request."""
        REQUEST_ID.set(request_id := new_request_id(request.headers.get("X-Request-Id", "")))
        started = time.perf_counter()
        cors = self._cors_origin(request)
        try:
            if self._open and (why := self._refused_without_tokens(request)):
                raise PermissionDenied(why)
            if cors and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
                request["route"] = "preflight"  # a browser asking before a call: answered for every route
                response = web.Response(status=204, headers=_PREFLIGHT)
            else:
                response = await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - every error is answered, the unexpected ones logged
            if _gone(request):  # what failed was reading from a client that left (mid-body): not our error
                response = web.Response(status=CLIENT_GONE)
            else:
                if status_of(error) >= 500 and not isinstance(error, (AbstreamError, web.HTTPException)):
                    log.exception("%s %s failed", request.method, request.path)
                response = error_response(error)
        response.headers["X-Request-Id"] = request_id
        if cors:
            response.headers.update({"Access-Control-Allow-Origin": cors, "Access-Control-Expose-Headers": _EXPOSED})
            if cors != "*":
                response.headers["Vary"] = "Origin"
        route = request.get("route", "unknown")
        self.metrics.http_requests.labels(route, str(response.status)).inc()
        self.metrics.http_seconds.labels(route).observe(time.perf_counter() - started)
        log.info("%s %s %d %.1fms", request.method, request.path, response.status,
                 (time.perf_counter() - started) * 1000)
        return response

    def _ssl(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca:
            context.load_verify_locations(s.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def start(self) -> int:
        host, _, port = self.settings.http_addr.rpartition(":")
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or None, int(port), ssl_context=self._ssl(), reuse_port=False)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            raise OSError(f"cannot listen for HTTP on {self.settings.http_addr}: {error.strerror or error}") from None
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()
        self.ingest.close()

    # ---- what the platform's clients ask first ------------------------------------------------

    async def workspace(self, request: web.Request) -> web.Response:
        principal = request[PRINCIPAL_KEY]
        return web.json_response({"id": self.workspace_id, "name": "abstream", "user_email": "",
                                  "user_id": principal.name,
                                  "scope": "admin" if "admin" in principal.scopes else ",".join(sorted(principal.scopes))})

    async def regions(self, request: web.Request) -> web.Response:
        return web.json_response({"regions": []})  # only this server: a client never tries another host

    async def health(self, request: web.Request) -> web.Response:
        """Open to probes; what the server and its sources are doing (which name ClickHouse hosts,
        Kafka brokers and their errors) only to a caller with a token, when tokens are needed."""
        serving = self.core.serving
        try:
            self.core.tokens.principal(_token(request), "", HOW)
            said = True
        except Unauthenticated:
            said = False
        answer = {"status": "SERVING" if serving else "NOT_SERVING",
                  **({"error": str(self.core.stopped)} if self.core.stopped is not None and said else {}),
                  **{name: {"status": "SERVING" if s.serving else "NOT_SERVING", **({"state": s.state} if said else {})}
                     for name, s in self.core.sources.items()}}
        return web.json_response(answer, status=200 if serving else 503)

    # ---- Events API ----------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.Response:
        """NDJSON (an event per line) whatever the Content-Type says (curl -d sends a form type);
        200 with wait=true, 202 without, either way once the rows are durable."""
        self._datasource(request.query.get("name", ""))
        wait = pipes.Params(request.query).boolean("wait")
        if request.content_length is None and request.headers.get("Transfer-Encoding", "").lower() != "chunked":
            raise HttpError(411, "a body is required, with a Content-Length or chunked")
        producer = self._idempotency(request)
        length, limit = request.content_length, self.settings.http_max_body_bytes
        if length is not None and length <= min(SMALL_BODY_BYTES, limit) \
                and request.headers.get("Content-Encoding", "").lower() in ("", "identity"):
            # Read on the loop and parsed in one step: a small body's cost is its hops between threads.
            raw = await self._within(request.read(), "the body", _Pace(length))
            stream, whole = io.BytesIO(raw), True
            if raw.startswith(body.GZIP_MAGIC):  # gzip without its header: inflated, as a larger body is
                stream, whole = self._body(request, _pieces(raw), limit, "the body"), False
        else:
            stream, whole = self._body(request, request.content.readany, limit, "the body"), False
        outcome = await self._read(request[PRINCIPAL_KEY],
                                   lambda: reader_for("ndjson", stream, "body", [], self._batch_lines), producer, whole)
        self._raise_failure(outcome)
        answer = {"successful_rows": outcome.stored, "quarantined_rows": outcome.quarantined, **outcome.details()}
        return web.json_response(answer, status=200 if wait else 202)

    async def _read(self, principal: Principal, make, producer: str, whole: bool = False) -> Outcome:
        """A body stored, by one of --max-ingest-streams readers; 429 at once when every one is
        taken (a request waited, unanswered, for one to be free)."""
        if self._bodies >= self.ingest.readers:
            raise ResourceExhausted(f"{self._bodies} bodies are being read, the most this server reads at once "
                                    "(--max-ingest-streams); retry", retry_after=1.0)
        self._bodies += 1
        try:
            return await self.ingest.chunks(principal, make, producer, whole=whole)
        finally:
            self._bodies -= 1

    def _idempotency(self, request: web.Request) -> str:
        """The producer id an Idempotency-Key makes: the same key, from the same token (the core
        keeps each token's producers apart), stores once."""
        key = request.headers.get("Idempotency-Key", "")
        if not key:
            return ""
        check_query_string("Idempotency-Key", key)
        return f"http:{request[PRINCIPAL_KEY].name}:{key}"

    def _body(self, request: web.Request, read, limit: int, what: str):
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(what, limit)
        encoding = request.headers.get("Content-Encoding", "").lower()
        if encoding not in ("", "identity", "gzip"):
            raise HttpError(415, f"Content-Encoding {encoding[:32]!r} is not supported: send gzip or nothing")
        pace = _Pace()
        return body.stream(lambda: self._within(read(), what, pace), asyncio.get_running_loop(), limit, what,
                           gzip=True if encoding == "gzip" else None)

    async def _within(self, reading: Awaitable[T], what: str, pace: _Pace | None = None) -> T:
        """A piece of a body, or 408 when none comes within --http-body-idle-seconds: a body being
        read holds a reader, and 64 clients that sent a few bytes and then nothing held every one,
        stopping all HTTP ingest for as long as they stayed connected. With `pace`, the body so
        far must also have come at MIN_BODY_RATE on average (after its first idle period): a
        client sending a byte every few seconds held a reader as long as it liked."""
        idle = self.settings.http_body_idle_seconds
        wait = idle if idle > 0 else None
        if pace is not None and wait is not None:  # read at once: its length allowed for, not a piece's
            wait = pace.left(idle) if pace.whole else min(wait, pace.left(idle))
        try:
            piece = await asyncio.wait_for(reading, wait)
        except asyncio.TimeoutError:
            if pace is not None and wait is not None and (pace.whole or wait < idle):
                raise HttpError(408, f"{what} came too slowly: below {MIN_BODY_RATE:,} bytes a second on average "
                                     f"over {time.monotonic() - pace.started:.0f} s (past --http-body-idle-seconds)"
                                     ) from None
            raise HttpError(408, f"{what} stalled: nothing came for {idle:g} s (--http-body-idle-seconds)") from None
        if pace is not None and isinstance(piece, (bytes, bytearray)):
            pace.received += len(piece)
        return piece

    @staticmethod
    def _raise_failure(outcome: Outcome) -> None:
        """What stopped a body being read, with what was stored before it."""
        error = outcome.failure
        if error is None:
            return
        stored = f" ({outcome.stored:,} rows before it were stored)" if outcome.stored else ""
        if isinstance(error, HttpError):
            raise HttpError(error.status, f"{error}{stored}")
        if isinstance(error, (files.FileProblem, pa.ArrowException, OSError)):
            raise InvalidArgument("body", f"{error}{stored}")
        if stored and isinstance(error, AbstreamError):  # a refusal (a rate, draining) after some rows went in
            error.args = (f"{error}{stored}",)
        raise error

    @staticmethod
    def _datasource(name: str) -> None:
        if not name:
            raise InvalidArgument("name", f"is required: the data source ({DATASOURCE})")
        if name != DATASOURCE:
            raise NotFound(f"Data Source '{name[:64]}' not found: this server has {DATASOURCE} (its quarantine is "
                           f"{QUARANTINE}, read as a pipe)")

    # ---- Data Sources API -------------------------------------------------------------------

    async def _description(self, principal: Principal, name: str) -> dict:
        stamp = "%Y-%m-%d %H:%M:%S.%f"
        if name == QUARANTINE:
            _events, rows = await self.core.quarantine(principal, "", 1)
        else:
            rows = sum(t.events for t in await self.core.list_tests(principal))
        return {"id": f"t_{name}", "name": name, "type": "ndjson",
                "created_at": self.started.strftime(stamp),
                "updated_at": dt.datetime.now(dt.timezone.utc).strftime(stamp),
                "statistics": {"row_count": rows, "bytes": None}, "used_by": [], "quarantine_rows": 0}

    async def datasources(self, request: web.Request) -> web.Response:
        principal = request[PRINCIPAL_KEY]
        return web.json_response({"datasources": [await self._description(principal, n)
                                                  for n in (DATASOURCE, QUARANTINE)]})

    async def datasource(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in (DATASOURCE, QUARANTINE):
            self._datasource(name)
        return web.json_response(await self._description(request[PRINCIPAL_KEY], name))

    async def append(self, request: web.Request) -> web.Response:
        """A file, multipart (part `csv` or `ndjson`, whatever its format) or as the raw body,
        gzipped or not, streamed into the data source; the format is the `format` parameter."""
        q = request.query
        self._datasource(q.get("name", ""))
        if q.get("mode", "append") != "append":
            raise InvalidArgument("mode", f"only append is supported here, not {q.get('mode', '')[:32]!r}: the data "
                                          f"source {DATASOURCE} has a fixed schema")
        if q.get("url"):
            raise InvalidArgument("url", "imports from a URL are not supported: upload the file itself")
        fmt = pipes.Params(q).get("format", "csv").lower()
        if fmt not in ("csv", "ndjson", "parquet"):
            raise InvalidArgument("format", f"must be csv, ndjson or parquet, not {fmt[:32]!r}")
        limit = self.settings.http_max_upload_bytes
        read = request.content.readany
        name = "the upload"
        if request.content_type.startswith("multipart/"):
            try:
                parts = await request.multipart()
                part = await self._within(parts.next(), name)
                while part is not None and (not isinstance(part, BodyPartReader)
                                            or part.name not in ("csv", "ndjson", "file", "parquet")):
                    part = await self._within(parts.next(), name)  # (a form nested in the form: skipped)
            except _UNREADABLE_FORM as error:
                raise InvalidArgument("body", f"is not a multipart form the server can read ({error})"[:300]) from None
            if part is None:
                raise InvalidArgument("body", "no file part: send the file as the form field csv or ndjson")
            read, name = _part_reader(part), part.filename or part.name
        elif request.content_type == "application/x-www-form-urlencoded" and request.content_length is not None \
                and request.content_length < 1 << 16:  # a chunked body may be of any size: streamed
            small = await self._within(request.read(), name,  # a form (url=...), or a small file (curl --data-binary)
                                       _Pace(request.content_length))
            if small.startswith(b"url="):
                raise InvalidArgument("url", "imports from a URL are not supported: upload the file itself")
            read = _pieces(small)
        stream = self._body(request, read, limit, name)
        warnings: list[str] = []
        outcome = await self._read(request[PRINCIPAL_KEY],
                                   lambda: reader_for(fmt, stream, name, warnings, self._batch_lines),
                                   self._idempotency(request))
        outcome.warnings = warnings
        self._raise_failure(outcome)
        said = [f"{outcome.quarantined:,} rows in quarantine"] if outcome.quarantined else []
        said += [f"{outcome.refused:,} rows refused (tests this token may not write)"] if outcome.refused else []
        error = f"There was an error with file contents: {' and '.join(said)}." if said else False
        answer = {"import_id": REQUEST_ID.get(), "datasource": {"id": f"t_{DATASOURCE}", "name": DATASOURCE},
                  "quarantine_rows": outcome.rejected_by_rules, "invalid_lines": outcome.unreadable, "error": error,
                  "successful_rows": outcome.stored, **outcome.details()}
        if said:
            answer["errors"] = [f"line {r['line']}: {r['field']}: {r['error']}"
                                for r in sorted(outcome.rejections + outcome.refusals, key=lambda r: r["line"])[:100]]
        debug = q.get("debug", "")
        if "blocks" in debug:
            answer["blocks"] = [{"block_id": "0", "process_return": [{"lines": outcome.stored, "parser": "abstream"}]}]
        if "block_log" in debug:
            answer["block_log"] = []
        return web.json_response(answer)

    # ---- pipes ------------------------------------------------------------------------------

    async def pipes(self, request: web.Request) -> web.Response:
        """The pipes as the platform lists its published endpoints (its CLI's `tb pipe ls`)."""
        stamp = self.started.strftime("%Y-%m-%d %H:%M:%S.%f")
        return web.json_response({"pipes": [
            {"id": f"t_{name}", "name": name, "description": pipes.DESCRIPTIONS[name], "type": "endpoint",
             "endpoint": f"t_{name}", "created_at": stamp, "updated_at": stamp, "nodes": [{"name": name}],
             "url": f"/v0/pipes/{name}.json"} for name in pipes.PIPES]})

    async def pipe(self, request: web.Request) -> web.Response:
        name, fmt = request.match_info["name"], request.match_info["fmt"].lower()
        formats.check(fmt)  # before the query, not after it
        values = request.query.copy()
        if request.method == "POST":  # the platform's CLI posts a form when the URL would be long
            values.extend(await _form(request))
        params = pipes.Params(values)
        if params.get("q"):
            raise InvalidArgument("q", "SQL over a pipe is not supported: the pipe's parameters are (docs/http.md)")
        scope, run = pipes.pipe(name)
        try:
            answer = await run(self.core, request[PRINCIPAL_KEY], params)
        except InvalidArgument as error:
            raise pipes.as_parameter(error) from None
        # In a thread: an answer may be millions of rows (a cumulative series), seconds to write.
        payload, content_type = await self.core.in_query_thread(formats.render, answer, fmt)
        return web.Response(body=payload, headers={"Content-Type": content_type})

    async def sql(self, request: web.Request) -> web.Response:
        raise InvalidArgument("q", "SQL is not supported: query the pipes (test_summary, test_segments, "
                                   "test_timeseries, test_results, test_lift; docs/http.md)")


#: How often a query's connection is looked at: a client gone is noticed within this.
GONE_POLL_SECONDS = 0.1
#: The status counted and logged for a request whose client went away before its answer
#: (nothing is sent), as proxies log it.
CLIENT_GONE = 499


async def _while_connected(request: web.Request, answer: Awaitable[web.StreamResponse]) -> web.StreamResponse:
    """`answer`, cancelled once the client's connection closes: nobody would read it, and the
    query's thread stops at its next check of its deadline (aiohttp cancels no handler itself)."""
    task = asyncio.ensure_future(answer)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=GONE_POLL_SECONDS)
            if done:
                return task.result()
            if _gone(request):
                task.cancel()
                return web.Response(status=CLIENT_GONE)
    finally:
        task.cancel()


def _gone(request: web.Request) -> bool:
    """Whether the request's client has closed its connection."""
    return request.transport is None or request.transport.is_closing()


def _host_of(request: web.Request) -> str | None:
    """The host a request's Host header names, or None when it names none (`x:y:z`)."""
    try:
        return request.url.host
    except ValueError:
        return None


def _loopback_name(host: str | None) -> bool:
    """Whether a request's host (its Host header, without the port) names this machine's loopback."""
    name = (host or "").lower().rstrip(".").strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
