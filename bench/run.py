"""`make bench`: abstream's ingest, queries, memory and freshness, side by side with DuckDB and
ClickHouse (chDB).

The server runs as its own process; this process is the client. Each query is first answered by
abstream (over gRPC and in-process), by DuckDB and by chDB, the answers are compared, and only
then timed.
Prints a table and writes a JSON report to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import duckdb
import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from abstream.clients import arrow_ipc
from abstream.store import EventStore
from abstream.store.engine import ROLLUP_EVENTS
from abstream.v1 import analytics_pb2 as pb
from abstream.v1 import analytics_pb2_grpc

from bench import connectors, dataset, hostile, lifecycle, queries

INGEST_METHOD = "/abstream.v1.AnalyticsService/IngestEvents"
RESULTS = Path(__file__).parent / "results"
COLUMNAR_BATCH = 100_000
COLUMNAR_RUNS = 3
SETTLE_SECONDS = 2.5  # after loading, before resident memory is read
PLAIN_EVENTS = 1_000_000  # the second columnar run, plain strings, into tests of their own
ROW_BATCH = 1_000
#: Rounds of row batches sent to abstream and to the null server in turns. Five: one round's share
#: of the null server ranged from 40% to 59% within one run, and the median of three moved with it.
CEILING_ROUNDS = 5
GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


# ---- the server process ------------------------------------------------------------------

class ServerProcess:
    """The real server, started with the defaults a deployment gets (fsync always)."""

    def __init__(self, data_dir: str, *args: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "abstream.clients.cli", "serve", "--addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0",
             "--data-dir", data_dir,
             "--max-message-bytes", str(256 << 20), "--snapshot-every-events", "0", "--snapshot-every-seconds", "0",
             "--metrics-addr", "127.0.0.1:0", *args], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            self.lines.append(line)
            if match := re.search(r"metrics on (http://\S+/metrics)", line):
                self.metrics_url = match.group(1)
            elif match := re.search(r"serving abstream\S+ on port (\d+)", line):
                self.address = f"127.0.0.1:{match.group(1)}"
            elif match := re.search(r"serving HTTP on port (\d+)", line):
                self.http_address = f"127.0.0.1:{match.group(1)}"
                threading.Thread(target=self._drain, daemon=True).start()
                return
            if not line and self.process.poll() is not None:
                break
        raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def metric(self, name: str) -> float:
        """A sample of the server's Prometheus metrics (0 when absent)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=30).read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name)

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def recovery_seconds(self) -> float | None:
        for line in self.lines:
            if match := re.search(r"recovered .* in ([0-9.]+)s", line):
                return float(match.group(1))
        return None

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


# ---- ingest ------------------------------------------------------------------------------

def ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.py_buffer(sink.getvalue()).to_pybytes()


class ColumnarRequests:
    """Serialized columnar batches: built up front for up to 20M events, else while streaming
    (100M events of requests would not fit in memory beside the server and the data).

    `compact`: as `abstream.clients.arrow_ipc` sends them (dictionary-encoded low-cardinality
    strings, LZ4); else plain string columns, as any Arrow writer produces them."""

    def __init__(self, table: pa.Table, compact: bool = True) -> None:
        self.table = table
        self.encode = arrow_ipc if compact else ipc_bytes
        self.starts = list(range(0, table.num_rows, COLUMNAR_BATCH))
        self.built = [self._build(i) for i in self.starts] if table.num_rows <= 20_000_000 else None

    def _build(self, start: int) -> bytes:
        return pb.IngestEventsRequest(arrow_ipc=self.encode(self.table.slice(start, COLUMNAR_BATCH))).SerializeToString()

    def __iter__(self):
        return iter(self.built) if self.built is not None else (self._build(i) for i in self.starts)

    def __len__(self) -> int:
        return len(self.starts)


def row_requests(table: pa.Table, prefix: str) -> list[bytes]:
    """Serialized row batches, built before any clock starts; test ids get `prefix` to keep them apart."""
    out = []
    for i in range(0, table.num_rows, ROW_BATCH):
        rows = table.slice(i, ROW_BATCH).to_pylist()
        events = []
        for r in rows:
            e = pb.Event(user_id=r["user_id"], test_id=prefix + r["test_id"], variant=r["variant"],
                         event_type=r["event_type"], conversion=r["conversion"], revenue=r["revenue"],
                         session_id=r["session_id"], device=r["device"], country=r["country"])
            e.timestamp.FromDatetime(r["timestamp"])
            events.append(e)
        out.append(pb.IngestEventsRequest(events=events).SerializeToString())
    return out


def stream(address: str, requests: list[bytes]) -> tuple[int, int]:
    """Sends pre-serialized batches on one stream; returns (accepted, rejected) from the acks."""
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        call = channel.stream_stream(INGEST_METHOD, request_serializer=None,
                                     response_deserializer=pb.IngestEventsResponse.FromString)
        accepted = rejected = 0
        for ack in call(iter(requests), timeout=3600):
            accepted += ack.accepted
            rejected += ack.rejected
    return accepted, rejected


def timed_ingest(address: str, requests, streams: int) -> dict:
    parts = [requests] if streams == 1 else [requests[i::streams] for i in range(streams)]
    results: list[tuple[int, int]] = []
    threads = [threading.Thread(target=lambda p=p: results.append(stream(address, p))) for p in parts]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    accepted = sum(a for a, _ in results)
    return {"streams": streams, "events": accepted, "rejected": sum(r for _, r in results),
            "seconds": seconds, "events_per_s": accepted / seconds}


