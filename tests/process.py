"""The server as a real process, for tests that kill, restart and corrupt it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from abstream.v1 import admin_pb2_grpc, analytics_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent


STARTED: list[Server] = []  # every server a test started; the conftest kills what is left after each test


class Server:
    """`abstream serve` on an ephemeral port with its own data directory; its log goes to a file."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = Path(data_dir)
        self.args = args
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.http_address = ""

    def start(self, timeout: float = 60) -> Server:
        log = open(self.log_path, "a")
        offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [str(BIN / "abstream"), "serve", "--addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--data-dir",
             str(self.data_dir), *self.args], stderr=log, stdout=log)
        STARTED.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text()[offset:]
            if match := re.search(r"serving HTTP on port (\d+)", text):
                grpc_port = re.search(r"serving abstream\S+ on port (\d+)", text).group(1)
                self.address, self.http_address = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{match.group(1)}"
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{text}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("server did not start in time")

    def start_expecting_failure(self, timeout: float = 60) -> tuple[int, str]:
        """Runs the server expecting it to refuse to start: (exit code, what it logged)."""
        result = subprocess.run(
            [str(BIN / "abstream"), "serve", "--addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--data-dir",
             str(self.data_dir), *self.args], capture_output=True, text=True, timeout=timeout)
        return result.returncode, result.stderr

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stub(self, channel: grpc.Channel) -> analytics_pb2_grpc.AnalyticsServiceStub:
        return analytics_pb2_grpc.AnalyticsServiceStub(channel)

    def admin(self, channel: grpc.Channel) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(channel)

    def health(self, channel: grpc.Channel) -> int:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def wait_for(check, timeout: float = 90, what: str = "") -> None:
    """Returns once `check()` is true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what or check}")
