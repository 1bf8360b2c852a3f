"""The server as operators run it: health, reflection, port handling, signals, generated code."""

from __future__ import annotations

import filecmp
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_health_reports_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "abstream.v1.AnalyticsService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
    assert {name: s.status for name, s in listed.items()} == {
        name: health_pb2.HealthCheckResponse.SERVING for name in ("", "abstream.v1.AnalyticsService",
                                                                   "abstream.v1.AdminService")}


def grpcurl(*args: str) -> str:
    result = subprocess.run([str(BIN / "grpcurl"), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_reflection_lets_grpcurl_list_and_describe(server):
    listed = grpcurl("-plaintext", server.address, "list").split()
    assert {"abstream.v1.AnalyticsService", "grpc.health.v1.Health"} <= set(listed)
    described = grpcurl("-plaintext", server.address, "describe", "abstream.v1.AnalyticsService")
    assert "rpc IngestEvents ( stream .abstream.v1.IngestEventsRequest )" in described
    summary = grpcurl("-plaintext", "-d", '{"test_id": "none"}', server.address, "abstream.v1.AnalyticsService/Summary")
    assert '"test_id": "none"' in summary


def start_cli(*args: str) -> tuple[subprocess.Popen, int]:
    """`abstream serve` as a real process; returns it and the port it logged."""
    process = subprocess.Popen([str(BIN / "abstream"), "serve", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if match := re.search(r"on port (\d+)", line):
            return process, int(match.group(1))
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("server did not report its port")


def test_cli_serves_and_stops_gracefully_on_sigterm_and_sigint(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        process, port = start_cli("--addr", "127.0.0.1:0", "--data-dir", str(tmp_path))
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            process.send_signal(sig)
            assert process.wait(timeout=30) == 0
            assert "stopped" in process.stderr.read()
        finally:
            process.kill()


def test_second_server_on_the_same_port_fails_clearly(server, tmp_path):
    result = subprocess.run([str(BIN / "abstream"), "serve", "--addr", server.address, "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on {server.address}" in result.stderr


def test_settings_come_from_environment(tmp_path):
    env = {**os.environ, "ABSTREAM_ADDR": "127.0.0.1:0", "ABSTREAM_DATA_DIR": str(tmp_path / "envdata")}
    process = subprocess.Popen([str(BIN / "abstream"), "serve"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stderr.readline()
        deadline = time.monotonic() + 30
        while "on port" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stderr.readline()
        assert "on port" in line
        assert (tmp_path / "envdata").is_dir()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()


def test_generated_code_is_fresh(tmp_path):
    """Regenerates the contract's Python code and compares it with what is committed."""
    from grpc_tools import protoc

    protos = ["abstream/v1/analytics.proto", "abstream/v1/admin.proto"]
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={tmp_path}",
                        f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        *(str(ROOT / "protos" / proto) for proto in protos)])
    assert code == 0
    for name in [f"{stem}{suffix}" for stem in ("analytics", "admin")
                 for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]:
        fresh, committed = tmp_path / "abstream/v1" / name, ROOT / "protos/abstream/v1" / name
        assert filecmp.cmp(fresh, committed, shallow=False), f"{committed} is stale: run `make proto`"


def test_wheel_installs_everything_under_one_package(tmp_path):
    """No bare `store`, `service` or `clients` in site-packages: everything sits under abstream/."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("abstream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"abstream", next(t for t in tops if t.endswith(".dist-info"))}
    for module in ("abstream/store/engine.py", "abstream/core/dataplane.py", "abstream/service/server.py", "abstream/clients/cli.py",
                   "abstream/v1/analytics_pb2.py", "abstream/v1/analytics.proto"):
        assert module in names


def test_queries_holding_every_query_thread_leave_ingest_acked(tmp_path):
    """Queries run in threads of their own: twice as many slow ones as there are query threads
    (here each held until released) held every ingest ack behind them, each ack waiting in the
    same shared pool for its fsync; and while they run, they count as running queries."""
    import threading

    from abstream.core.dataplane import QUERY_WORKERS
    from abstream.core.settings import Settings
    from abstream.v1 import analytics_pb2 as pb
    from abstream.v1 import analytics_pb2_grpc

    from tests.conftest import ServerThread
    from tests.events import ingest, random_events

    running = ServerThread(Settings(addr="127.0.0.1:0", data_dir=str(tmp_path / "data"))).start()
    core = running.server.core
    engine, release, begun = core.engine, threading.Event(), []
    answer = engine.summary

    def held(q):
        begun.append(q)
        release.wait(120)
        return answer(q)

    def until(check) -> None:
        deadline = time.monotonic() + 30
        while not check() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check()

    engine.summary = held
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)

            def summaries():
                return [stub.Summary.future(pb.SummaryRequest(test_id="checkout"), timeout=120)
                        for _ in range(QUERY_WORKERS)]

            running_calls = summaries()
            until(lambda: len(begun) == QUERY_WORKERS)  # every query thread taken
            queued_calls = summaries()
            until(lambda: core._queries == 2 * QUERY_WORKERS)
            sent = random_events(500, seed=3)
            acks = ingest(stub, sent, size=100)
            assert sum(a.accepted for a in acks) == len(sent)
            # Callers gone: a query that runs counts until its thread ends, a queued one no more.
            for call in (*running_calls[:2], queued_calls[0]):
                call.cancel()
            until(lambda: core._queries == 2 * QUERY_WORKERS - 1)
            release.set()
            for call in (*running_calls[2:], *queued_calls[1:]):
                assert call.result().test_id == "checkout"
            deadline = time.monotonic() + 30
            while core._queries and time.monotonic() < deadline:
                time.sleep(0.05)
            assert core._queries == 0
    finally:
        release.set()
        running.stop()


def test_queries_past_max_queries_are_refused_with_a_retry_delay_over_grpc_and_http(tmp_path):
    """At most --max-queries run or wait at once, over every transport: the next is
    RESOURCE_EXHAUSTED with RetryInfo (HTTP: 429 with Retry-After), not queued without bound;
    once one ends, a query is taken again."""
    import threading
    import urllib.error
    import urllib.request

    from abstream.core.settings import Settings
    from abstream.v1 import analytics_pb2 as pb
    from abstream.v1 import analytics_pb2_grpc

    from tests.conftest import ServerThread
    from tests.test_security import retry_info

    running = ServerThread(Settings(addr="127.0.0.1:0", http_addr="127.0.0.1:0", tokens_file="",
                                    data_dir=str(tmp_path / "data"), max_queries=2)).start()
    engine, release, begun = running.server.core.engine, threading.Event(), []
    answer = engine.summary

    def held(q):
        begun.append(q)
        release.wait(60)
        return answer(q)

    engine.summary = held
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
            calls = [stub.Summary.future(pb.SummaryRequest(test_id="checkout"), timeout=60) for _ in range(2)]
            deadline = time.monotonic() + 30
            while len(begun) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Summary(pb.SummaryRequest(test_id="checkout"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 queries are running or waiting for a thread" in refused.value.details()
            assert "--max-queries" in refused.value.details()
            assert retry_info(refused.value).retry_delay.seconds == 1
            url = f"http://127.0.0.1:{running.server.http_port}/v0/pipes/test_summary.json?test_id=checkout"
            with pytest.raises(urllib.error.HTTPError) as http_refused:
                urllib.request.urlopen(url, timeout=10)
            assert http_refused.value.code == 429 and http_refused.value.headers["Retry-After"] == "1"
            release.set()
            assert all(call.result().test_id == "checkout" for call in calls)
            assert stub.Summary(pb.SummaryRequest(test_id="checkout"), timeout=10).test_id == "checkout"
    finally:
        release.set()
        running.stop()
