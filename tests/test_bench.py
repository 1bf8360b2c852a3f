"""The benchmark still runs and its answers agree with DuckDB (its times are not checked here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path):
    from bench.run import CEILING_ROUNDS

    env = {**os.environ, "ABSTREAM_BENCH_DATA": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--events", "50000", "--reps", "2", "--row-events", "5000",
         "--load-seconds", "1", "--out", str(tmp_path / "results")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "results").glob("bench-50000-*.json")
    report = json.loads(path.read_text())
    assert report["queries"] and all(q["verified"] for q in report["queries"])
    # ClickHouse (chDB) answers every query the same in its own SQL, checked before it is timed.
    assert all(q["chdb"]["p50_ms"] > 0 for q in report["queries"])
    assert "chDB: ClickHouse in this process" in result.stdout and report["machine"]["chdb"]
    # 50,000 events in batches of 100,000: one batch, not sealed, scanned by every query.
    assert report["tests"]["unsealed"] == 50000 and "50,000 events not yet sealed into parts" in result.stdout
    assert {q["query"] for q in report["queries"]} >= {"summary", "segments_country", "timeseries_hour",
                                                       "timeseries_day_cumulative", "list_tests", "summary_sessions",
                                                       "lift_day", "lift_day_since_first_exposure"}
    assert len(report["rollups"]["tests"]) == 2 and report["rollups"]["rolled_bytes_per_event"] > 0
    assert "from rollups and from a scan of the events" in result.stdout
    assert report["ingest_columnar"]["events"] == 50000 and report["ingest_columnar"]["rejected"] == 0
    assert len(report["ingest_columnar"]["runs_events_per_s"]) == 3  # the median of three fresh servers
    assert report["ingest_rows_1"]["events"] == report["ingest_rows_4"]["events"] == 5000
    # 5,000 events in 5 requests, twice per round (rows_1 and rows_4)
    grouped = report["ingest_rows_grouped"]
    assert grouped["requests"] == 2 * 5 * CEILING_ROUNDS and 1 <= grouped["stored_batches"] <= grouped["requests"]
    assert "requests stored as" in result.stdout
    # Stored whole, with their tests, variants, event types, devices and countries logged as codes
    # (113 bytes per event as sent): 50,000 events, ~56 bytes each, and a record header per batch.
    assert 40 < report["ingest_rows_log_bytes_per_event"] < 80, report["ingest_rows_log_bytes_per_event"]
    assert "their write-ahead log:" in result.stdout
    assert report["ingest_file"]["events"] == 50000 and report["ingest_file"]["cli_over_ingest_table"] > 0
    assert "`abstream ingest` of 50,000 NDJSON lines" in result.stdout
    assert report["ingest_http_1000"]["events"] == report["ingest_http_10000"]["events"] == 5000
    assert report["ingest_http_1000_4"]["events"] == 5000 and report["ingest_http_1000_4"]["connections"] == 4
    assert report["http_summary"]["verified"] and report["http_summary"]["http"]["p50_ms"] > 0
    assert "HTTP Events API, NDJSON, 1,000 lines per request" in result.stdout
    assert report["kafka"]["one_event_per_message"]["abstream_events_per_s"] > 0, report["kafka"]
    assert report["kafka"]["ndjson_100_per_message"]["broker_events_per_s"] > 0
    assert report["s3"]["events"] == 50000 and report["s3"]["columnar_over_import"] > 0, report["s3"]
    assert "kafka through one partition" in result.stdout and "s3 import of one Parquet object" in result.stdout
    ceiling = report["ingest_rows_ceiling"]  # abstream and the null server in turns, CEILING_ROUNDS rounds
    assert ceiling["one"]["events"] == ceiling["four"]["events"] == 5000
    assert len(ceiling["shares"]) == len(ceiling["four_over_one"]) == CEILING_ROUNDS
    assert all(x > 0 for x in ceiling["shares"])
    assert "the transport's ceiling" in result.stdout and "the median of each round's share" in result.stdout
    cpu = report["ingest_rows_cpu"]  # per event, by the threads' names, against the null server's
    assert cpu["abstream"]["abstream-store"] > 0 and cpu["abstream"]["event loop"] > 0, cpu
    assert cpu["abstream"]["server"] >= cpu["abstream"]["abstream-store"] + cpu["abstream"]["event loop"]
    assert cpu["null"]["server"] > 0 and cpu["abstream"]["client"] > 0 and cpu["null"]["client"] > 0
    assert "Where the CPU went, row batches of 1,000 on 1 stream" in result.stdout
    busy = report["ingest_rows_cores_busy"]  # the cores one stream kept busy, server and sender
    assert 0 < busy["abstream"] <= 1.1 * os.cpu_count() and 0 < busy["null"] <= 1.1 * os.cpu_count(), busy
    assert f"4 streams can go at most {os.cpu_count() / busy['abstream']:.2f}x as fast" in result.stdout
    lc = report["lifecycle"]
    assert lc["delete_test"]["events"] > 0 and lc["erase_user"]["events"] > 0 and lc["retention"]["events"] > 0, lc
    assert "lifecycle, 50,000 events stored" in result.stdout
    page = report["results_page"]
    assert "skipped" in page or (page["test_page"]["p50_ms"] > 0 and page["api_p50_ms"] > 0), page
    assert "results page" in result.stdout
    assert report["freshness"]["queries_that_missed_an_acked_batch"] == 0
    memory = report["memory"]  # at the last ack: each of the three fresh servers' figure, and their median
    assert memory["bytes_per_event"] > 0 and len(memory["at_last_ack_runs"]) == 3
    assert memory["bytes_per_event_at_last_ack"] == memory["at_last_ack_runs"][1]
    assert ", ".join(f"{x:.1f}" for x in memory["at_last_ack_runs"]) + " in fresh servers" in result.stdout
    assert len(report["ingest_columnar"]["runs_events_per_s"]) == 3 and "memory" not in report["ingest_columnar"]
    assert report["hostile_ids"]["ids"] >= 1000 and report["hostile_ids"]["secret_over_random"] > 0
    assert report["snapshot"]["events"] >= 50000
    assert report["restart"]["verified"] and report["restart"]["events"] == report["snapshot"]["events"]
    loaded = report["restart_loaded"]  # a fresh server of the dataset alone, restarted once loaded
    assert loaded["verified"] and loaded["events"] == 50000 and loaded["start_to_serving_seconds"] > 0, loaded
    assert "restart of a fresh server once loaded: recovery" in result.stdout and "50,000 events, the same" in result.stdout
    assert "| summary |" in result.stdout


def test_each_send_of_row_batches_carries_the_next_events_of_the_dataset():
    """Rows sent as a live stream sends them: each send the events after the last one's, so that
    their parts follow each other (the same events again would make every merge a sort)."""
    import pyarrow as pa
    from abstream.v1 import analytics_pb2 as pb
    from bench.run import row_sends

    ts = pa.array([1_700_000_000_000_000_000 + i * 1_000_000_000 for i in range(12_000)], pa.timestamp("ns", "UTC"))
    table = pa.table({"timestamp": ts, "user_id": [f"u{i}" for i in range(12_000)], "test_id": ["t"] * 12_000,
                      "variant": ["a"] * 12_000, "event_type": ["click"] * 12_000, "conversion": [0] * 12_000,
                      "revenue": [0.0] * 12_000, "session_id": ["s"] * 12_000, "device": ["d"] * 12_000,
                      "country": ["US"] * 12_000})

    def users(requests: list[bytes]) -> list[str]:
        return [e.user_id for r in requests for e in pb.IngestEventsRequest.FromString(r).events]

    sends = row_sends(table, 5_000, 4, "rows_")  # two slices of 5,000 fit: then they repeat
    assert [users(s)[0] for s in sends] == ["u0", "u5000", "u0", "u5000"]
    assert users(sends[0]) == [f"u{i}" for i in range(5_000)] and users(sends[1])[-1] == "u9999"
    assert pb.IngestEventsRequest.FromString(sends[1][0]).events[0].test_id == "rows_t"
