"""`make run` serves where the README says: ADDR=/DATA= first, then ABSTREAM_* variables, then defaults."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_with(args: list[str], env: dict[str, str], log: Path) -> tuple[int, str]:
    """Runs `make run ...` until it serves; returns (the port it serves on, what it logged)."""
    with open(log, "w") as out:
        process = subprocess.Popen(["make", "-s", "run", *args], cwd=ROOT, env={**os.environ, **env}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if match := re.search(r"serving \S+ on port (\d+)", log.read_text()):
                port = int(match.group(1))
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
                return port, log.read_text()
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        raise AssertionError("make run did not serve in time:\n" + log.read_text())
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_make_run_honours_abstream_variables(tmp_path):
    port = free_port()
    served, log = serve_with([], {"ABSTREAM_ADDR": f"127.0.0.1:{port}", "ABSTREAM_DATA_DIR": str(tmp_path / "env")},
                             tmp_path / "env.log")
    assert served == port and str(tmp_path / "env") in log
    assert (tmp_path / "env" / "wal").is_dir()


def test_make_run_addr_and_data_win_over_the_variables(tmp_path):
    port = free_port()
    served, log = serve_with([f"ADDR=127.0.0.1:{port}", f"DATA={tmp_path / 'flag'}"],
                             {"ABSTREAM_ADDR": "127.0.0.1:1", "ABSTREAM_DATA_DIR": str(tmp_path / "env")},
                             tmp_path / "flag.log")
    assert served == port and (tmp_path / "flag" / "wal").is_dir() and not (tmp_path / "env").exists()
