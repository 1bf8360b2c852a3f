"""The server's assembly: the engine, the core, the gRPC shell around it, health, reflection,
options, signals. A second transport is started here beside gRPC, on the same core."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pyarrow as pa
from abstream.core import admission, threads
from abstream.core.admission import Limits
from abstream.core.auth import Tokens, load_tokens
from abstream.core.dataplane import Core
from abstream.core.errors import Unavailable
from abstream.core.engine import Engine
from abstream.core.metrics import Metrics
from abstream.core.settings import Settings
from abstream.service.interceptors import AuthInterceptor, ErrorInterceptor, RequestInterceptor
from abstream.service.servicer import AdminServicer, AnalyticsServicer
from abstream.sources.kafka import KafkaConfigError, KafkaSource, kafka_config
from abstream.sources.objects import Importer
from abstream.v1 import admin_pb2, admin_pb2_grpc, analytics_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger("abstream.server")

#: The largest answer the server sends (see max_send_message_length below).
MAX_RESPONSE_BYTES = 64 << 20
SERVICE_NAME = analytics_pb2.DESCRIPTOR.services_by_name["AnalyticsService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
#: The health service the Kafka connector reports on (the server's own stays SERVING without it).
KAFKA_HEALTH = "abstream.kafka"


class _Health(health.aio.HealthServicer):
    """grpc_health's servicer, with `List` answered (the package leaves it unimplemented, and
    health clients that list the services got INTERNAL)."""

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={  # the package's own table, the one Check reads
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()})


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def tune_allocator() -> None:
    """One allocator for Arrow and numpy, whose freed pages go back once ingest goes quiet.

    Sealing and merging replace large arrays all the time. Arrow's default pool and glibc's
    heaps both keep freed pages for reuse, which left resident memory at twice what the store
    holds; with the system pool, two arenas, fixed thresholds and a trim after a quiet second
    (`_every_second`), it settles close to it (see the benchmark's memory line). Not trimming
    while ingest runs is deliberate: pages handed back after each seal were faulted in again by
    the next one, which cost columnar ingest about a sixth of the server's CPU time.
    """
    pa.set_memory_pool(pa.system_memory_pool())
    if _LIBC is not None:
        _LIBC.mallopt(-8, 2)  # M_ARENA_MAX
        # Query temporaries (tens of MiB) come from the heaps and are reused, not mapped and
        # faulted in anew by every query. A heap keeps at most 8 MiB free at its top: a thread's
        # heap is at most 64 MiB, and with 64 MiB kept the heaps of threads whose temporaries
        # had come and gone never shrank (10M columnar events into a server: 36.7 bytes per event
        # at the last ack against 39.9, 38.7 with 16 MiB; in-process scans of the largest test
        # alike but the hourly Timeseries, 150-153 ms against 141-146).
        _LIBC.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        _LIBC.mallopt(-1, 8 << 20)  # M_TRIM_THRESHOLD


def release_free_memory() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def open_engine(settings: Settings, namespaces: tuple[str, ...] = ()) -> Engine:
    """The engine the settings ask for, open (the embedded one recovered from its data directory);
    `namespaces`, the test-id prefixes tokens are limited to, each keep a share of its quarantine."""
    s = settings
    if s.engine == "clickhouse":
        from abstream.clickhouse.backend import Cluster
        from abstream.clickhouse.engine import ClickHouseEngine

        backend = Cluster(s.clickhouse.split(","), s.clickhouse_cluster, s.clickhouse_database,
                          insert_quorum=s.clickhouse_insert_quorum, timeout=s.clickhouse_timeout_seconds,
                          user=s.clickhouse_user, password=s.clickhouse_password)
        return ClickHouseEngine.opened(backend)
    from abstream.store import Durability, EventStore

    durability = None if not s.data_dir else Durability(
        Path(s.data_dir), fsync=s.fsync, fsync_interval_ms=s.fsync_interval_ms,
        snapshot_compression=s.snapshot_compression, snapshots_kept=s.snapshots_kept,
        snapshot_every_events=s.snapshot_every_events, snapshot_log_ratio=s.snapshot_log_ratio,
        snapshot_every_seconds=s.snapshot_every_seconds)
    return EventStore(quarantine_limit=s.quarantine_limit, durability=durability, quarantine_namespaces=namespaces)


def add_analytics_service(servicer: AnalyticsServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that IngestEvents requests reach the servicer as bytes
    (converters.decode_request reads them into columns)."""
    handlers = {}
    for method in analytics_pb2.DESCRIPTOR.services_by_name["AnalyticsService"].methods:
        request = getattr(analytics_pb2, method.input_type.name)
        response = getattr(analytics_pb2, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.name == "IngestEvents":
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour, request_deserializer=None, response_serializer=response.SerializeToString)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=request.FromString, response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class BindError(RuntimeError):
    """The address could not be bound (in use, or not an address of this machine)."""


class ConfigError(RuntimeError):
    """The settings are unsafe or inconsistent; the message says what to change."""


def is_loopback(addr: str) -> bool:
    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # empty (every interface) or a name: not provably loopback


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path}: {error}") from error


