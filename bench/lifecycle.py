"""What removing costs, with queries running meanwhile: deleting the largest test, erasing the
most active user (and the purge of every older copy on disk it waits for), and a retention sweep
of a test's first month."""

from __future__ import annotations

import re
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPS = 30


#: The line the retention sweep logs for stored events (not quarantine_retention's).
SWEPT = re.compile(r"(?<![_\w])retention removed (\d+) events in ([0-9.]+)s")

def _summary_ms(address: str, test_id: str, stop: threading.Event | None = None, reps: int = REPS) -> list[float]:
    from abstream.clients import Client

    times = []
    with Client(address) as client:
        while (stop is None and len(times) < reps) or (stop is not None and not stop.is_set()):
            started = time.perf_counter()
            client.summary(test_id)
            times.append((time.perf_counter() - started) * 1000)
    return times


def _during(address: str, test_id: str, work) -> tuple[float, list[float]]:
    """(seconds `work` took, query latencies meanwhile)."""
    stop = threading.Event()
    latencies: list[float] = []
    thread = threading.Thread(target=lambda: latencies.extend(_summary_ms(address, test_id, stop)))
    thread.start()
    time.sleep(0.2)
    started = time.perf_counter()
    try:
        work()
    finally:
        seconds = time.perf_counter() - started
        stop.set()
        thread.join()
    return seconds, latencies


def lifecycle(table: pa.Table, server_process, timed_ingest, columnar_requests) -> dict:
    from abstream.clients import Client

    counts = table.group_by("test_id").aggregate([("test_id", "count")]).sort_by([("test_id_count", "descending")])
    ranked = counts.column("test_id").to_pylist()
    largest, second, typical = ranked[0], ranked[1], ranked[min(9, len(ranked) - 1)]
    users = pc.value_counts(table.column("user_id")).to_pylist()
    user = max(users, key=lambda u: u["counts"])
    ts = table.filter(pc.equal(table.column("test_id"), second)).column("timestamp").cast(pa.int64()).to_numpy()
    first_ns = int(ts.min())
    month_ns = 30 * 86_400 * 1_000_000_000
    out: dict = {"events": table.num_rows}
    with tempfile.TemporaryDirectory() as d:
        server = server_process(d, "--retention-sweep-seconds", "1")
        try:
            timed_ingest(server.address, columnar_requests(table), 1)
            idle = _summary_ms(server.address, typical)
            out["idle_p50_ms"] = float(np.median(idle))
            with Client(server.address) as client:
                before = {t.test_id: t.events for t in client.list_tests().rows}

                seconds, busy = _during(server.address, typical, lambda: client.delete_test(largest))
                out["delete_test"] = {"test": largest, "events": before[largest], "seconds": seconds,
                                      "busy_p50_ms": float(np.median(busy)) if busy else None}

                removed: list[int] = []
                seconds, busy = _during(server.address, typical,
                                        lambda: removed.append(client.erase_user(user["values"])))
                out["erase_user"] = {"events": removed[0], "seconds": seconds,
                                     "busy_p50_ms": float(np.median(busy)) if busy else None}

                days = (time.time_ns() - (first_ns + month_ns)) / 86_400e9
                lines_before = len(server.lines)

                def sweep() -> None:
                    client.set_retention(second, days)
                    deadline = time.monotonic() + 600
                    while time.monotonic() < deadline:
                        if any(SWEPT.search(line) for line in server.lines[lines_before:]):
                            return
                        time.sleep(0.05)
                    raise RuntimeError("no retention sweep was logged")

                seconds, busy = _during(server.address, typical, sweep)
                match = next(m for line in server.lines[lines_before:] if (m := SWEPT.search(line)))
                out["retention"] = {"test": second, "events": int(match.group(1)), "sweep_seconds": float(match.group(2)),
                                    "busy_p50_ms": float(np.median(busy)) if busy else None,
                                    "of_events": before[second]}
        finally:
            server.stop()
    return out
