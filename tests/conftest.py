"""Fixtures: a real server on an ephemeral loopback port, driven through generated stubs."""

from __future__ import annotations

import asyncio
import threading
from typing import Iterator

import grpc
import pytest
from abstream.core.settings import Settings
from abstream.service.server import AnalyticsServer
from abstream.v1 import analytics_pb2_grpc


class ServerThread:
    """The real grpc.aio server, on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="abstream-server", daemon=True)
        self.server: AnalyticsServer | None = None

    def start(self) -> ServerThread:
        self.thread.start()
        self.server = self._run(self._start())
        return self

    async def _start(self) -> AnalyticsServer:
        server = AnalyticsServer(self.settings)
        await server.start()
        return server

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        if self.server is not None:
            self._run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@pytest.fixture
def server(tmp_path) -> Iterator[ServerThread]:
    running = ServerThread(Settings(addr="127.0.0.1:0", data_dir=str(tmp_path / "data"))).start()
    yield running
    running.stop()


def engine_settings(kind: str, tmp_path, request, **overrides) -> Settings:
    """A server's settings for an engine: embedded in `tmp_path`, or the cluster engine on the
    session's cluster, in a database of its own."""
    if kind == "embedded":
        return Settings(addr="127.0.0.1:0", data_dir=str(tmp_path / "data"), **overrides)
    from tests import engines

    cluster = request.getfixturevalue("clickhouse_cluster")
    engine = engines.make("clickhouse", request)
    engine.close()
    return Settings(addr="127.0.0.1:0", data_dir="", engine="clickhouse", clickhouse=cluster.hosts(),
                    clickhouse_cluster=cluster.cluster_name, clickhouse_database=engine.database, **overrides)


@pytest.fixture(params=["embedded", "clickhouse"])
def any_engine_server(request, tmp_path) -> Iterator[ServerThread]:
    """The real server on each engine: modules whose tests must hold on both use it as `server`."""
    running = ServerThread(engine_settings(request.param, tmp_path, request)).start()
    yield running
    running.stop()


@pytest.fixture
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel) -> analytics_pb2_grpc.AnalyticsServiceStub:
    return analytics_pb2_grpc.AnalyticsServiceStub(channel)


@pytest.fixture(autouse=True)
def no_server_outlives_its_test():
    """Servers started as processes are killed when their test ends, passed or failed."""
    from tests import process

    yield
    while process.STARTED:
        process.STARTED.pop().kill()


@pytest.fixture(scope="session")
def clickhouse_cluster(tmp_path_factory):
    """A real ClickHouse cluster (2 shards x 2 replicas, ZooKeeper) for the whole session; every
    test that uses it makes a database of its own. `make test` installs the Debian packages."""
    from abstream.clickhouse.cluster import Cluster

    cluster = Cluster().start(tmp_path_factory.mktemp("clickhouse"))
    yield cluster
    cluster.stop()