def row_sends(table: pa.Table, row_events: int, count: int, prefix: str) -> list[list[bytes]]:
    """Row batches for `count` sends, each of the dataset's next `row_events` events (in time
    order, as a live stream sends them; the sets repeat when the dataset is shorter). The same
    events sent again would overlap the parts sealed from them the time before, and merging
    overlapping parts sorts and repacks them: in a script, a fresh server's sealer took ~0.57 s
    per 1M events from the second send on against ~0.24 with new events, and the sends ran at
    0.65-0.69M events/s against 1.10-1.20M."""
    slices = max(table.num_rows // row_events, 1)
    built: dict[int, list[bytes]] = {}
    for k in range(count):
        if k % slices not in built:
            built[k % slices] = row_requests(table.slice((k % slices) * row_events, row_events), prefix)
    return [built[k % slices] for k in range(count)]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds the threads of process `pid` have run, summed by the name the operating
    system knows each by (the server names its pools: core/threads.py); its main thread, which
    runs the event loop, as "event loop", and threads that kept the process's name (gRPC's
    poller) as "unnamed"."""
    with open(f"/proc/{pid}/comm") as f:
        process = f.read().strip()
    seconds: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = "event loop" if int(tid) == pid else f.read().strip()
            name = "unnamed" if name == process else name
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
        seconds[name] = seconds.get(name, 0.0) + ns / 1e9
    return seconds


def cpu_per_event(pid: int, run) -> tuple[dict, dict[str, float]]:
    """`run()`'s result and the CPU it cost per event stored, in microseconds: each thread name
    of process `pid`, "server" for all of them, and "client" for this process (the sender)."""
    before, client = thread_cpu(pid), time.process_time()
    result = run()
    after, client = thread_cpu(pid), time.process_time() - client
    per = 1e6 / max(result["events"], 1)
    cpu = {name: (after[name] - before.get(name, 0.0)) * per for name in after}
    return result, {**cpu, "server": sum(cpu.values()), "client": client * per}


def rows_against_ceiling(address: str, sends: list[list[bytes]], rounds: int = 3, pid: int | None = None) -> dict:
    """Row batches into abstream and into a server that only receives them (bench/null_server.py:
    what the transport carries on this machine), in turns: each round sends a set of them to
    abstream and then the same set to the null server, on one stream, and another set on four
    (`sends`: 2 per round, from `row_sends`). This machine's speed drifts (the null server's own
    runs ranged from 1.9M to 5.0M events/s within one run), so each round's share is taken of
    that round's ceiling.

    With `pid` (abstream's), where the CPU went on one stream is measured too: per event, each
    of abstream's threads, the null server's, and the sender's own against each (`cpu`: the
    median of the rounds, per name)."""
    process = subprocess.Popen([sys.executable, "-m", "bench.null_server", "--accepted", str(ROW_BATCH)],
                               stdout=subprocess.PIPE, text=True)
    runs: dict[str, list[dict]] = {"rows_1": [], "null_1": [], "rows_4": [], "null_4": []}
    cpu: dict[str, list[dict[str, float]]] = {"abstream": [], "null": []}
    busy: dict[str, list[float]] = {"abstream": [], "null": []}  # cores the server and its sender kept busy
    try:
        null = f"127.0.0.1:{process.stdout.readline().split()[1]}"
        for r in range(rounds):
            for streams, requests in zip((1, 4), sends[2 * r: 2 * r + 2]):
                for key, side, target, server_pid in (("rows", "abstream", address, pid),
                                                      ("null", "null", null, process.pid)):
                    if streams == 1 and pid is not None:
                        result, used = cpu_per_event(server_pid, lambda: timed_ingest(target, requests, streams))
                        cpu[side].append(used)
                        busy[side].append((used["server"] + used["client"]) * result["events_per_s"] / 1e6)
                    else:
                        result = timed_ingest(target, requests, streams)
                    runs[f"{key}_{streams}"].append(result)
    finally:
        process.kill()
        process.wait(10)
    rate = {k: [r["events_per_s"] for r in v] for k, v in runs.items()}
    return {"rows_1": median_run(runs["rows_1"]), "rows_4": median_run(runs["rows_4"]),
            "events": sum(r["events"] for k in ("rows_1", "rows_4") for r in runs[k]),  # sent to abstream
            "ceiling": {"one": median_run(runs["null_1"]), "four": median_run(runs["null_4"]),
                        "shares": [a / b for a, b in zip(rate["rows_1"], rate["null_1"])],
                        "four_over_one": [a / b for a, b in zip(rate["rows_4"], rate["rows_1"])]},
            "cpu_us_per_event": {side: _median_by_name(used) for side, used in cpu.items() if used},
            "cores_busy_one_stream": {side: float(np.median(b)) for side, b in busy.items() if b}}


def log_bytes(data_dir: str) -> int:
    """The bytes of the server's write-ahead log segments."""
    return sum(p.stat().st_size for p in Path(data_dir, "wal").glob("wal-*.log"))