class AnalyticsServer:
    """The grpc.aio server, its core and engine; `port` is the one actually bound."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        tokens = None
        if settings.tokens_file:
            try:
                tokens = load_tokens(settings.tokens_file)
            except ValueError as error:
                raise ConfigError(str(error)) from error
        elif not settings.insecure:
            for addr in (settings.addr, settings.http_addr):
                if addr and not is_loopback(addr):
                    raise ConfigError(f"refusing to listen on {addr} without tokens: anyone who reaches it could "
                                      "read and write every test. Give --tokens-file, listen on a loopback address, "
                                      "or pass --insecure to accept that")
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if settings.tls_client_ca and not settings.tls_cert:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        self.health = _Health()
        self.metrics = Metrics(None)
        self.port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._snapshots: asyncio.Task | None = None
        self._sweeping: asyncio.Task | None = None  # the retention sweep running, if one is
        limits = Limits(settings.max_batch_events, settings.max_ingest_streams,
                        admission.high_water(settings.memory_high_water_bytes), settings.max_ingest_bytes,
                        settings.max_query_seconds, settings.max_queries)
        self.core = Core(limits, Tokens(tokens), self.metrics)
        if settings.retention_days < 0:
            raise ConfigError("--retention-days must be 0 (keep for ever) or more")
        self.core.retention_days = settings.retention_days
        self._server = grpc.aio.server(
            interceptors=[RequestInterceptor(), ErrorInterceptor(), AuthInterceptor(self.core.tokens)],
            options=[
                # A second server on a taken port must fail to start, not silently share it.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                # Answers are ours and bounded by what was asked (an ack of 100,000 rejections is
                # ~8 MB, a minute-by-minute series of a quarter ~30 MB): not by what clients may send.
                ("grpc.max_send_message_length", max(settings.max_message_bytes, MAX_RESPONSE_BYTES)),
                # Clients' keepalive pings (ours: every 20 s while a call is open, clients/client.py)
                # are welcome during a long silent call (an import watching for objects); gRPC's
                # default, one per 5 minutes, answers them with GOAWAY.
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        add_analytics_service(AnalyticsServicer(self.core), self._server)
        self.importer = Importer(self.core, settings.import_root, settings.import_endpoints)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self.core, settings.data_dir, self.importer),
                                                          self._server)
        self.http = None
        if settings.http_addr:
            from abstream.rest.app import HttpApi

            self.http = HttpApi(self.core, settings, self.metrics)
        self.kafka = None
        try:
            kafka = kafka_config(settings.kafka_bootstrap, settings.kafka_topic, settings.kafka_group,
                                 settings.kafka_session_timeout_ms, settings.kafka_config)
        except KafkaConfigError as error:
            raise ConfigError(str(error)) from None
        if kafka is not None:
            self.kafka = KafkaSource(self.core, kafka, self.metrics, self._source_state(KAFKA_HEALTH))
            self.core.sources["kafka"] = self.kafka
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if settings.reflection:
            reflection.enable_server_reflection(
                [SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self._server)

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not s.tls_cert:
            return None
        pair = (_read(s.tls_key, "TLS key"), _read(s.tls_cert, "TLS certificate"))
        client_ca = _read(s.tls_client_ca, "client CA") if s.tls_client_ca else None
        return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    @property
    def engine(self) -> Engine:
        return self.core.engine

    async def start(self) -> int:
        """Listens (health says NOT_SERVING), recovers the store, then says SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = self._credentials()
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(self.settings.addr)
            else:
                self.port = self._server.add_secure_port(self.settings.addr, credentials)
        except RuntimeError as error:
            raise BindError(f"cannot listen on {self.settings.addr}: {error}") from error
        if self.port == 0:
            raise BindError(f"cannot listen on {self.settings.addr}: address in use or unavailable")
        await self._server.start()
        if self.http is not None:
            try:
                self.http_port = await self.http.start()
            except OSError as error:
                await self._server.stop(0)
                raise BindError(str(error)) from error
        log.info("port %d bound; recovering %s", self.port, self.settings.data_dir or "nothing (memory only)")
        try:
            self.core.engine = await asyncio.to_thread(open_engine, self.settings, self.core.tokens.prefixes)
        except BaseException:
            await self._server.stop(0)
            if self.http is not None:
                await self.http.stop()
            raise
        self.metrics.watch(self.core.engine)
        if self.settings.metrics_addr:
            self.metrics_port = self.metrics.serve(self.settings.metrics_addr)
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics_addr.rpartition(":")[0] or "127.0.0.1",
                     self.metrics_port)
        self._snapshots = asyncio.create_task(self._every_second())
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.kafka is not None:
            self._loop = asyncio.get_running_loop()
            await self.health.set(KAFKA_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
            self.kafka.start(self._loop)
        s = self.settings
        log.info("serving %s on port %d (%s, %s, %s, %s engine)", SERVICE_NAME, self.port,
                 s.addr.rpartition(":")[0] or "every interface", "TLS" if s.tls_cert else "plaintext",
                 "tokens required" if s.tokens_file else "no authentication", s.engine)
        if self.http is not None:
            log.info("serving HTTP on port %d (%s, %s; the tutorial's API: docs/http.md)", self.http_port,
                     s.http_addr.rpartition(":")[0] or "every interface", "TLS" if s.tls_cert else "plaintext")
        for addr in (s.addr, s.http_addr):
            if addr and s.insecure and not s.tokens_file and not is_loopback(addr):
                log.warning("--insecure: serving %s without tokens: anyone who reaches it can read and write every "
                            "test", addr)
        return self.port

    async def _sweep(self) -> None:
        try:
            await self.core.sweep()
        except Exception:  # noqa: BLE001 - logged; the next sweep tries again
            log.exception("the retention sweep failed")

    async def _every_second(self) -> None:
        """Every second: a snapshot when one is due, and freed memory handed back to the system
        once ingest has gone quiet (while it runs, the heaps' free pages are about to be reused).
        Health says NOT_SERVING while the engine cannot store: for good once its log failed, until
        its shards answer again for the cluster's."""
        seen, trimmed = None, True
        swept = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            engine = self.core.engine
            try:
                await asyncio.to_thread(engine.maintain)
                if self.core.stopped is not None:  # the cluster's shard is back (a failed log never is)
                    log.info("health: SERVING again (it was NOT_SERVING: %s)", self.core.stopped)
                    self.core.stopped = None
                    if not self.core.draining:
                        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            except Unavailable as error:  # the engine cannot store now (its log failed, a shard is down)
                if self.core.stopped is None:
                    log.warning("health: NOT_SERVING: %s", error)
                    await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                self.core.stopped = error  # the latest reason (another shard, say)
                continue
            except Exception:  # noqa: BLE001 - logged; the next tick tries again
                log.exception("periodic maintenance failed")
            if time.monotonic() - swept >= self.settings.retention_sweep_seconds and (
                    self._sweeping is None or self._sweeping.done()):
                # A task of its own: a sweep waits as long as a removal does (a ClickHouse
                # replica that is down: minutes), and health and snapshots go on meanwhile.
                swept = time.monotonic()
                self._sweeping = asyncio.create_task(self._sweep())
            count = self.core.events_acked
            if count != seen:
                trimmed = False
            elif not trimmed:  # a second without ingest
                await asyncio.to_thread(release_free_memory)
                trimmed = True
            seen = count

    async def stop(self, grace: float | None = None) -> None:
        """Lets open ingest streams finish within the grace period, then writes a final snapshot
        and closes the log.

        Until the streams are done the server keeps answering, so that health checks see
        NOT_SERVING and queries still work; only new ingest streams are refused. Then gRPC
        refuses every new call and gets what remains of the grace period for calls in flight.
        """
        if self.kafka is not None:  # its batch in hand stored and committed while ingest still takes it
            await asyncio.to_thread(self.kafka.stop)
        self.core.draining = True
        await self.health.enter_graceful_shutdown()
        if self._snapshots is not None:
            self._snapshots.cancel()
        if self._sweeping is not None:  # its removal, in a thread, ends with the engine's close
            self._sweeping.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.settings.grace_seconds if grace is None else grace)
        while self.core.streams and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self._server.stop(max(deadline - loop.time(), 0.0))
        if self.http is not None:
            await self.http.stop()
        self.importer.close()
        self.core.close()
        if self.core.engine_open:
            await asyncio.to_thread(self.core.engine.close)
        self.metrics.close()
        log.info("stopped")

    def _source_state(self, name: str):
        """A source's changes of state, from its thread, to its health service `name`."""
        def changed(serving: bool, state: str) -> None:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            asyncio.run_coroutine_threadsafe(self.health.set(name, status), self._loop)

        return changed

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME, ADMIN_SERVICE_NAME):
            await self.health.set(name, status)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's C-core lines would break the JSON log
    tune_allocator()
    # pyarrow imports pandas, when installed, on its first conversion to numpy: 0.2 s and ~29 MiB
    # paid at start rather than by the first batch (and not counted in memory per event).
    pa.array([0]).to_numpy()
    # Ingest converts row batches in Python; handing the GIL over every millisecond instead of
    # every 5 keeps a query waiting behind it from paying the full interval at each switch.
    sys.setswitchinterval(0.001)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Commits (the log's writes and fsyncs) and queries run here: named, as the other pools are.
    loop.set_default_executor(threads.pool("abstream-work", min(32, (os.cpu_count() or 1) + 4)))
    for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a signal right after it must not kill us
        loop.add_signal_handler(sig, stopping.set)
    server = AnalyticsServer(settings)
    starting = asyncio.create_task(server.start())
    await asyncio.wait([starting, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal during recovery: let it finish, then stop as usual
        log.info("signal received while recovering; stopping once recovered")
    await starting
    await stopping.wait()
    log.info("signal received; stopping within %.1fs", settings.grace_seconds)
    await server.stop()