def _median_by_name(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per name, the median of the runs (a name absent from a run counts 0 in it): the threads
    that used a hundredth of a microsecond or more, largest first, then "server" and "client"."""
    names = {name for run in runs for name in run}
    medians = {name: float(np.median([run.get(name, 0.0) for run in runs])) for name in names}
    threads = sorted(((k, v) for k, v in medians.items() if k not in ("server", "client") and v >= 0.005),
                     key=lambda kv: -kv[1])
    return {**dict(threads), "server": medians["server"], "client": medians["client"]}


def fresh_ingest(requests, restart: bool = False) -> dict:
    """One timed single-stream ingest into a new server of its own, stopped afterwards; with
    `restart`, stopped and started again on its data first (`timed_restart`), as "restart"."""
    with tempfile.TemporaryDirectory() as data_dir:
        server = ServerProcess(data_dir)
        try:
            result = ingest_with_memory(server, requests)
            if restart:
                result["restart"], server = timed_restart(server, data_dir)
            return result
        finally:
            server.stop()


def list_tests(server: ServerProcess) -> list:
    with grpc.insecure_channel(server.address, options=GRPC_OPTIONS) as channel:
        return queries.list_tests().grpc(analytics_pb2_grpc.AnalyticsServiceStub(channel))


def timed_restart(server: ServerProcess, data_dir: str) -> tuple[dict, ServerProcess]:
    """A graceful restart: the server stopped (with its final snapshot) and a new one started
    on its data; how long each took, and whether it lists the same tests. The new server is
    the caller's to stop."""
    before = list_tests(server)
    started = time.perf_counter()
    server.stop()
    report = {"shutdown_seconds": time.perf_counter() - started}
    started = time.perf_counter()
    server = ServerProcess(data_dir)
    try:
        report["start_to_serving_seconds"] = time.perf_counter() - started
        report["recovery_seconds"] = server.recovery_seconds()
        after = list_tests(server)
    except BaseException:
        server.stop()
        raise
    report["events"] = sum(t[2] for t in after)
    report["verified"] = after == before
    return report, server


def ingest_with_memory(server: ServerProcess, requests) -> dict:
    """A timed single-stream ingest, with the server's resident memory per event at its last ack
    (which varies by a few bytes per event from one fresh server to the next)."""
    before = server.rss_bytes()
    result = timed_ingest(server.address, requests, 1)
    return {**result, "memory": {"rss_before": before, "rss_at_last_ack": server.rss_bytes()}}


FILE_LINES = 1_000_000  # the NDJSON file `abstream ingest` sends
FILE_RUNS = 3


def file_ingest(table: pa.Table) -> dict:
    """`abstream ingest` of an NDJSON file (the events as users send them: text timestamps, every
    field) against `Client.ingest_table` of the same events already in memory, each into fresh
    servers, alternating; the medians and their ratio. The command reads, parses, sends exactly
    once and reports; ingest_table only sends."""
    from abstream.clients import Client

    sample = table.slice(0, min(table.num_rows, FILE_LINES))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.ndjson"
        with open(path, "w") as f:
            for batch in sample.to_batches(100_000):
                for r in batch.to_pylist():
                    r["timestamp"] = r["timestamp"].strftime("%Y-%m-%d %H:%M:%S.%f")
                    f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk, as a file to import is: its writeback would stall the servers' fsyncs
        size = path.stat().st_size
        cli_s, client_s = [], []
        for _ in range(FILE_RUNS):
            with tempfile.TemporaryDirectory() as data_dir:
                server = ServerProcess(data_dir)
                try:
                    started = time.perf_counter()
                    result = subprocess.run([str(Path(sys.executable).parent / "abstream"), "ingest", str(path),
                                             "--addr", server.address, "--quiet", "--timeout", "600"],
                                            capture_output=True, text=True)
                    cli_s.append(time.perf_counter() - started)
                    if not result.stdout.startswith(f"accepted {sample.num_rows:,}, rejected 0"):
                        raise RuntimeError(f"abstream ingest: {result.stdout}{result.stderr}")
                finally:
                    server.stop()
            with tempfile.TemporaryDirectory() as data_dir:
                server = ServerProcess(data_dir)
                try:
                    with Client(server.address, timeout=600) as client:
                        started = time.perf_counter()
                        acks = client.ingest_table(sample, batch_size=20_000)
                        client_s.append(time.perf_counter() - started)
                    if sum(a.accepted for a in acks) != sample.num_rows:
                        raise RuntimeError("ingest_table lost events")
                finally:
                    server.stop()
    cli, client = float(np.median(cli_s)), float(np.median(client_s))
    return {"events": sample.num_rows, "file_bytes": size, "cli_seconds": cli_s, "ingest_table_seconds": client_s,
            "cli_events_per_s": sample.num_rows / cli, "ingest_table_events_per_s": sample.num_rows / client,
            "cli_over_ingest_table": cli / client}


HTTP_LINES = (1_000, 10_000)  # lines per Events API request


def http_bodies(table: pa.Table, lines: int, prefix: str) -> list[bytes]:
    """NDJSON bodies as users send them (text timestamps), built before any clock starts."""
    bodies = []
    for batch in table.to_batches(lines):
        text = []
        for r in batch.to_pylist():
            r["timestamp"] = r["timestamp"].strftime("%Y-%m-%d %H:%M:%S.%f")
            r["test_id"] = prefix + r["test_id"]
            text.append(json.dumps(r))
        bodies.append(("\n".join(text) + "\n").encode())
    return bodies


def http_ingest(address: str, bodies: list[bytes], connections: int = 1) -> dict:
    """POST /v0/events?wait=true, one request after another on each of `connections` keep-alive
    connections (HTTP/1.1 has no pipelining, so more connections are how a client keeps more than
    one request in flight, as a gRPC stream does)."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    host, port = address.rsplit(":", 1)

    def send(share: list[bytes]) -> int:
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        accepted = 0
        for body in share:
            connection.request("POST", "/v0/events?name=ab_test_events&wait=true", body=body,
                               headers={"Content-Type": "application/x-ndjson"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            if response.status != 200:
                raise RuntimeError(f"HTTP ingest: {response.status} {answer}")
            accepted += answer["successful_rows"]
        connection.close()
        return accepted

    started = time.perf_counter()
    with ThreadPoolExecutor(connections) as pool:
        accepted = sum(pool.map(send, [bodies[k::connections] for k in range(connections)]))
    seconds = time.perf_counter() - started
    return {"events": accepted, "seconds": seconds, "events_per_s": accepted / seconds, "connections": connections}


def http_summary(stub, address: str, test_id: str, reps: int) -> dict:
    """test_summary.json against gRPC Summary on the same test and range (every event), after
    checking they agree."""
    import http.client
    import urllib.parse

    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    path = (f"/v0/pipes/test_summary.json?test_id={urllib.parse.quote(test_id)}&start_date=2000-01-01+00:00:00"
            "&end_date=2100-01-01+00:00:00")

    def over_http():
        connection.request("GET", path)
        response = connection.getresponse()
        return json.loads(response.read())

    request = pb.SummaryRequest(test_id=test_id)
    request.start_time.FromSeconds(946_684_800)
    request.end_time.FromSeconds(4_102_444_800)
    grpc_rows = [(r.variant, r.metrics.users, r.metrics.conversions) for r in stub.Summary(request, timeout=60).rows]
    http_rows = [(r["variant"], r["users"], r["conversions"]) for r in over_http()["data"]]
    report = {"test": test_id, "verified": grpc_rows == http_rows, "http": timed(over_http, reps),
              "grpc": timed(lambda: stub.Summary(request, timeout=60), reps)}
    connection.close()
    return report


PAGE_LOADS = 5
#: A test's page has drawn its lift over time, or said why it could not.
LIFT_DRAWN = "document.querySelector('#lift-chart[data-drawn]') || document.querySelector('#lift-chart p')"


def results_page(address: str, test_id: str) -> dict:
    """Time to first render of the results page of `test_id` (navigation start to its tables and
    charts drawn, in Chromium driven by Playwright, a new browser context, so a cold cache, each
    time; one load at a time, each left once its lift over time is drawn too), with what the
    page's data request took the server; and of the list of tests."""
    import shutil
    import urllib.parse
    import urllib.request

    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if not chromium:
        return {"skipped": "chromium or playwright is not installed (make test installs both)"}
    base = f"http://{address}"
    with urllib.request.urlopen(f"{base}/api/tests/{urllib.parse.quote(test_id)}", timeout=120) as response:
        api_ms = [json.loads(response.read())["elapsed_ms"]]
    out = {"test": test_id}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for name, path in (("test_page", f"/tests/{urllib.parse.quote(test_id)}"), ("list_page", "/")):
            times = []
            for _ in range(PAGE_LOADS):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.goto(base + path)
                page.wait_for_function("Number(document.body.dataset.renders || 0) >= 1", timeout=120_000)
                times.append(page.evaluate("window.abstreamFirstRender"))
                if name == "test_page":  # its last request (the lift over time) answered: not left to the next load
                    page.wait_for_function(LIFT_DRAWN, timeout=120_000)
                context.close()
            out[name] = {"p50_ms": float(np.median(times)), "runs_ms": times}
        browser.close()
    for _ in range(PAGE_LOADS - 1):
        with urllib.request.urlopen(f"{base}/api/tests/{urllib.parse.quote(test_id)}", timeout=120) as response:
            api_ms.append(json.loads(response.read())["elapsed_ms"])
    out["api_p50_ms"] = float(np.median(api_ms))
    return out


def median_run(results: list[dict]) -> dict:
    """The run with the median rate, with every run's rate beside it."""
    results = sorted(results, key=lambda r: r["events_per_s"])
    return {**results[len(results) // 2], "runs_events_per_s": [r["events_per_s"] for r in results]}


def _background_ingest(address: str, requests: list[bytes], seconds: float, counter) -> None:
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        call = channel.stream_stream(INGEST_METHOD, request_serializer=None,
                                     response_deserializer=pb.IngestEventsResponse.FromString)
        while time.monotonic() < deadline:
            for ack in call(iter(requests), timeout=600):
                counter.value += ack.accepted


# ---- queries -----------------------------------------------------------------------------

def percentiles(samples_s: list[float]) -> dict:
    ms = np.array(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def timed(fn, reps: int) -> dict:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def query_set(typical: str, largest: str, mid_ns: int) -> list[queries.Query]:
    week = 7 * 86400 * queries.NS
    out = []
    for test_id in (typical, largest):
        out += [
            queries.summary(test_id),
            queries.summary(test_id, mid_ns, mid_ns + week, name="summary_7d"),
            queries.segments(test_id, "device"),
            queries.segments(test_id, "country"),
            queries.segments(test_id, "event_type"),
            queries.timeseries(test_id, "hour"),
            queries.timeseries(test_id, "day"),
            queries.timeseries(test_id, "day", cumulative=True),
            queries.summary_sessions(test_id),
            queries.lift(test_id, "day"),
            queries.lift_by_exposure(test_id, "day"),
        ]
    return out + [queries.list_tests()]


# ---- the run -----------------------------------------------------------------------------

def machine() -> dict:
    import chdb
    import google.protobuf

    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    return {"cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform(), "numpy": np.__version__, "pyarrow": pa.__version__,
            "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__, "duckdb": duckdb.__version__,
            "chdb": chdb.__version__}


def run(n: int, reps: int, row_events: int, load_seconds: float, only: set[str] | None = None) -> dict:
    report: dict = {"events": n, "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    table = dataset.load(n)
    counts = table.group_by("test_id").aggregate([("test_id", "count")]).sort_by([("test_id_count", "descending")])
    ranked = counts.column("test_id").to_pylist()
    largest, typical = ranked[0], ranked[min(9, len(ranked) - 1)]
    report["tests"] = {"largest": [largest, counts.column(1)[0].as_py()],
                       "typical": [typical, counts.column(1)[min(9, len(ranked) - 1)].as_py()]}
    ts = table.column("timestamp").cast(pa.int64()).to_numpy()
    mid_ns = int(ts[len(ts) // 2])

    print("crafting colliding ids ...", file=sys.stderr)
    report["hostile_ids"] = hostile.dictionary_report(min(60_000, max(n // 50, 1000)))
    print(f"preparing {n:,} events ...", file=sys.stderr)
    columnar = ColumnarRequests(table)
    sends = row_sends(table, row_events, 2 * CEILING_ROUNDS, "rows_")
    rows = sends[0]
    sample = table.slice(0, min(n, PLAIN_EVENTS))
    prefixed = pc.binary_join_element_wise("plain_", sample.column("test_id"), "")
    plain = ColumnarRequests(sample.set_column(sample.schema.get_field_index("test_id"), "test_id", prefixed),
                             compact=False)

    # Columnar ingest is timed into fresh servers three times (the last one stays for everything
    # else); the report has the median run. One run for huge datasets.
    # The first of them is restarted once loaded: the restart target is for a server of n events
    # (the bench's own server restarts at the end, holding the later sends too).
    extra = [fresh_ingest(columnar, restart=k == 0) for k in range(COLUMNAR_RUNS - 1 if n <= 20_000_000 else 0)]
    if extra:
        report["restart_loaded"] = extra[0].pop("restart")
    print("abstream ingest of an NDJSON file against Client.ingest_table ...", file=sys.stderr)
    report["ingest_file"] = file_ingest(table)
    with tempfile.TemporaryDirectory() as data_dir:
        server = ServerProcess(data_dir)
        try:
            runs = [*extra, ingest_with_memory(server, columnar)]
            memory = [run.pop("memory") for run in runs]
            report["ingest_columnar"] = median_run(runs)
            at_ack = sorted((m["rss_at_last_ack"] - m["rss_before"]) / n for m in memory)
            time.sleep(SETTLE_SECONDS)  # the server hands freed pages back after a quiet second
            # At the last ack: the median over the fresh servers. Settled: this one, the last.
            settled = server.rss_bytes()
            report["memory"] = {**memory[-1], "rss_after": settled, "at_last_ack_runs": at_ack,
                                "bytes_per_event_at_last_ack": at_ack[len(at_ack) // 2],
                                "bytes_per_event": (settled - memory[-1]["rss_before"]) / n}
            with grpc.insecure_channel(server.address, options=GRPC_OPTIONS) as channel:
                stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
                qs = [q for q in query_set(typical, largest, mid_ns) if not only or q.name in only]
                report["queries"], held, report["tests"]["unsealed"] = compare_and_time(stub, table, qs, reps)
                report["memory"]["store_bytes_per_event"] = held
                if not only:
                    report["rollups"] = rollups(table, [typical, largest], mid_ns, reps)
                report["ingest_columnar_plain"] = timed_ingest(server.address, plain, 1)
                stored = [server.metric(f"abstream_requests_per_stored_batch_{k}") for k in ("count", "sum")]
                logged = log_bytes(data_dir)  # the bench's server writes no snapshot: its log only grows
                against = rows_against_ceiling(server.address, sends, CEILING_ROUNDS, server.process.pid)
                report["ingest_rows_log_bytes_per_event"] = (log_bytes(data_dir) - logged) / against["events"]
                report["ingest_rows_1"], report["ingest_rows_4"] = against["rows_1"], against["rows_4"]
                report["ingest_rows_ceiling"] = against["ceiling"]
                report["ingest_rows_cpu"] = against["cpu_us_per_event"]
                report["ingest_rows_cores_busy"] = against["cores_busy_one_stream"]
                batches, requests = (server.metric(f"abstream_requests_per_stored_batch_{k}") - was
                                     for k, was in zip(("count", "sum"), stored))
                report["ingest_rows_grouped"] = {"requests": requests, "stored_batches": batches}
                row_sample = table.slice(0, row_events)
                for lines in HTTP_LINES:
                    bodies = http_bodies(row_sample, lines, f"http{lines}_")
                    report[f"ingest_http_{lines}"] = median_run([http_ingest(server.http_address, bodies)
                                                                 for _ in range(3)])
                bodies = http_bodies(row_sample, HTTP_LINES[0], "http4c_")
                report["ingest_http_1000_4"] = median_run([http_ingest(server.http_address, bodies, 4)
                                                           for _ in range(3)])
                report["http_summary"] = http_summary(stub, server.http_address, typical, reps)
                report["results_page"] = results_page(server.http_address, largest)
                report["under_ingest"] = under_ingest(stub, server.address, rows, typical, largest, reps, load_seconds)
                report["freshness"] = freshness(stub, reps)
                report["snapshot"] = take_snapshot(server.address)
            report["restart"], server = timed_restart(server, data_dir)
        finally:
            server.stop()
    print("connectors ...", file=sys.stderr)
    report["kafka"] = connectors.kafka(table, ServerProcess)
    report["s3"] = connectors.s3(table, ServerProcess, timed_ingest, ColumnarRequests)
    print("lifecycle ...", file=sys.stderr)
    report["lifecycle"] = lifecycle.lifecycle(table, ServerProcess, timed_ingest, ColumnarRequests)
    return report


def run_clickhouse(n: int, reps: int, row_events: int, only: set[str] | None = None) -> dict:
    """The same ingest and queries against the cluster engine on a local 2 x 2 cluster (what
    `make cluster` starts), beside the embedded engine in the same run."""
    from abstream.clickhouse.backend import Cluster as Backend
    from abstream.clickhouse.cluster import Cluster
    from abstream.clickhouse.engine import ClickHouseEngine

    report: dict = {"events": n, "engine": "clickhouse", "machine": machine(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    table = dataset.load(n)
    counts = table.group_by("test_id").aggregate([("test_id", "count")]).sort_by([("test_id_count", "descending")])
    ranked = counts.column("test_id").to_pylist()
    largest, typical = ranked[0], ranked[min(9, len(ranked) - 1)]
    report["tests"] = {"largest": [largest, counts.column(1)[0].as_py()],
                       "typical": [typical, counts.column(1)[min(9, len(ranked) - 1)].as_py()]}
    mid_ns = int(table.column("timestamp").cast(pa.int64()).to_numpy()[n // 2])
    columnar = ColumnarRequests(table)
    rows = row_requests(table.slice(0, row_events), "rows_")
    with Cluster() as cluster:
        engine = ClickHouseEngine(Backend(cluster.hosts().split(","), cluster.cluster_name, "ab"))
        engine.init_schema()
        report["cluster"] = {"shards": cluster.shards, "replicas": cluster.replicas, "clickhouse": "18.16",
                             "insert_quorum": 2}
        pids = [p.pid for p in cluster.processes()]
        rss_before = sum(_rss(pid) for pid in pids)
        server = ServerProcess("", "--engine", "clickhouse", "--clickhouse", cluster.hosts(), "--clickhouse-cluster",
                               cluster.cluster_name)
        try:
            report["ingest_columnar"] = timed_ingest(server.address, columnar, 1)
            report["memory"] = {"cluster_rss_before": rss_before, "cluster_rss_after": sum(_rss(pid) for pid in pids),
                                "gateway_rss": server.rss_bytes()}
            report["memory"]["cluster_bytes_per_event"] = (report["memory"]["cluster_rss_after"] - rss_before) / n
            report["disk"] = _disk(cluster, n)
            with grpc.insecure_channel(server.address, options=GRPC_OPTIONS) as channel:
                stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
                qs = [q for q in query_set(typical, largest, mid_ns) if not only or q.name in only]
                report["queries"], _, _ = compare_and_time(stub, table, qs, reps, cluster_engine=engine)
                report["ingest_rows_1"] = timed_ingest(server.address, rows, 1)
                report["freshness"] = freshness(stub, reps)
        finally:
            server.stop()
            engine.close()
    return report


def _disk(cluster, n: int) -> dict:
    """Bytes the events take on disk, every replica counted, from system.parts."""
    from clickhouse_driver import Client

    total = 0
    for node in cluster.nodes:
        ((size,),) = Client("127.0.0.1", node.tcp_port).execute(
            "SELECT sum(bytes_on_disk) FROM system.parts WHERE database = 'ab' AND table = 'events_local' AND active")
        total += size
    return {"bytes_on_disk": total, "bytes_per_event": total / n, "replicas": cluster.replicas}


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def clickhouse_text(report: dict) -> str:
    c = report["cluster"]
    lines = [f"abstream benchmark, cluster engine: {report['events']:,} events into {c['shards']} shards x "
             f"{c['replicas']} replicas of ClickHouse {c['clickhouse']} (insert quorum {c['insert_quorum']}), all on this "
             f"machine ({report['machine']['cores']} cores)",
             f"tests: typical {report['tests']['typical'][0]} ({report['tests']['typical'][1]:,} events), "
             f"largest {report['tests']['largest'][0]} ({report['tests']['largest'][1]:,} events)", "",
             "| query | test | rows | verified | gateway gRPC p50 ms | cluster engine in-process p50 ms "
             "| embedded in-process p50 ms | DuckDB p50 ms | chDB p50 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for q in report["queries"]:
        lines.append(f"| {q['query']} | {q['test']} | {q['rows']} | {'yes' if q['verified'] else 'NO'} "
                     f"| {q['grpc']['p50_ms']:.2f} | {q['in_process']['p50_ms']:.2f} "
                     f"| {q['embedded_in_process']['p50_ms']:.2f} | {q['duckdb']['p50_ms']:.2f} "
                     f"| {q['chdb']['p50_ms']:.2f} |")
    m, f = report["memory"], report["freshness"]
    lines += ["", f"columnar ingest (100k/batch, 1 stream, acked on the quorum): "
                  f"{report['ingest_columnar']['events_per_s']:,.0f} events/s; row batches of 1,000: "
                  f"{report['ingest_rows_1']['events_per_s']:,.0f} events/s",
              f"cluster resident memory: {m['cluster_rss_before'] / 2**20:.0f} MiB before, "
              f"{m['cluster_rss_after'] / 2**20:.0f} MiB after ({m['cluster_bytes_per_event']:.1f} bytes per event, "
              f"every event on 2 replicas); the gateway: {m['gateway_rss'] / 2**20:.0f} MiB",
              f"on disk: {report['disk']['bytes_on_disk'] / 2**20:.0f} MiB for every replica "
              f"({report['disk']['bytes_per_event']:.1f} bytes per event, "
              f"{report['disk']['bytes_per_event'] / report['disk']['replicas']:.1f} per copy)",
              f"freshness, ack to visible through the gateway: p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms "
              f"({f['queries_that_missed_an_acked_batch']} queries missed an acked batch)"]
    return "\n".join(lines)


def take_snapshot(address: str) -> dict:
    from abstream.v1 import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(address, options=GRPC_OPTIONS) as channel:
        started = time.perf_counter()
        response = admin_pb2_grpc.AdminServiceStub(channel).CreateSnapshot(admin_pb2.CreateSnapshotRequest(),
                                                                            timeout=3600)
        return {"seconds": time.perf_counter() - started, "events": response.events}


class ChdbEvents:
    """The events in ClickHouse, in-process (chDB): the tutorial's columns in a MergeTree, by month
    as the tutorial's datasource is, sorted by test and time (the tutorial's own key leads with
    the time, which leaves a per-test query to read every month's parts whole). Its files live in
    a directory of its own until it is closed."""

    def __init__(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq
        from chdb import session

        self._directory = tempfile.TemporaryDirectory()
        path = os.path.join(self._directory.name, "events.parquet")
        pq.write_table(table, path)
        self.session = session.Session(os.path.join(self._directory.name, "chdb"))
        self.session.query("""
            CREATE TABLE ab_test_events (timestamp DateTime64(9, 'UTC'), user_id String, test_id String,
              variant String, event_type String, conversion UInt8, revenue Float64, session_id String,
              device String, country String)
            ENGINE = MergeTree PARTITION BY toYYYYMM(timestamp) ORDER BY (test_id, timestamp)""")
        names = ", ".join(f.name for f in table.schema)
        self.session.query(f"INSERT INTO ab_test_events ({names}) SELECT {names} FROM file('{path}', Parquet)")
        os.remove(path)

    def arrow(self, sql: str) -> pa.Table:
        return self.session.query(sql, "ArrowTable")

    def rows(self, sql: str) -> list[tuple]:
        result = self.arrow(sql)
        return list(zip(*(column.to_pylist() for column in result.columns)))

    def __enter__(self) -> ChdbEvents:
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()
        self._directory.cleanup()


def compare_and_time(stub, table: pa.Table, qs: list[queries.Query], reps: int, cluster_engine=None
                     ) -> tuple[list[dict], float, int]:
    """Per query: whether the answers agree (over gRPC, in-process, DuckDB, chDB), and their times.
    Also the embedded store's bytes per event, and its events not yet sealed into parts (where
    the load stops decides how many, and every query scans them). With `cluster_engine`, the
    server serves the cluster engine: in-process is that engine, and the embedded engine is
    timed beside it."""
    print("loading the in-process store and DuckDB ...", file=sys.stderr)
    store = EventStore()
    for batch in table.to_batches(max_chunksize=COLUMNAR_BATCH):
        store.append(batch)
    embedded, store = store, cluster_engine or store
    db = duckdb.connect()
    db.execute("SET TimeZone = 'UTC'")
    db.register("ab_test_events", table)
    with ChdbEvents(table) as ch:
        out = []
        for q in qs:  # every answer checked first: a dashboard's first look, which asks for the rollups too
            theirs = [tuple(r) for r in db.execute(q.sql).fetchall()]
            grpc_rows, local_rows = q.grpc(stub), q.local(store)
            agree = [queries.same(grpc_rows, theirs), queries.same(local_rows, theirs),
                     queries.same(ch.rows(q.clickhouse), theirs)]
            out.append({"query": q.name, "test": q.test_id, "rows": len(theirs), "verified": all(agree)})
            if not out[-1]["verified"]:
                print(f"MISMATCH in {q.name} on {q.test_id} (gRPC, in-process, chDB: {agree})", file=sys.stderr)
        embedded.wait_rollups()
        held = embedded.nbytes / max(embedded.event_count, 1)  # with the rollups the queries asked for
        for q, entry in zip(qs, out):
            entry["grpc"] = timed(lambda: q.rpc(stub), reps)
            # Timed as each engine hands results to a program: columnar (the store's result, DuckDB's Arrow).
            entry["in_process"] = timed(lambda: q.run(store), reps)
            if cluster_engine is not None:
                entry["embedded_in_process"] = timed(lambda: q.run(embedded), reps)
            entry["duckdb"] = timed(lambda: db.sql(q.sql).to_arrow_table(), max(3, reps // 3))
            entry["duckdb_over_in_process"] = entry["duckdb"]["p50_ms"] / entry["in_process"]["p50_ms"]
            entry["chdb"] = timed(lambda: ch.arrow(q.clickhouse), max(3, reps // 3))
            entry["chdb_over_in_process"] = entry["chdb"]["p50_ms"] / entry["in_process"]["p50_ms"]
            print(f"  {q.name:28s} {q.test_id:8s} grpc {entry['grpc']['p50_ms']:8.2f} ms  in-process "
                  f"{entry['in_process']['p50_ms']:8.2f} ms  duckdb {entry['duckdb']['p50_ms']:8.2f} ms"
                  f"  chdb {entry['chdb']['p50_ms']:8.2f} ms", file=sys.stderr)
        return out, held, embedded.unsealed_events


def rollups(table: pa.Table, tests: list[str], mid_ns: int, reps: int) -> dict:
    """Summary with its analysis, cumulative Timeseries and Segments with their analyses,
    in-process, from a store that keeps rollups (the default, once asked for) and from one that
    scans: the whole test (the rollup's case) and 7 days (a scan on both), and what the rollups
    cost in bytes per event."""
    print("rollups against scans ...", file=sys.stderr)
    week = 7 * 86400 * queries.NS
    out: dict = {"tests": {}}
    for name, events in (("rolled", ROLLUP_EVENTS), ("scanned", None)):
        store = EventStore(rollup_events=events)
        for batch in table.to_batches(max_chunksize=COLUMNAR_BATCH):
            store.append(batch)
        qs = [q for test_id in tests for q in (
            queries.summary(test_id), queries.summary(test_id, mid_ns, mid_ns + week, name="summary_7d"),
            queries.timeseries(test_id, "day", cumulative=True), queries.segments(test_id, "device"),
            queries.segments(test_id, "country"))]
        for q in qs:  # asked for once, as a dashboard would: the tests keep rollups from then on
            q.run(store)
        store.wait_rollups()
        out[f"{name}_bytes_per_event"] = store.nbytes / max(store.event_count, 1)
        for q in qs:
            out["tests"].setdefault(q.test_id, {})[f"{q.name}_{name}"] = timed(lambda: q.run(store), reps)
        store.close()
    return out


def under_ingest(stub, address: str, rows: list[bytes], typical: str, largest: str, reps: int,
                 seconds: float) -> dict:
    """Query latency while another process streams row batches as fast as it can."""
    qs = [queries.summary(typical), queries.segments(typical, "country"), queries.timeseries(typical, "hour")]
    idle = {q.name: timed(lambda: q.rpc(stub), reps) for q in qs}
    spawn = multiprocessing.get_context("spawn")
    counter = spawn.Value("q", 0)
    loader = spawn.Process(target=_background_ingest,
                                                          args=(address, rows, seconds, counter))
    loader.start()
    time.sleep(min(2.0, seconds / 4))
    busy = {q.name: timed(lambda: q.rpc(stub), reps) for q in qs}
    loader.join(timeout=seconds + 120)
    return {q.name: {"idle_p50_ms": idle[q.name]["p50_ms"], "busy_p50_ms": busy[q.name]["p50_ms"],
                     "ratio": busy[q.name]["p50_ms"] / idle[q.name]["p50_ms"]} for q in qs} | \
        {"background_events": counter.value}


def freshness(stub, reps: int) -> dict:
    """From an ack to the first query that shows the batch (the query after the ack must)."""
    samples, misses = [], 0
    for i in range(reps):
        test_id = f"fresh_{i}"
        event = pb.Event(user_id="u", test_id=test_id, variant="v", conversion=1, revenue=1.0)
        event.timestamp.GetCurrentTime()
        list(stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event])]), timeout=30))
        acked = time.perf_counter()
        while not stub.Summary(pb.SummaryRequest(test_id=test_id), timeout=30).rows:
            misses += 1
        samples.append(time.perf_counter() - acked)
    return percentiles(samples) | {"queries_that_missed_an_acked_batch": misses}


# ---- output ------------------------------------------------------------------------------

def table_text(report: dict) -> str:
    lines = [f"abstream benchmark: {report['events']:,} events; {report['machine']['cores']} cores, "
             f"{report['machine']['memory_gib']} GiB, Python {report['machine']['python']}, "
             f"numpy {report['machine']['numpy']}, pyarrow {report['machine']['pyarrow']}, "
             f"grpcio {report['machine']['grpcio']}, duckdb {report['machine']['duckdb']}, "
             f"chdb {report['machine']['chdb']}",
             f"tests: typical {report['tests']['typical'][0]} ({report['tests']['typical'][1]:,} events), "
             f"largest {report['tests']['largest'][0]} ({report['tests']['largest'][1]:,} events); "
             f"{report['tests']['unsealed']:,} events not yet sealed into parts when the queries ran "
             "(every query scans them)", "",
             "| query | test | rows | verified | gRPC p50 / p95 / p99 ms | in-process p50 ms | DuckDB p50 ms "
             "| DuckDB / in-process | chDB p50 ms | chDB / in-process |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for q in report["queries"]:
        g = q["grpc"]
        lines.append(f"| {q['query']} | {q['test']} | {q['rows']} | {'yes' if q['verified'] else 'NO'} "
                     f"| {g['p50_ms']:.2f} / {g['p95_ms']:.2f} / {g['p99_ms']:.2f} | {q['in_process']['p50_ms']:.2f} "
                     f"| {q['duckdb']['p50_ms']:.2f} | {q['duckdb_over_in_process']:.1f}x "
                     f"| {q['chdb']['p50_ms']:.2f} | {q['chdb_over_in_process']:.1f}x |")
    lines += ["", "chDB: ClickHouse in this process, the events in a MergeTree by month sorted by test and time, "
                  "from the table DuckDB reads, each query in ClickHouse's own SQL"]
    ru = report.get("rollups")
    if ru:
        lines += ["", f"In-process p50 ms, from rollups and from a scan of the events "
                      f"(store bytes per event {ru['rolled_bytes_per_event']:.1f} with rollups, "
                      f"{ru['scanned_bytes_per_event']:.1f} without; goal for Summary of the whole test: <= 5 ms at 10M):"]
        for test_id, f in ru["tests"].items():
            lines.append(f"  {test_id}: Summary with its analysis, whole test {f['summary_rolled']['p50_ms']:.2f} against "
                         f"{f['summary_scanned']['p50_ms']:.2f} ({f['summary_scanned']['p50_ms'] / f['summary_rolled']['p50_ms']:.1f}x); "
                         f"7 days {f['summary_7d_rolled']['p50_ms']:.2f} against {f['summary_7d_scanned']['p50_ms']:.2f}; "
                         f"cumulative days (Timeseries, no analysis) {f['timeseries_day_cumulative_rolled']['p50_ms']:.2f} "
                         f"against {f['timeseries_day_cumulative_scanned']['p50_ms']:.2f}; Segments by device "
                         f"{f['segments_device_rolled']['p50_ms']:.2f} against {f['segments_device_scanned']['p50_ms']:.2f}, "
                         f"by country {f['segments_country_rolled']['p50_ms']:.2f} against "
                         f"{f['segments_country_scanned']['p50_ms']:.2f}")
    lines += ["", "| ingest (acked after fsync) | events | events/s |", "|---|---|---|"]
    for key, label in [("ingest_columnar", "columnar (Arrow IPC as `arrow_ipc` writes it, 100k/batch), 1 stream"),
                       ("ingest_columnar_plain", "columnar (Arrow IPC, plain strings, 100k/batch), 1 stream"),
                       ("ingest_rows_1", "row batches of 1,000, 1 stream"),
                       ("ingest_rows_4", "row batches of 1,000, 4 streams")]:
        r = report[key]
        runs = r.get("runs_events_per_s")
        lines.append(f"| {label} | {r['events']:,} | {r['events_per_s']:,.0f}"
                     + (f" (median of {', '.join(f'{x:,.0f}' for x in runs)})" if runs else "") + " |")
    rows_rate = report["ingest_rows_1"]["events_per_s"]
    ceiling = report.get("ingest_rows_ceiling")
    if ceiling:
        one, four = ceiling["one"], ceiling["four"]
        shares, ratios = sorted(ceiling["shares"]), sorted(ceiling["four_over_one"])

        def runs(r: dict) -> str:
            return ", ".join(f"{x:,.0f}" for x in r["runs_events_per_s"])
        lines.append(f"| row batches of 1,000 to a server that only receives them (the transport's ceiling), 1 stream "
                     f"| {one['events']:,} | {one['events_per_s']:,.0f} (median of {runs(one)}; abstream on 1 stream: "
                     f"{shares[len(shares) // 2]:.0%} of it, the median of each round's share, "
                     f"{', '.join(f'{x:.0%}' for x in shares)}; goal 50%) |")
        lines.append(f"| the same, 4 streams | {four['events']:,} | {four['events_per_s']:,.0f} (median of {runs(four)}; "
                     f"abstream on 4 streams: {ratios[len(ratios) // 2]:.2f}x its 1 stream, the median of each round's, "
                     f"{', '.join(f'{x:.2f}' for x in ratios)}; goal 1.5x) |")
        if busy := report.get("ingest_rows_cores_busy", {}).get("abstream"):
            cores = report["machine"]["cores"]
            lines.append(f"| (on 1 stream abstream and its sender kept {busy:.2f} of the {cores} cores busy: 4 streams "
                         f"can go at most {cores / busy:.2f}x as fast unless each event costs less CPU on them) | | |")
    if grouped := report.get("ingest_rows_grouped"):
        lines.append(f"| (the row batches above: {grouped['requests']:,.0f} requests stored as "
                     f"{grouped['stored_batches']:,.0f} batches, {grouped['requests'] / grouped['stored_batches']:.1f} "
                     "requests each, those that queued up while the one before was stored) | | |")
    if "ingest_rows_log_bytes_per_event" in report:
        lines.append(f"| (their write-ahead log: {report['ingest_rows_log_bytes_per_event']:.1f} bytes per event) | | |")
    for key, n, c in [("ingest_http_1000", 1_000, 1), ("ingest_http_10000", 10_000, 1), ("ingest_http_1000_4", 1_000, 4)]:
        r = report[key]
        lines.append(f"| HTTP Events API, NDJSON, {n:,} lines per request (wait=true), {c} connection{'s' * (c > 1)} "
                     f"| {r['events']:,} "
                     f"| {r['events_per_s']:,.0f} (median of {', '.join(f'{x:,.0f}' for x in r['runs_events_per_s'])};"
                     f" gRPC row batches of 1,000 on 1 stream go {rows_rate / r['events_per_s']:.2f}x as fast) |")
    if cpu := report.get("ingest_rows_cpu"):
        lines += ["", "Where the CPU went, row batches of 1,000 on 1 stream, in µs per event (medians of the rounds): "
                  + "; ".join(f"{'abstream' if side == 'abstream' else 'the null server'}: "
                              + ", ".join(f"{name} {us:.2f}" for name, us in used.items()) for side, used in cpu.items())]
    h = report["http_summary"]
    lines += ["", f"test_summary.json over HTTP against gRPC Summary ({h['test']}, every event; "
                  f"{'same rows' if h['verified'] else 'rows DIFFER'}): p50 {h['http']['p50_ms']:.2f} ms against "
                  f"{h['grpc']['p50_ms']:.2f} ms (+{h['http']['p50_ms'] - h['grpc']['p50_ms']:.2f} ms), "
                  f"p99 {h['http']['p99_ms']:.2f} against {h['grpc']['p99_ms']:.2f} ms"]
    k = report.get("kafka", {"skipped": "not run"})
    if "skipped" in k:
        lines += ["", f"kafka: skipped ({k['skipped']})"]
    else:
        lines += [""] + [f"kafka through one partition, {label} ({k[key]['messages']:,} messages, {k['events']:,} "
                         f"events): abstream {k[key]['abstream_events_per_s'] or 0:,.0f} events/s stored; a bare consumer "
                         f"of the same broker {k[key]['broker_events_per_s']:,.0f} events/s "
                         f"({k[key]['broker_messages_per_s']:,.0f} messages/s)"
                         for key, label in (("one_event_per_message", "one event per message"),
                                            ("ndjson_100_per_message", "100 NDJSON events per message"))]
    s3 = report.get("s3", {"skipped": "not run"})
    if "skipped" in s3:
        lines += ["", f"s3 import: skipped ({s3['skipped']})"]
    else:
        lines += ["", f"s3 import of one Parquet object ({s3['events']:,} events, {s3['bytes'] / 2**20:.0f} MiB, moto's "
                      f"server): median {s3['import_events_per_s']:,.0f} events/s; columnar ingest of the same events "
                      f"from memory {s3['columnar_events_per_s']:,.0f} events/s ({s3['columnar_over_import']:.2f}x)"]
    lc = report.get("lifecycle")
    if lc:
        idle = lc["idle_p50_ms"]

        def busy(x: dict) -> str:
            return (f"Summary p50 meanwhile {x['busy_p50_ms']:.2f} ms against {idle:.2f} idle "
                    f"({x['busy_p50_ms'] / idle:.2f}x)" if x["busy_p50_ms"] else "no query finished meanwhile")

        d, e, r = lc["delete_test"], lc["erase_user"], lc["retention"]
        lines += ["", f"lifecycle, {lc['events']:,} events stored:",
                  f"  delete {d['test']} ({d['events']:,} events): {d['seconds']:.2f} s; {busy(d)}",
                  f"  erase the most active user ({e['events']:,} events, and the purge of every older copy on "
                  f"disk): {e['seconds']:.2f} s; {busy(e)}",
                  f"  retention sweep of {r['test']}'s first month ({r['events']:,} of {r['of_events']:,} events): "
                  f"{r['sweep_seconds']:.2f} s; {busy(r)}"]
    page = report["results_page"]
    if "skipped" in page:
        lines += ["", f"results page: skipped ({page['skipped']})"]
    else:
        lines += ["", f"results page of {page['test']}, navigation to first render in Chromium (cold cache, median "
                      f"of {PAGE_LOADS}): {page['test_page']['p50_ms']:.0f} ms, of which the server's answer "
                      f"{page['api_p50_ms']:.0f} ms; the list of tests {page['list_page']['p50_ms']:.0f} ms"]
    fi = report["ingest_file"]
    lines += ["", f"`abstream ingest` of {fi['events']:,} NDJSON lines ({fi['file_bytes'] / 2**20:.0f} MiB): median "
                  f"{fi['cli_events_per_s']:,.0f} events/s, {fi['cli_over_ingest_table']:.2f}x the time of "
                  f"Client.ingest_table of the same events in memory ({fi['ingest_table_events_per_s']:,.0f} events/s; "
                  f"medians of {len(fi['cli_seconds'])} runs each, fresh servers)"]
    m = report["memory"]
    lines += ["", f"resident memory at the last ack: {m['bytes_per_event_at_last_ack']:.1f} bytes per event, the median "
                  f"of {', '.join(f'{x:.1f}' for x in m['at_last_ack_runs'])} in fresh servers (goal 40); "
                  f"{SETTLE_SECONDS:g} s after it, in the last of them, {m['bytes_per_event']:.1f} (server RSS "
                  f"{m['rss_before'] / 2**20:.0f} MiB before, {m['rss_after'] / 2**20:.0f} MiB after load); "
                  f"the store's own arrays: {m['store_bytes_per_event']:.1f} bytes per event"]
    u = report["under_ingest"]
    lines += ["", f"queries during full-speed row ingest ({u['background_events']:,} events streamed meanwhile):"]
    for name, v in u.items():
        if isinstance(v, dict):
            lines.append(f"  {name}: idle p50 {v['idle_p50_ms']:.2f} ms, busy p50 {v['busy_p50_ms']:.2f} ms "
                         f"({v['ratio']:.2f}x)")
    f = report["freshness"]
    lines.append(f"freshness, ack to visible: p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms "
                 f"({f['queries_that_missed_an_acked_batch']} queries missed an acked batch)")
    h = report["hostile_ids"]
    lines.append(f"ids crafted to share a probe chain ({h['ids']:,}, against a known key), encoded in-process: "
                 f"{h['secret_over_random']:.2f}x the time of random ids under the server's secret key, "
                 f"{h['known_over_random']:.1f}x under the key they were crafted for")
    snap, r = report["snapshot"], report["restart"]
    lines.append(f"snapshot of {snap['events']:,} events: {snap['seconds']:.2f} s; "
                 f"graceful shutdown (with its final snapshot): {r['shutdown_seconds']:.2f} s")
    loaded = report.get("restart_loaded")
    for when, r, shutdown in (("restart", r, ""), ("restart of a fresh server once loaded", loaded,
                                                     loaded and f" (graceful shutdown {loaded['shutdown_seconds']:.2f} s)")):
        if r:
            lines.append(f"{when}: recovery {r['recovery_seconds']:.2f} s, process start to SERVING "
                         f"{r['start_to_serving_seconds']:.2f} s, {r['events']:,} events, "
                         f"{'the same' if r['verified'] else 'NOT the same'} ListTests as before{shutdown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per query")
    parser.add_argument("--row-events", type=int, default=1_000_000, help="events sent as row batches")
    parser.add_argument("--load-seconds", type=float, default=15.0, help="length of the ingest-under-load phase")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--queries", default="", help="comma-separated query names to run (default: all)")
    parser.add_argument("--engine", choices=["embedded", "clickhouse"], default="embedded")
    args = parser.parse_args(argv)
    only = {name for name in args.queries.split(",") if name}
    if args.engine == "clickhouse":
        report = run_clickhouse(args.events, args.reps, min(args.row_events, args.events), only)
        text = clickhouse_text(report)
        report.setdefault("restart", {"verified": True})
    else:
        report = run(args.events, args.reps, min(args.row_events, args.events), args.load_seconds, only)
        text = table_text(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{args.engine + '-' if args.engine != 'embedded' else ''}{args.events}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nreport: {path}")
    verified = all(q["verified"] for q in report["queries"]) and report["restart"]["verified"] \
        and report.get("restart_loaded", {}).get("verified", True)
    return 0 if verified and report.get("http_summary", {}).get("verified", True) else 1


if __name__ == "__main__":
    sys.exit(main())
