"""The HTTP API as the tutorial's users reach it: its curl commands, the platform's own CLI and
SDK, bad input of every kind, and answers equal to the tutorial's SQL in ClickHouse (chDB) and
to gRPC's, on a real server with real ports."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.client import HTTPResponse
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from abstream.clients import Client
from abstream.core.auth import hash_token
from abstream.core.settings import Settings

from tests.conftest import ServerThread
from tests.events import random_events
from tests.process import Server

ROOT = Path(__file__).resolve().parents[1]
TB = ROOT / ".venv" / "tinybird" / "bin" / "tb"
SDK = ROOT / "tests" / "sdk"
TOKENS = {"ingest": "tok-ingest", "query": "tok-query", "admin": "tok-admin", "both": "tok-both"}
SCOPES = {"ingest": ["ingest"], "query": ["query"], "admin": ["admin", "ingest", "query"], "both": ["ingest", "query"]}
TUTORIAL_EVENT = {"timestamp": "2025-04-28 18:42:22", "user_id": "user_455", "test_id": "test_5",
                  "variant": "variant_a", "event_type": "click", "conversion": 1, "revenue": 84.55,
                  "session_id": "session_3455", "device": "desktop", "country": "AU"}


def tokens_file(path: Path, rates: dict[str, float] | None = None) -> Path:
    entries = []
    for name, secret in TOKENS.items():
        entry = f'[[token]]\nname = "{name}"\nsha256 = "{hash_token(secret)}"\nscopes = {json.dumps(SCOPES[name])}\n'
        if rates and name in rates:
            entry += f"ingest_rate = {rates[name]}\n"
        entries.append(entry)
    path.write_text("\n".join(entries))
    return path


class Http:
    """A real server with gRPC and HTTP on ephemeral loopback ports."""

    def __init__(self, tmp_path: Path, **settings) -> None:
        defaults = dict(addr="127.0.0.1:0", http_addr="127.0.0.1:0", data_dir=str(tmp_path / "data"),
                        tokens_file=str(tokens_file(tmp_path / "tokens.toml")))
        self.thread = ServerThread(Settings(**{**defaults, **settings})).start()
        self.base = f"http://127.0.0.1:{self.thread.server.http_port}"
        self.grpc = self.thread.address

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             token: str | None = TOKENS["admin"]) -> tuple[int, dict, bytes]:
        headers = dict(headers or {})
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        request = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def json(self, method: str, path: str, body: bytes | None = None, **kwargs) -> tuple[int, dict]:
        status, _, payload = self.call(method, path, body, **kwargs)
        return status, json.loads(payload)

    def stop(self) -> None:
        self.thread.stop()


@pytest.fixture
def http(tmp_path):
    server = Http(tmp_path)
    yield server
    server.stop()


def ndjson(events) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in events).encode()


def tutorial_format(events: list[dict]) -> list[dict]:
    """Random test events as users send them: text timestamps (some with a fraction of a second)."""
    out = []
    for e in events:
        seconds, ns = divmod(e["timestamp"], 1_000_000_000)
        text = dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        out.append({**e, "timestamp": text + (f".{ns // 1_000_000:03d}" if ns else "")})
    return out


# ---- the tutorial's own commands -------------------------------------------------------------

@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is installed by make test (apt-get)")
def test_the_tutorials_curl_commands_work_unchanged_but_for_host_and_token(http):
    host, token = http.base, TOKENS["admin"]
    sent = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{host}/v0/events?name=ab_test_events", "-H", f"Authorization: Bearer {token}",
         "-d", json.dumps(TUTORIAL_EVENT)], capture_output=True, text=True, timeout=60)
    assert json.loads(sent.stdout) == {"successful_rows": 1, "quarantined_rows": 0, "quarantined": []}
    older = {**TUTORIAL_EVENT, "timestamp": "2023-06-15 14:30:00", "user_id": "user_12345"}
    subprocess.run(["curl", "-s", "-X", "POST", f"{host}/v0/events?name=ab_test_events&token={token}", "-d",
                    json.dumps(older)], check=True, capture_output=True, timeout=60)
    dated = subprocess.run(
        ["curl", "-s", f"{host}/v0/pipes/test_summary.json?test_id=test_5&start_date=2025-04-01%2000:00:00"
                       f"&end_date=2025-04-30%2023:59:59&token={token}"], capture_output=True, text=True, timeout=60)
    answer = json.loads(dated.stdout)
    assert answer["data"] == [{"test_id": "test_5", "variant": "variant_a", "users": 1, "conversions": 1,
                               "conversion_rate": 1.0, "total_revenue": 84.55, "revenue_per_user": 84.55}]
    assert [m["name"] for m in answer["meta"]] == ["test_id", "variant", "users", "conversions", "conversion_rate",
                                                    "total_revenue", "revenue_per_user"]
    assert answer["rows"] == 1 and set(answer["statistics"]) == {"elapsed", "rows_read", "bytes_read"}
    undated = json.loads(subprocess.run(["curl", "-s", f"{host}/v0/pipes/test_summary.json?test_id=test_5&token={token}"],
                                        capture_output=True, text=True, timeout=60).stdout)
    # the pipe's defaults, as in the tutorial: 2023 only, so only the event of 2023
    assert [(r["users"], r["total_revenue"]) for r in undated["data"]] == [(1, 84.55)]


# ---- test_summary is the tutorial's SQL ----------------------------------------------------------

TUTORIAL_SQL = """
SELECT test_id, variant,
       count(DISTINCT user_id) AS users,
       countIf(conversion = 1) AS conversions,
       round(countIf(conversion = 1) / count(DISTINCT user_id), 4) AS conversion_rate,
       sum(revenue) AS total_revenue,
       round(sum(revenue) / count(DISTINCT user_id), 4) AS revenue_per_user
FROM t.ab_test_events
WHERE test_id = {test_id}
  AND timestamp >= toDateTime({start}, 'UTC')
  AND timestamp <= toDateTime({end}, 'UTC')
GROUP BY test_id, variant
ORDER BY test_id, variant
"""


def clickhouse_answers(events: list[dict], queries: list[tuple[str, str, str]]) -> list[list[dict]]:
    """The tutorial's datasource and SQL in ClickHouse (chDB): its DateTime keeps whole seconds."""
    from chdb import session

    s = session.Session()
    try:
        s.query("CREATE DATABASE IF NOT EXISTS t")
        s.query("CREATE TABLE t.ab_test_events (timestamp DateTime('UTC'), user_id String, test_id String, "
                "variant String, event_type String, conversion UInt8, revenue Float64, session_id String, "
                "device String, country String) ENGINE = MergeTree PARTITION BY toYYYYMM(timestamp) "
                "ORDER BY (timestamp, test_id, variant, user_id)")
        rows = [json.dumps({**e, "timestamp": e["timestamp"][:19]}) for e in events]
        s.query("INSERT INTO t.ab_test_events FORMAT JSONEachRow\n" + "\n".join(rows))
        out = []
        for test_id, start, end in queries:
            quoted = {k: "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for k, v in
                      (("test_id", test_id), ("start", start), ("end", end))}
            text = s.query(TUTORIAL_SQL.format(**quoted), "JSONEachRow").bytes().decode()
            out.append([json.loads(line) for line in text.splitlines() if line.strip()])
        return out
    finally:
        s.close()


def test_test_summary_equals_the_tutorials_sql_in_clickhouse(http):
    events = tutorial_format(random_events(3000, seed=21))
    status, answer = http.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson(events))
    assert status == 200 and answer["successful_rows"] == len(events), answer
    stamps = sorted(e["timestamp"][:19] for e in events)
    queries = [(t, "2025-04-01 00:00:00", "2025-05-31 23:59:59") for t in
               ("checkout", "homepage_redesign", "tëst-ünïcode-✓", "solo", "absent")]
    queries += [("checkout", stamps[100], stamps[-100]), ("checkout", stamps[500], stamps[500]),
                ("checkout", stamps[1000].replace(" ", "T"), stamps[2000])]  # bounds on events' own seconds
    expected = clickhouse_answers(events, [(t, a.replace("T", " "), b) for t, a, b in queries])
    for (test_id, start, end), rows in zip(queries, expected):
        path = (f"/v0/pipes/test_summary.json?test_id={urllib.parse.quote(test_id)}"
                f"&start_date={urllib.parse.quote(start)}&end_date={urllib.parse.quote(end)}")
        status, got = http.json("GET", path)
        assert status == 200, got
        assert len(got["data"]) == len(rows), (test_id, start, end)
        for ours, theirs in zip(got["data"], rows):
            for key in ("test_id", "variant", "users", "conversions", "conversion_rate", "revenue_per_user"):
                assert ours[key] == (int(theirs[key]) if key in ("users", "conversions") else theirs[key]), key
            assert math.isclose(ours["total_revenue"], theirs["total_revenue"], rel_tol=1e-12, abs_tol=1e-9)
    assert any(rows for rows in expected[5:])  # the narrow ranges hold events


def test_an_end_date_takes_in_its_whole_second_and_dates_are_checked(http):
    events = [{**TUTORIAL_EVENT, "user_id": "a", "timestamp": "2025-04-28 18:42:22.700"},
              {**TUTORIAL_EVENT, "user_id": "b", "timestamp": "2025-04-28 18:42:23"}]
    assert http.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson(events))[0] == 200
    status, answer = http.json("GET", "/v0/pipes/test_summary.json?test_id=test_5&start_date=2025-04-28+18:42:22"
                                      "&end_date=2025-04-28T18:42:22")
    assert status == 200 and answer["data"][0]["users"] == 1  # 18:42:22.700 is inside, 18:42:23 is not
    status, error = http.json("GET", "/v0/pipes/test_summary.json?test_id=test_5&start_date=28/04/2025")
    assert status == 400 and "start_date" in error["error"] and "28/04/2025" in error["error"]
    assert set(error) == {"error", "documentation"}


# ---- the other pipes, and the same answers as gRPC -------------------------------------------------

def test_pipes_answer_what_grpc_answers(http):
    events = tutorial_format(random_events(2000, seed=5))
    assert http.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson(events))[0] == 200
    dates = "&start_date=2025-04-01+00:00:00&end_date=2025-05-31+23:59:59"
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        summary = client.summary("checkout", "2025-04-01", "2025-05-31 23:59:59")
        segments = client.segments("checkout", "country", "2025-04-01", "2025-05-31 23:59:59")
        series = client.timeseries("checkout", "day", "2025-04-01", "2025-05-31 23:59:59", cumulative=True)
        results = client.summary("checkout", control="variant_a", confidence=0.9)
    _, s = http.json("GET", "/v0/pipes/test_summary.json?test_id=checkout" + dates)
    assert [(r["variant"], r["users"], r["conversions"]) for r in s["data"]] == \
        [(r.variant, r.metrics.users, r.metrics.conversions) for r in summary.rows]
    assert [round(r["conversion_rate"], 4) for r in s["data"]] == [round(r.metrics.conversion_rate, 4)
                                                                   for r in summary.rows]
    _, g = http.json("GET", "/v0/pipes/test_segments.json?test_id=checkout&dimension=country" + dates)
    assert sorted((r["variant"], r["country"], r["users"], r["conversions"]) for r in g["data"]) == \
        sorted((r.variant, r.segment, r.metrics.users, r.metrics.conversions) for r in segments.rows)
    assert [m["name"] for m in g["meta"]][:3] == ["test_id", "variant", "country"]
    _, t = http.json("GET", "/v0/pipes/test_timeseries.json?test_id=checkout&interval=day&cumulative=true" + dates)
    assert sorted((r["bucket"], r["variant"], r["users"], r["events"]) for r in t["data"]) == sorted(
        (r.bucket_start.strftime("%Y-%m-%d %H:%M:%S"), r.variant, r.metrics.users, r.metrics.events)
        for r in series.rows)
    _, a = http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&control=variant_a&confidence=0.9")
    ours = {(r["variant"], r["metric"]): r for r in a["data"]}
    for c in results.analysis.comparisons:
        row = ours[(c.variant, c.metric)]
        assert row["control_variant"] == "variant_a" and row["relative_ci_low"] == c.relative.ci_low
        assert row["chance_to_win"] == c.chance_to_win and row["status"] == c.status
        assert (row["health"], row["health_reasons"], row["multi_variant_users"], row["future_events"]) == (
            results.health.status, results.health.reasons, results.health.multi_variant_users,
            results.health.future_events)
    assert len(ours) == len(results.analysis.comparisons) > 0
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        fieller = client.summary("checkout", relative_interval="fieller").analysis.comparisons
    _, f = http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&relative_interval=fieller")
    assert [(r["relative_ci_low"], r["relative_ci_high"]) for r in f["data"]] == [
        (c.relative.ci_low, c.relative.ci_high) for c in fieller]
    assert http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&relative_interval=bootstrap")[0] == 400
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        guarded = client.summary("checkout", guardrails={"revenue_per_user": 0.05}).analysis.comparisons
    _, g = http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&guardrails=revenue_per_user:5%25")
    assert [(r["guardrail_margin"], r["non_inferior"], r["non_inferiority_p_value"]) for r in g["data"]] == [
        (c.guardrail.margin, int(c.guardrail.non_inferior), c.guardrail.p_value) if c.guardrail else (None, None, None)
        for c in guarded]
    assert any(c.guardrail for c in guarded)
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        purchases = client.summary("checkout", "2025-04-01", "2025-05-31 23:59:59", metric_event_type="purchase")
    _, p = http.json("GET", "/v0/pipes/test_summary.json?test_id=checkout&metric_event_type=purchase" + dates)
    assert [(r["variant"], r["users"], r["conversions"], r["total_revenue"]) for r in p["data"]] == [
        (r.variant, r.metrics.users, r.metrics.conversions, r.metrics.total_revenue) for r in purchases.rows]
    assert [r["users"] for r in p["data"]] == [r.metrics.users for r in summary.rows]  # every user kept
    assert sum(r["conversions"] for r in p["data"]) < sum(r.metrics.conversions for r in summary.rows)
    status, bad = http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&guardrails=revenue_per_user:lots")
    assert status == 400 and bad["error"].startswith("guardrails:")
    _, excluded = http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&exclude_multi_variant_users=1")
    assert excluded["data"][0]["multi_variant_users"] == results.health.multi_variant_users
    status, _, body = http.call("GET", "/v0/pipes/test_results.csv?test_id=checkout")
    header = body.decode().splitlines()[0].split(",")
    assert status == 200 and header[-11:-6] == ['"health"', '"health_reasons"', '"multi_variant_users"',
                                                '"events_before_start"', '"future_events"']
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        capped = client.summary("checkout", revenue_cap={"percentile": 90, "nonzero_only": True}).analysis
    _, c = http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&revenue_cap_percentile=90"
                            "&revenue_cap_nonzero_only=true")
    assert [(r["treatment_mean"], r["revenue_cap_threshold"], r["capped_users"]) for r in c["data"]] == [
        (x.treatment_mean, capped.revenue_cap.threshold, capped.revenue_cap.capped_users)
        if x.metric == "revenue_per_user" else (x.treatment_mean, None, None) for x in capped.comparisons]
    assert capped.revenue_cap.threshold > 0 and capped.revenue_cap.capped_users > 0
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        over_time = client.timeseries("checkout", "day", cumulative=True, lift=True, control="variant_a").lifts
    _, lifted = http.json("GET", "/v0/pipes/test_lift.json?test_id=checkout&interval=day&control=variant_a")
    assert [(r["bucket"], r["variant"], r["metric"], r["relative_ci_low"], r["relative_ci_high"]) for r in
            lifted["data"]] == [(when.strftime("%Y-%m-%d %H:%M:%S"), c.variant, c.metric, c.relative.ci_low,
                                 c.relative.ci_high) for when, a in over_time for c in a.comparisons]
    assert len(over_time) > 1 and lifted["data"][0]["control_variant"] == "variant_a"
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        by_age = client.timeseries("checkout", "day", lift=True, since_first_exposure=True, control="variant_a").lifts
    _, aged = http.json("GET", "/v0/pipes/test_lift.json?test_id=checkout&control=variant_a&since_first_exposure=1")
    assert [(r["bucket"], r["age_seconds"], r["variant"], r["relative_lift"]) for r in aged["data"]] == [
        (None, int(age.total_seconds()), c.variant, c.relative.estimate) for age, a in by_age for c in a.comparisons]
    assert by_age and aged["data"]
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        per_session = [c for c in client.summary("checkout", session_metrics=True).analysis.comparisons
                       if c.metric.endswith("_per_session")]
    _, sessions = http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&session_metrics=1")
    assert [(r["variant"], r["metric"], r["relative_lift"]) for r in sessions["data"]
            if r["metric"].endswith("_per_session")] == [(c.variant, c.metric, c.relative.estimate)
                                                         for c in per_session] and per_session
    status, bad = http.json("GET", "/v0/pipes/test_lift.json?test_id=checkout&session_metrics=1")
    assert status == 400 and bad["error"].startswith("session_metrics: applies to Summary")
    status, bad = http.json("GET", "/v0/pipes/test_lift.json?test_id=checkout&revenue_cap_percentile=99")
    assert status == 400 and bad["error"].startswith("analysis.revenue_cap:")
    status, bad = http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&revenue_cap_percentile=100")
    assert status == 400 and bad["error"].startswith("revenue_cap_percentile: must be between 0 and 100")
    status, bad = http.json("GET", "/v0/pipes/test_results.json?test_id=checkout&revenue_cap_nonzero_only=1")
    assert status == 400 and bad["error"].startswith("revenue_cap_nonzero_only:")


def test_every_format_of_a_pipe(http):
    events = tutorial_format(random_events(500, seed=9))
    assert http.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson(events))[0] == 200
    path = "/v0/pipes/test_summary.{}?test_id=checkout&start_date=2025-04-01+00:00:00&end_date=2025-05-31+23:59:59"
    _, as_json = http.json("GET", path.format("json"))
    status, headers, csv_body = http.call("GET", path.format("csv"))
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    lines = csv_body.decode().splitlines()
    assert lines[0] == '"test_id","variant","users","conversions","conversion_rate","total_revenue","revenue_per_user"'
    assert len(lines) == 1 + len(as_json["data"]) and lines[1].startswith('"checkout","control",')
    status, headers, nd = http.call("GET", path.format("ndjson"))
    assert "ndjson" in headers["Content-Type"] and [json.loads(x) for x in nd.decode().splitlines()] == as_json["data"]
    status, headers, parquet = http.call("GET", path.format("parquet"))
    table = pq.read_table(io.BytesIO(parquet))
    assert table.to_pylist() == as_json["data"] and table.schema.field("users").type == pa.uint64()
    status, error = http.json("GET", path.format("xml"))
    assert status == 400 and ".xml" in error["error"]
    status, error = http.json("GET", "/v0/pipes/test_summary.xml")  # refused before the query runs, or is read
    assert status == 400 and error["error"].startswith("format: ") and ".xml" in error["error"], error
    status, error = http.json("GET", path.format("json") + "&q=select+count()+from+_")
    assert status == 400 and error["error"].startswith("q: SQL over a pipe is not supported")
    status, posted = http.json("POST", "/v0/pipes/test_summary.json", b"test_id=checkout&start_date=2025-04-01"
                               b"+00%3A00%3A00&end_date=2025-05-31+23%3A59%3A59",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and posted["data"] == as_json["data"]  # the CLI posts a form for long URLs


def test_every_pipe_answers_in_every_format_and_its_json_is_json(http):
    """Four revenues of 1e308 are each accepted, and their sum is not finite: JSON says null
    there, as ClickHouse writes it (Infinity is no JSON)."""
    events = tutorial_format(random_events(300, seed=9))
    huge = [{**TUTORIAL_EVENT, "test_id": "huge", "user_id": f"h{i}", "variant": v, "revenue": 1e308}
            for i, v in enumerate(["control"] * 4 + ["variant_b"] * 4)]
    bad = [{**TUTORIAL_EVENT, "test_id": "huge", "conversion": 7}]
    assert http.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson(events + huge + bad))[0] == 200

    def strict(payload: bytes):
        return json.loads(payload, parse_constant=lambda c: pytest.fail(f"{c} in {payload[:200]!r}"))

    window = "start_date=2025-04-01+00:00:00&end_date=2025-05-31+23:59:59"
    for test_id in ("checkout", "huge"):
        for pipe in ("test_summary", "test_segments", "test_timeseries", "test_lift", "test_results",
                     "ab_test_events_quarantine"):
            path = f"/v0/pipes/{pipe}.{{}}?test_id={test_id}&{window}"
            status, _, as_json = http.call("GET", path.format("json"))
            assert status == 200, (pipe, as_json)
            data = strict(as_json)["data"]
            status, _, nd = http.call("GET", path.format("ndjson"))
            assert status == 200 and [strict(line) for line in nd.splitlines()] == data, pipe
            status, _, parquet = http.call("GET", path.format("parquet"))
            assert status == 200 and pq.read_table(io.BytesIO(parquet)).num_rows == len(data), (pipe, parquet[:300])
            status, _, csv_body = http.call("GET", path.format("csv"))
            assert status == 200 and len(csv_body.decode().splitlines()) == 1 + len(data), pipe
            if pipe == "test_summary" and test_id == "huge":
                assert [row["total_revenue"] for row in data] == [None, None]
                assert "inf" in csv_body.decode()
    for limit in ("nan", "inf", "-inf", "1e400", "-1", "0", "1.5"):
        status, error = http.json("GET", f"/v0/pipes/ab_test_events_quarantine.json?limit={limit}")
        assert status == 400 and error["error"].startswith("limit: must be a "), (limit, error)


def test_an_end_to_the_second_takes_in_its_whole_second_on_the_results_page_too(http):
    events = [{**TUTORIAL_EVENT, "test_id": "frac", "user_id": "a", "timestamp": "2025-04-28 18:43:20"},
              {**TUTORIAL_EVENT, "test_id": "frac", "user_id": "b", "timestamp": "2025-04-28 18:43:21.500"}]
    assert http.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson(events))[0] == 200
    _, page = http.json("GET", "/api/tests/frac?end=2025-04-28%2018:43:21")
    _, pipe = http.json("GET", "/v0/pipes/test_summary.json?test_id=frac&start_date=2025-04-28+00:00:00"
                               "&end_date=2025-04-28+18:43:21")
    assert sum(v["users"] for v in page["variants"]) == sum(r["users"] for r in pipe["data"]) == 2
    assert page["range"]["end"] == "2025-04-28T18:43:21.999999Z"
    # An end to the minute, the hour or the day takes in all of it (the minute's first second, before).
    for end, last in (("2025-04-28T18:43", "18:43:59"), ("2025-04-28%2018", "18:59:59"), ("2025-04-28", "23:59:59")):
        _, page = http.json("GET", f"/api/tests/frac?end={end}")
        assert sum(v["users"] for v in page["variants"]) == 2, end
        assert page["range"]["end"] == f"2025-04-28T{last}.999999Z"


def test_instants_are_written_to_the_microsecond_rounded_down():
    from abstream.rest.results import iso

    last_of_day = int(dt.datetime(2023, 6, 1, 23, 59, 59, tzinfo=dt.timezone.utc).timestamp()) * 10**9 + 999_999_999
    assert iso(last_of_day) == "2023-06-01T23:59:59.999999Z"  # a float made it 2023-06-02T00:00:00Z
    assert iso(0) == "1970-01-01T00:00:00Z"


def test_a_json_answer_written_in_pieces_is_the_answer_whole():
    """Pipes' JSON is written 10,000 rows per call of the encoder (one call held the GIL for
    seconds with a million rows): the pieces make one document, an infinite value null in any."""
    from abstream.rest import formats
    from abstream.rest.pipes import Answer

    for n in (0, 1, formats.PIECE, 2 * formats.PIECE + 1):
        rows = [{"variant": f"v{i}é", "value": math.inf if i == n - 1 else i / 3} for i in range(n)]
        written = json.loads(formats._json(Answer([("variant", "String"), ("value", "Float64")], rows, 5, 0.5)))
        assert written["data"] == [{**r, "value": None if r["value"] == math.inf else r["value"]} for r in rows]
        assert (written["rows"], written["statistics"]["rows_read"], written["meta"][1]["name"]) == (n, 5, "value")


# ---- bad input ---------------------------------------------------------------------------------------

def test_bad_lines_are_quarantined_one_by_one_and_nothing_valid_is_lost(http):
    good = [{**TUTORIAL_EVENT, "user_id": f"good_{i}"} for i in range(5)]
    lines = [json.dumps(good[0]), "{not json", json.dumps({**TUTORIAL_EVENT, "conversion": "yes"}),
             json.dumps(good[1]), json.dumps({**TUTORIAL_EVENT, "user_id": ""}), "[1, 2]",
             json.dumps({**TUTORIAL_EVENT, "revenue": "lots"}), json.dumps(good[2]),
             json.dumps({**TUTORIAL_EVENT, "timestamp": "28/04/2025"}), "", json.dumps(good[3]) + "\r",
             json.dumps(good[4]), json.dumps({**TUTORIAL_EVENT, "revenue": 10 ** 400})]  # past a float's range
    status, answer = http.json("POST", "/v0/events?name=ab_test_events&wait=true", "\n".join(lines).encode())
    assert status == 200 and answer["successful_rows"] == 5 and answer["quarantined_rows"] == 7, answer
    assert [(r["line"], r["field"]) for r in answer["quarantined"]] == [
        (2, "line"), (3, "conversion"), (5, "user_id"), (6, "line"), (7, "revenue"), (9, "timestamp"), (13, "revenue")]
    assert "not valid JSON" in answer["quarantined"][0]["error"]
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        assert {r.metrics.users for r in client.summary("test_5").rows} == {5}
        assert client.quarantine("").total == 7
    _, q = http.json("GET", "/v0/pipes/ab_test_events_quarantine.json?limit=10")
    assert len(q["data"]) == 7 and {r["field"] for r in q["data"]} == {"line", "conversion", "user_id", "revenue",
                                                                       "timestamp"}
    # a line read up to its bad value is quarantined with the fields read before it: found by its test
    _, of_test = http.json("GET", "/v0/pipes/ab_test_events_quarantine.json?test_id=test_5")
    assert sorted(r["field"] for r in of_test["data"]) == ["conversion", "revenue", "revenue", "timestamp", "user_id"]
    revenue = next(r for r in of_test["data"] if r["field"] == "revenue")
    assert (revenue["user_id"], revenue["variant"], revenue["timestamp"]) == ("user_455", "variant_a",
                                                                               "2025-04-28 18:42:22")


def test_limits_tokens_and_routes_answer_with_their_status_and_a_json_error(tmp_path):
    http = Http(tmp_path, http_max_body_bytes=1 << 20, http_max_upload_bytes=2 << 20)
    try:
        events = "/v0/events?name=ab_test_events"
        for status, body, kwargs in [
            (403, b"{}", {"token": None}),  # no token
            (403, b"{}", {"token": "wrong"}),
            (403, b"{}", {"token": TOKENS["query"]}),  # no ingest scope
        ]:
            got, error = http.json("POST", events, body, **kwargs)
            assert got == status and error["error"] and error["documentation"], error
        assert "Bearer" in http.json("POST", events, b"{}", token=None)[1]["error"]
        assert http.json("GET", "/v0/pipes/test_summary.json?test_id=x", token=TOKENS["ingest"])[0] == 403
        assert http.json("GET", f"/v0/pipes/test_summary.json?test_id=x&token={TOKENS['query']}", token=None)[0] == 200
        assert http.json("POST", "/v0/events?name=other", b"{}")[0] == 404
        assert http.json("POST", "/v0/events", b"{}")[1]["error"].startswith("name: is required")
        assert http.json("GET", "/v0/nothing/here")[0] == 404
        assert http.json("DELETE", "/v0/events")[0] == 405
        status, error = http.json("POST", events, b"x" * (2 << 20))
        assert status == 413 and "1,048,576" in error["error"]
        bomb = gzip.compress(b"\n" * (64 << 20))  # 64 MiB of newlines in ~64 KiB
        status, error = http.json("POST", events, bomb, headers={"Content-Encoding": "gzip"})
        assert status == 413 and "inflated" in error["error"]
        status, error = http.json("POST", events, b"not gzip", headers={"Content-Encoding": "gzip"})
        assert status == 400 and "gzip" in error["error"]
        status, error = http.json("POST", events, bomb)  # gzip without its header, small: sniffed all the same
        assert status == 413 and "inflated" in error["error"]
        small = gzip.compress(ndjson([{**TUTORIAL_EVENT, "user_id": "sniffed"}]))
        status, answer = http.json("POST", events + "&wait=true", small)
        assert (status, answer.get("successful_rows")) == (200, 1), answer
        status, error = http.json("POST", "/v0/sql", b"SELECT 1")
        assert status == 400 and "pipes" in error["error"]
        assert http.json("GET", "/v0/pipes/test_summary.json")[1]["error"].startswith("test_id: is required")
        status, error = http.json("GET", "/v0/pipes/test_summary.json?test_id=t&end_date=2025-13-40")
        assert status == 400 and error["error"].startswith("end_date")
        status, error = http.json("GET", "/v0/pipes/test_summary.json?test_id=" + "t" * 9_000)  # past aiohttp's 8 KiB
        assert status == 400 and error["error"] == "test_id: is 9,000 characters long; at most 4,096", error
        for query, message in [
                ("start_date=2025-05-01&end_date=2025-04-01", "end_date: is before start_date"),
                ("confidence=2", "confidence: must be between 0 and 1 (exclusive), got 2.0"),
                ("revenue_cap_percentile=150", "revenue_cap_percentile: ")]:
            status, error = http.json("GET", f"/v0/pipes/test_results.json?test_id=checkout&{query}")
            assert status == 400 and error["error"].startswith(message), (query, error)
        status, error = http.json("POST", "/v0/datasources?name=ab_test_events&mode=append&url=http://x/y.csv", b"")
        assert status == 400 and error["error"].startswith("url")
        assert http.json("POST", "/v0/datasources?name=ab_test_events&mode=replace", b"")[0] == 400
        # every valid event sent alongside still went in, before and after the refusals
        assert http.json("POST", events + "&wait=true", ndjson([TUTORIAL_EVENT]))[1]["successful_rows"] == 1
        status, headers, _ = http.call("GET", "/v0/nothing")
        assert headers["Content-Type"].startswith("application/json") and headers["X-Request-Id"]
    finally:
        http.stop()


def test_web_pages_may_call_the_api_with_a_token_as_the_platform_lets_them(tmp_path):
    """CORS: a browser's preflight for any route is answered (204, the methods and headers a call
    uses) and every answer, errors too, lets the page's script read it; a server given a list of
    origins answers only those, and a request without Origin (curl, servers) gets no CORS headers."""
    page = {"Origin": "https://dash.example.com"}
    preflight = {**page, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    http = Http(tmp_path)
    try:
        status, headers, body = http.call("OPTIONS", "/v0/events?name=ab_test_events", headers=preflight, token=None)
        assert status == 204 and body == b"" and headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in headers["Access-Control-Allow-Methods"]
        assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                     headers["Access-Control-Allow-Headers"].split(",")}
        status, headers, body = http.call("POST", "/v0/events?name=ab_test_events&wait=true", ndjson([TUTORIAL_EVENT]),
                                          headers=page)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*" and json.loads(body)["successful_rows"] == 1
        assert "X-Request-Id" in headers["Access-Control-Expose-Headers"]
        status, headers, _ = http.call("GET", "/v0/pipes/test_summary.json?test_id=test_5", headers=page, token="wrong")
        assert status == 403 and headers["Access-Control-Allow-Origin"] == "*"  # the page can read why
        status, headers, _ = http.call("GET", "/v0/pipes/test_summary.json?test_id=test_5")
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
    finally:
        http.stop()
    (tmp_path / "listed").mkdir()
    http = Http(tmp_path / "listed", http_cors_origins="https://dash.example.com, https://other.example.com")
    try:
        status, headers, _ = http.call("OPTIONS", "/v0/pipes/test_summary.json", headers=preflight, token=None)
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://dash.example.com"
        assert headers["Vary"] == "Origin"
        stranger = {**preflight, "Origin": "https://evil.example.com"}
        status, headers, _ = http.call("OPTIONS", "/v0/pipes/test_summary.json", headers=stranger, token=None)
        assert status == 405 and "Access-Control-Allow-Origin" not in headers
    finally:
        http.stop()


def test_without_tokens_pages_of_other_sites_may_not_call_and_only_loopback_names_are_answered(tmp_path):
    """A server without tokens answers anyone, so a browser visiting another site must not be
    anyone: a page's form posting events (text/plain needs no CORS), its script reading answers,
    or a DNS name of the site's pointed at 127.0.0.1 (Host) are refused 403 and nothing is
    stored; the server's own pages, listed origins and callers without Origin (curl, SDKs) are
    answered."""
    http = Http(tmp_path, tokens_file="", http_cors_origins="*, https://dash.example.com")
    port = http.base.rsplit(":", 1)[1]
    form = (json.dumps(TUTORIAL_EVENT)[:-1] + ', "x": "="}\r\n').encode()  # what <form enctype="text/plain"> posts
    try:
        for headers in ({"Origin": "https://evil.example", "Content-Type": "text/plain"},
                        {"Origin": "null", "Content-Type": "text/plain"},
                        {"Host": f"rebind.attacker.example:{port}", "Content-Type": "text/plain"},
                        {"Host": "localhost:abc", "Content-Type": "text/plain"}):  # a Host that names no host
            status, answer, body = http.call("POST", "/v0/events?name=ab_test_events&wait=true", form, headers=headers,
                                             token=None)
            assert status == 403 and "no tokens file" in json.loads(body)["error"], (headers, body)
            assert "Access-Control-Allow-Origin" not in answer
        for path in ("/api/tests", "/v0/pipes/test_summary.json?test_id=test_5"):
            status, answer, _ = http.call("GET", path, headers={"Origin": "https://evil.example"}, token=None)
            assert status == 403 and "Access-Control-Allow-Origin" not in answer
            status, _, _ = http.call("GET", path, headers={"Host": f"rebind.attacker.example:{port}"}, token=None)
            assert status == 403
        assert Client(http.grpc).list_tests().rows == []  # none of the posts above stored anything
        for headers in ({}, {"Origin": f"http://127.0.0.1:{port}"}, {"Host": f"localhost:{port}"},
                        {"Origin": "https://dash.example.com"}):
            status, answer, body = http.call("POST", "/v0/events?name=ab_test_events&wait=true",
                                             ndjson([TUTORIAL_EVENT]), headers=headers, token=None)
            assert status == 200 and json.loads(body)["successful_rows"] == 1, (headers, body)
            assert answer.get("Access-Control-Allow-Origin") == headers.get("Origin") if "dash" in str(headers) \
                else "Access-Control-Allow-Origin" not in answer
        assert [t.events for t in Client(http.grpc).list_tests().rows] == [4]
    finally:
        http.stop()


def test_no_length_is_411_and_a_long_chunked_body_is_cut_off(tmp_path):
    import http.client

    server = Http(tmp_path, http_max_body_bytes=1 << 20)
    try:
        port = server.thread.server.http_port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.putrequest("POST", "/v0/events?name=ab_test_events")
        connection.putheader("Authorization", f"Bearer {TOKENS['admin']}")
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 411 and json.loads(response.read())["error"].startswith("a body is required")
        connection.close()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        lines = (json.dumps({**TUTORIAL_EVENT, "user_id": f"u{i}"}).encode() + b"\n" for i in range(20_000))
        connection.request("POST", "/v0/events?name=ab_test_events", body=lines, encode_chunked=True,
                           headers={"Authorization": f"Bearer {TOKENS['admin']}", "Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        assert response.status == 413, response.read()
        connection.close()
    finally:
        server.stop()


def test_bodies_that_stall_are_answered_408_and_never_hold_every_reader(tmp_path):
    """Every reader held by a client that sent a few bytes and then nothing: other bodies wait
    only until those are timed out, and the stalled ones learn why."""
    import socket
    import time

    server = Http(tmp_path, max_ingest_streams=2, http_body_idle_seconds=1.0)
    stalled = []
    try:
        port = server.thread.server.http_port
        for path in ("/v0/events?name=ab_test_events", "/v0/datasources?name=ab_test_events&format=ndjson"):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['admin']}\r\n"
                      f"Content-Length: 5000000\r\n\r\n".encode() + ndjson([TUTORIAL_EVENT]))
            stalled.append(s)
        time.sleep(0.3)  # both readers are taken, waiting for the rest of their bodies
        deadline = time.monotonic() + 20
        refusals = []
        while True:  # told to retry (429) at once while the stalled bodies hold both readers, then stored
            status, headers, payload = server.call("POST", "/v0/events?name=ab_test_events&wait=true",
                                                   ndjson([{**TUTORIAL_EVENT, "user_id": "after"}]))
            answer = json.loads(payload)
            if status != 429 or time.monotonic() > deadline:
                break
            refusals.append((headers, answer))
            time.sleep(0.2)
        assert (status, answer.get("successful_rows")) == (200, 1), answer
        assert refusals, "a body that found every reader taken waited instead of being told to retry"
        assert all("Retry-After" in h and "X-RateLimit-Limit" not in h and "being read" in a["error"]
                   for h, a in refusals), refusals
        for s, what in zip(stalled, ("the body", "the upload")):
            reply = b""
            while b"}" not in reply:
                piece = s.recv(4096)
                assert piece, reply
                reply += piece
            head, _, payload = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), head
            assert json.loads(payload)["error"] == f"{what} stalled: nothing came for 1 s (--http-body-idle-seconds)"
    finally:
        for s in stalled:
            s.close()
        server.stop()


def test_a_refusal_for_memory_says_when_to_retry_and_no_rate_limit(tmp_path):
    """Above the memory high-water mark ingest is refused 429 with Retry-After; the X-RateLimit
    headers, which clients read as the token's own limit, are for a token over its rate only."""
    server = Http(tmp_path, memory_high_water_bytes=1)
    try:
        status, headers, payload = server.call("POST", "/v0/events?name=ab_test_events", ndjson([TUTORIAL_EVENT]))
        assert status == 429 and "high-water mark" in json.loads(payload)["error"], payload
        assert int(headers["Retry-After"]) >= 1
        assert not {h for h in headers if h.startswith("X-RateLimit")}, headers
    finally:
        server.stop()


def test_a_query_past_the_servers_longest_is_stopped_and_answered_504(tmp_path):
    """HTTP callers give no deadline: --max-query-seconds is theirs (here shorter than any query)."""
    server = Http(tmp_path, max_query_seconds=1e-9)
    try:
        assert server.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson([TUTORIAL_EVENT]))[0] == 200
        status, error = server.json("GET", "/v0/pipes/test_summary.json?test_id=test_5")
        assert status == 504 and "--max-query-seconds" in error["error"], error
        with Client(server.grpc, token=TOKENS["admin"]) as client:
            with pytest.raises(grpc.RpcError) as stopped:
                client.summary("test_5", timeout=30)  # a longer deadline of the caller's: the server's is shorter
        assert stopped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        server.stop()


def test_a_body_that_trickles_in_is_answered_408_once_below_the_slowest_pace(tmp_path):
    """A byte every 0.3 s never leaves --http-body-idle-seconds (1 s) without one, and held a
    reader for as long as the client liked: past that first second, a body must average
    MIN_BODY_RATE. A small body (read at once) gets its length's allowance, not one idle period."""
    import socket

    from abstream.rest.app import MIN_BODY_RATE

    server = Http(tmp_path, http_body_idle_seconds=1.0)
    port = server.thread.server.http_port
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"POST /v0/events?name=ab_test_events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  f"{TOKENS['admin']}\r\nContent-Length: 5000000\r\n\r\n".encode())
        s.settimeout(0.3)
        reply, started = b"", time.monotonic()
        while b"}" not in reply and time.monotonic() - started < 8:
            try:
                s.sendall(b" ")
                reply += s.recv(4096)
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                break
        s.close()
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"came too slowly" in payload, reply
        assert time.monotonic() - started < 5
        # 200 KB, read at once, coming at 4 times the slowest pace: over 1 s, and taken
        line = ndjson([TUTORIAL_EVENT])
        small = line * (200_000 // len(line))
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"POST /v0/events?name=ab_test_events&wait=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  f"{TOKENS['admin']}\r\nContent-Length: {len(small)}\r\nConnection: close\r\n\r\n".encode())
        step = 4 * MIN_BODY_RATE // 10
        for at in range(0, len(small), step):
            s.sendall(small[at:at + step])
            time.sleep(0.1)
        reply = b""
        while piece := s.recv(65536):
            reply += piece
        s.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    finally:
        server.stop()


def test_health_says_what_sources_are_doing_only_to_a_caller_with_a_token(tmp_path):
    """Probes need no token and get each status; a source's state names its brokers (and a
    stopped server's error its hosts): said to a caller with a token, when tokens are needed."""
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    server = Http(tmp_path, kafka_bootstrap=f"127.0.0.1:{port}", kafka_topic="t")
    try:
        status, anonymous = server.json("GET", "/health", token=None)
        assert status == 200 and set(anonymous["kafka"]) == {"status"}, anonymous
        assert str(port) not in json.dumps(anonymous)
        status, told = server.json("GET", "/health", token=TOKENS["query"])
        assert status == 200 and "state" in told["kafka"], told
        status, wrong = server.json("GET", "/health", token="not-a-token")
        assert status == 200 and set(wrong["kafka"]) == {"status"}, wrong
    finally:
        server.stop()
    (tmp_path / "open").mkdir()
    open_server = Http(tmp_path / "open", tokens_file="", kafka_bootstrap=f"127.0.0.1:{port}", kafka_topic="t")
    try:  # without tokens (loopback only) everyone is told
        status, told = open_server.json("GET", "/health", token=None)
        assert status == 200 and "state" in told["kafka"], told
    finally:
        open_server.stop()


def test_events_of_tests_a_token_may_not_write_are_said_refused_not_quarantined(tmp_path):
    """Such events are in no quarantine (a rival token would read them there): the answer counted
    them as quarantined rows all the same."""
    tokens = tmp_path / "team.toml"
    tokens.write_text(f'[[token]]\nname = "team"\nsha256 = "{hash_token("tok-team")}"\nscopes = ["ingest", "query"]\n'
                      'test_prefix = "chk_"\n')
    server = Http(tmp_path, tokens_file=str(tokens))
    try:
        rows = [dict(TUTORIAL_EVENT, test_id="chk_1"), dict(TUTORIAL_EVENT, test_id="other_1"),
                dict(TUTORIAL_EVENT, test_id="chk_1", conversion=7)]
        # and a line that is no JSON, and an event without a test id: rejected, not refused
        body = ndjson(rows) + b"{not json\n" + ndjson([dict(TUTORIAL_EVENT, test_id="")])
        status, answer = server.json("POST", "/v0/events?name=ab_test_events&wait=true", body, token="tok-team")
        assert status == 200, answer
        assert (answer["successful_rows"], answer["quarantined_rows"], answer["refused_rows"]) == (1, 3, 1), answer
        assert [(r["line"], r["field"]) for r in answer["quarantined"]][0] == (3, "conversion")
        assert sorted(r["line"] for r in answer["quarantined"]) == [3, 4, 5]
        assert [(r["line"], r["field"]) for r in answer["refused"]] == [(2, "test_id")]
        assert "may only write tests whose id starts with 'chk_'" in answer["refused"][0]["error"]
        status, appended = server.json("POST", "/v0/datasources?name=ab_test_events&mode=append&format=ndjson",
                                       ndjson(rows), token="tok-team")
        assert status == 200 and appended["quarantine_rows"] == 1 and appended["refused_rows"] == 1, appended
        assert appended["error"] == ("There was an error with file contents: 1 rows in quarantine and 1 rows refused "
                                     "(tests this token may not write).")
    finally:
        server.stop()


def test_a_series_too_long_for_an_http_answer_is_refused_and_grpc_still_answers_it(http):
    """An HTTP answer is written whole (~900 bytes a row at its peak): it has at most
    MAX_HTTP_POINTS rows; gRPC answers a longer one (columns, streamed by the wire)."""
    from abstream.core.types import MAX_HTTP_POINTS

    minutes = MAX_HTTP_POINTS // 2 + 1  # an event a minute in each of 2 variants
    first = int(dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc).timestamp())
    n = 2 * minutes
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        client.ingest_table(pa.table({
            "timestamp": pa.array([(first + 60 * (i // 2)) * 10**9 for i in range(n)], pa.timestamp("ns", "UTC")),
            "user_id": [f"u{i}" for i in range(n)], "test_id": ["wide"] * n, "variant": ["a", "b"] * minutes,
            "event_type": ["view"] * n, "conversion": [0] * n, "revenue": [0.0] * n, "session_id": ["s"] * n,
            "device": ["d"] * n, "country": ["c"] * n}))
        series = client.timeseries("wide", "minute", dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc),
                                   dt.datetime(2025, 12, 31, tzinfo=dt.timezone.utc))
        assert len(series.rows) == n
    window = "start_date=2025-01-01%2000:00:00&end_date=2025-12-31%2000:00:00"
    status, error = http.json("GET", f"/v0/pipes/test_timeseries.json?test_id=wide&interval=minute&{window}")
    assert status == 400 and f"{MAX_HTTP_POINTS:,}" in error["error"] and f"{n:,} points" in error["error"], error
    status, answer = http.json("GET", f"/v0/pipes/test_timeseries.json?test_id=wide&interval=hour&{window}")
    assert status == 200 and sum(r["events"] for r in answer["data"]) == n
    # A lift gives up to a row per metric a point: a quarter as many points.
    lifts = "start_date=2025-01-01%2000:00:00&end_date=2025-01-18%2008:40:00"  # 25,001 minutes
    status, error = http.json("GET", f"/v0/pipes/test_lift.json?test_id=wide&interval=minute&{lifts}")
    assert status == 400 and f"the {MAX_HTTP_POINTS // 4:,} a series with lifts" in error["error"], error
    assert "25,001 buckets x 2 variants would be 50,002 points" in error["error"], error


def test_rate_limits_say_when_to_retry(tmp_path):
    server = Http(tmp_path, tokens_file=str(tokens_file(tmp_path / "slow.toml", rates={"ingest": 10})))
    try:
        body = ndjson([{**TUTORIAL_EVENT, "user_id": f"u{i}"} for i in range(50)])
        statuses = []
        for _ in range(3):
            status, headers, payload = server.call("POST", "/v0/events?name=ab_test_events", body, token=TOKENS["ingest"])
            statuses.append(status)
        assert 429 in statuses, statuses
        status, headers, payload = server.call("POST", "/v0/events?name=ab_test_events", body, token=TOKENS["ingest"])
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert int(headers["X-RateLimit-Limit"]) == 10 and headers["X-RateLimit-Remaining"] == "0"
        assert int(headers["X-RateLimit-Reset"]) == int(headers["Retry-After"])
        assert "ingest rate" in json.loads(payload)["error"]
        server.thread.server.core.draining = True
        status, error = server.json("POST", "/v0/events?name=ab_test_events", body)
        assert status == 503 and "shutting down" in error["error"]
        assert server.json("GET", "/health", token=None)[0] == 503
    finally:
        server.thread.server.core.draining = False
        server.stop()


def test_gzip_bodies_of_several_members_are_read_whole_and_a_cut_one_is_refused(tmp_path):
    """`gzip >>`, pigz and log shippers write gzip files of several members, one after the
    other: every member's rows go in (the members after the first were dropped, and the answer
    said 200). A body that ends inside a member was cut short: 400."""
    server = Http(tmp_path, tokens_file="")
    try:
        events = "/v0/events?name=ab_test_events&wait=true"
        first = ndjson([{**TUTORIAL_EVENT, "user_id": f"m1-{i}"} for i in range(3)])
        second = ndjson([{**TUTORIAL_EVENT, "user_id": f"m2-{i}"} for i in range(4)])
        members = gzip.compress(first) + gzip.compress(second)
        for headers in ({"Content-Encoding": "gzip"}, {}):  # declared, or sniffed from its first bytes
            status, answer = server.json("POST", events, members, headers=headers, token=None)
            assert (status, answer["successful_rows"]) == (200, 7), answer
        many = ndjson([{**TUTORIAL_EVENT, "user_id": f"m3-{i}"} for i in range(5000)])
        padded = gzip.compress(many) + gzip.compress(second) + b"\0" * 512  # zeros after the last: allowed
        status, answer = server.json("POST", events, padded, headers={"Content-Encoding": "gzip"}, token=None)
        assert (status, answer["successful_rows"]) == (200, 5004), answer
        status, answer = server.json("POST", "/v0/datasources?name=ab_test_events&format=ndjson", members, token=None)
        assert (status, answer["successful_rows"]) == (200, 7), answer
        # Sniffed from its first two bytes even when they come apart (a first chunk of one byte).
        with socket.create_connection(("127.0.0.1", server.thread.server.http_port), timeout=10) as client:
            client.sendall(f"POST {events} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "1\r\n".encode() + members[:1] + b"\r\n")
            time.sleep(0.3)
            client.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(members) - 1, members[1:]))
            response = HTTPResponse(client)
            response.begin()
            answer = json.loads(response.read())
        assert (response.status, answer["successful_rows"]) == (200, 7), answer
        for cut in (members[:-20], b"\x1f\x8b"):
            status, error = server.json("POST", events, cut, headers={"Content-Encoding": "gzip"}, token=None)
            assert status == 400 and "ends inside a gzip member: cut short?" in error["error"], error
        status, error = server.json("POST", events, members + b"not gzip", headers={"Content-Encoding": "gzip"},
                                    token=None)
        assert status == 400 and "is not valid gzip" in error["error"], error
    finally:
        server.stop()


def test_forms_the_server_cannot_read_are_refused_with_what_is_wrong(tmp_path):
    """Forms without a boundary or with a wrong one, bytes their charset cannot decode, a charset
    nobody knows, a file where a parameter goes, a compressed form: 400 (415), never 500; a form
    nested in the upload's form is passed over for the file part after it."""
    server = Http(tmp_path, tokens_file="")
    event = ndjson([{**TUTORIAL_EVENT, "user_id": "formed"}])
    append, summary = "/v0/datasources?name=ab_test_events&format=ndjson", "/v0/pipes/test_summary.json"

    def form(*parts: tuple[str, str, bytes]) -> bytes:
        return b"".join(b"--OUT\r\n" + f"Content-Disposition: form-data; {disposition}\r\nContent-Type: {kind}\r\n\r\n"
                        .encode() + data + b"\r\n" for disposition, kind, data in parts) + b"--OUT--\r\n"

    nested = b"--IN\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nhello\r\n--IN--\r\n"
    try:
        for path, kind, body, status, words in [
                (append, "multipart/form-data", event, 400, "body: is not a multipart form"),
                (append, "multipart/form-data; boundary=XX", b"hello world no boundary here", 400, "body: is not a "),
                (append, "multipart/whatever; boundary=XX", event, 400, "body: is not a "),
                (summary, "multipart/form-data; boundary=OUT",
                 form(('name="test_id"; filename="t.txt"', "text/plain", b"x")), 400, "test_id: must be text, not a file"),
                (summary, "multipart/form-data", b"test_id=x", 400, "body: is not a form"),
                (summary, "application/x-www-form-urlencoded", b"test_id=\xff", 400, "body: is not a form"),
                (summary, "application/x-www-form-urlencoded; charset=bogus", b"test_id=x", 400, "body: is not a form"),
                (summary, "multipart/form-data; boundary=OUT",
                 form(('name="test_id"', "text/plain; charset=nonexistent", b"x")), 400, "body: is not a form")]:
            status_got, _, payload = server.call("POST", path, body, headers={"Content-Type": kind}, token=None)
            assert (status_got, json.loads(payload)["error"].startswith(words)) == (status, True), (path, kind, payload)
        status, _, payload = server.call("POST", summary, b"test_id=" + b"x" * (17 << 20), token=None,
                                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 413 and json.loads(payload)["error"].endswith("exceeded (--http-max-body-bytes)"), payload
        status, _, payload = server.call("POST", summary, gzip.compress(b"test_id=x"), token=None, headers={
            "Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip"})
        assert status == 415 and "without a Content-Encoding" in json.loads(payload)["error"]
        status, answer = server.json("POST", append, form(('name="inner"', "multipart/mixed; boundary=IN", nested),
                                                          ('name="ndjson"; filename="e.ndjson"', "text/plain", event)),
                                     headers={"Content-Type": "multipart/form-data; boundary=OUT"}, token=None)
        assert (status, answer.get("successful_rows")) == (200, 1), answer
    finally:
        server.stop()


def test_requests_that_froze_the_server_or_answered_500_are_answered_as_documented(tmp_path):
    """A CSV header of 2 MB of `,"` (the delimiter's sniffing took time in its length squared,
    holding the GIL: hours); conversions of Unicode digits or two minus signs (int() raised:
    500, the rest of the body unread); header bytes that are not UTF-8 in a token or an
    Idempotency-Key; a multipart part with a malformed header; a Parquet file whose footer
    pyarrow cannot read; a chunked form-encoded append larger than a body taken whole."""
    import http.client

    server = Http(tmp_path, http_max_body_bytes=1 << 20)
    append = "/v0/datasources?name=ab_test_events&format="
    try:
        status, answer = server.json("POST", append + "csv", gzip.compress(b',"' * (1 << 20) + b"\n"),
                                     headers={"Content-Encoding": "gzip"})
        assert status == 400 and "column" in answer["error"], answer
        status, answer = server.json("POST", append + "csv", b'"' + b"x" * 200_000 + b'",timestamp\n')
        assert status == 400 and "header line cannot be read as CSV" in answer["error"], answer

        lines = [{**TUTORIAL_EVENT, "user_id": f"digits_{k}", "conversion": c} for k, c in enumerate(["--1", "\u00b2", 1])]
        status, answer = server.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson(lines))
        assert (status, answer["successful_rows"], answer["quarantined_rows"]) == (200, 1, 2), answer
        assert all(q["field"] == "conversion" for q in answer["quarantined"]), answer

        def raw(path: str, headers: dict[str, bytes], body: bytes = b"") -> tuple[int, dict]:
            connection = http.client.HTTPConnection(server.base.split("//")[1], timeout=60)
            connection.putrequest("POST" if body else "GET", path)
            for name, value in {**headers, "Content-Length": str(len(body)).encode()}.items():
                connection.putheader(name, value)
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, json.loads(response.read())

        status, answer = raw("/v0/workspace", {"Authorization": b"Bearer tok-\xffadmin"})
        assert status in (401, 403) and "token" in answer["error"], (status, answer)
        status, answer = raw("/v0/events?name=ab_test_events", {"Authorization": f"Bearer {TOKENS['admin']}".encode(),
                                                                 "Idempotency-Key": b"k\xfe"}, ndjson([TUTORIAL_EVENT]))
        assert status == 400 and answer["error"].startswith("Idempotency-Key") and "UTF-8" in answer["error"], answer

        part = b'--BB\r\nContent-Disposition: form-data; name="test_id"\r\ngarbage\r\n\r\nx\r\n--BB--\r\n'
        for path in ("/v0/pipes/test_summary.json", append + "csv"):
            status, answer = server.json("POST", path, part, headers={"Content-Type": "multipart/form-data; boundary=BB"})
            assert status == 400 and answer["error"].startswith("body: is not a"), (path, answer)

        status, answer = server.json("POST", append + "parquet", b"PAR1" + b"\0" * 20 + b"\x14\0\0\0" + b"PAR1")
        assert status == 400 and "not a Parquet file" in answer["error"], answer

        csv_text = "timestamp,user_id,test_id,variant\n" + "".join(
            f"2025-04-28 18:42:22,chunked_{k},chunked_test,a\n" for k in range(40_000))  # ~1.8 MB
        assert len(csv_text) > 1 << 20
        request = urllib.request.Request(server.base + append + "csv", data=iter([csv_text.encode()]), method="POST",
                                         headers={"Authorization": f"Bearer {TOKENS['admin']}",
                                                  "Content-Type": "application/x-www-form-urlencoded",
                                                  "Transfer-Encoding": "chunked"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert (response.status, json.loads(response.read())["successful_rows"]) == (200, 40_000)
    finally:
        server.stop()


def test_a_body_of_mostly_unreadable_lines_is_read_no_further_than_the_quarantine_holds(tmp_path):
    """Each unreadable line costs ~15 times an event to store (its rejection, its quarantine row):
    past MOST_UNREADABLE_LINES of them a body is read no further, 400, saying what went in."""
    from abstream.sources.ingest import MOST_UNREADABLE_LINES

    server = Http(tmp_path, tokens_file="")
    try:
        junk = b"not an event at all\n" * (MOST_UNREADABLE_LINES + 20_000)  # streamed: past SMALL_BODY_BYTES
        lines = ndjson([{**TUTORIAL_EVENT, "user_id": "before"}]) + junk + ndjson([{**TUTORIAL_EVENT, "user_id": "x"}])
        status, error = server.json("POST", "/v0/events?name=ab_test_events&wait=true", lines, token=None)
        assert (status, error["error"]) == (400, f"body: more than {MOST_UNREADABLE_LINES:,} lines of body could not "
                                                 "be read as events: the rest of it was not read (1 rows before it "
                                                 "were stored)"), error
        status, answer = server.json("POST", "/v0/events?name=ab_test_events&wait=true",
                                     b"x\n" * 1000 + ndjson([{**TUTORIAL_EVENT, "user_id": "after"}]), token=None)
        assert (status, answer["successful_rows"], answer["quarantined_rows"]) == (200, 1, 1000), answer
    finally:
        server.stop()


def test_a_body_of_events_the_rules_reject_is_read_no_further_than_unreadable_lines_are(tmp_path):
    """`{}` reads as an event and fails the rules: it costs what an unreadable line does, and a
    body of them (1M in 3 MB) stops alike once more than MOST_UNREADABLE_LINES were rejected."""
    from abstream.sources.ingest import MOST_UNREADABLE_LINES

    server = Http(tmp_path, tokens_file="", quarantine_limit=2_000_000)  # room to keep them all
    try:
        body = ndjson([{**TUTORIAL_EVENT, "user_id": "before"}]) + b"{}\n" * 1_000_000 + \
            ndjson([{**TUTORIAL_EVENT, "user_id": "after"}])
        status, error = server.json("POST", "/v0/events?name=ab_test_events&wait=true", body, token=None)
        assert status == 400 and f"more than {MOST_UNREADABLE_LINES:,} of its events were rejected" in error["error"] \
            and "(1 rows before it were stored)" in error["error"], error
        with Client(server.grpc) as client:
            assert sum(r.metrics.events for r in client.summary("test_5").rows) == 1  # not "after"
            assert client.quarantine("").total < 1_000_000
    finally:
        server.stop()


def test_a_body_refused_part_way_says_how_many_rows_went_in(tmp_path):
    """A body read in chunks of 5,000 lines: the first goes in (a full bucket takes a batch above
    its rate alone), the next is over the token's rate. The 429 says how many rows were stored,
    so that the client can send only the rest."""
    server = Http(tmp_path, tokens_file=str(tokens_file(tmp_path / "slow.toml", rates={"ingest": 1000})))
    try:
        body = ndjson([{**TUTORIAL_EVENT, "user_id": f"u{i}"} for i in range(12_000)])
        status, headers, payload = server.call("POST", "/v0/events?name=ab_test_events&wait=true", body,
                                               token=TOKENS["ingest"])
        error = json.loads(payload)["error"]
        assert status == 429 and "over its ingest rate" in error and error.endswith("(5,000 rows before it were stored)")
        assert int(headers["Retry-After"]) >= 1
    finally:
        server.stop()


# ---- exactly once, files ---------------------------------------------------------------------------

def test_an_idempotency_key_stores_a_request_once_across_restarts(tmp_path):
    server = Server(tmp_path / "data").start()
    base = f"http://{server.http_address}"

    def send(key: str) -> dict:
        request = urllib.request.Request(f"{base}/v0/events?name=ab_test_events&wait=true", method="POST",
                                         data=ndjson([{**TUTORIAL_EVENT, "user_id": f"u{i}"} for i in range(30)]),
                                         headers={"Idempotency-Key": key})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    assert send("order-1")["successful_rows"] == 30
    again = send("order-1")
    assert again["successful_rows"] == 0 and again["already_stored_rows"] == 30
    server.kill()
    server.start()
    base = f"http://{server.http_address}"
    assert send("order-1")["already_stored_rows"] == 30
    assert send("order-2")["successful_rows"] == 30
    with Client(server.address) as client:
        assert sum(r.metrics.events for r in client.summary("test_5").rows) == 60


def test_a_parquet_upload_is_read_within_what_its_rows_could_hold_and_in_batches_of_the_servers_limit(tmp_path):
    """A Parquet upload of a few KB can decode to gigabytes: a 20 KB value kept once in a
    dictionary for 5,000 rows is read as that dictionary (its rows refused for its length, the
    server's memory unmoved), and row groups whose event columns uncompress to more than their
    rows could hold as events are refused unread. Bodies are stored in batches of at most
    --max-batch-events, as gRPC's are."""
    from tests.test_hostile import peak_growth

    long = "x" * 20_000
    repeated = tmp_path / "repeated.parquet"  # one value, a dictionary page: ~20 KB on disk, 100 MB read plain
    pq.write_table(pa.table({**{k: [v] * 5_000 for k, v in TUTORIAL_EVENT.items()}, "user_id": [long] * 5_000}),
                   repeated, compression="zstd")
    distinct = tmp_path / "distinct.parquet"  # 5,000 values, plain: 100 MB uncompressed, compressed to little
    pq.write_table(pa.table({**{k: [v] * 5_000 for k, v in TUTORIAL_EVENT.items()},
                             "session_id": [f"{i:06d}{long}" for i in range(5_000)]}),
                   distinct, compression="zstd", use_dictionary=False)
    wide = tmp_path / "wide.parquet"  # the same as large strings, as Polars writes them
    pq.write_table(pa.table({**{k: [v] * 5_000 for k, v in TUTORIAL_EVENT.items()},
                             "user_id": pa.array([long] * 5_000, pa.large_string())}), wide, compression="zstd")
    assert repeated.stat().st_size < 1 << 20 and distinct.stat().st_size < 4 << 20 and wide.stat().st_size < 1 << 20
    server = Server(tmp_path / "data").start()
    base = f"http://{server.http_address}"

    def post(path: Path) -> tuple[int, dict]:
        request = urllib.request.Request(f"{base}/v0/datasources?name=ab_test_events&mode=append&format=parquet",
                                         data=path.read_bytes(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        answers = []
        assert peak_growth(server, lambda: answers.append(post(repeated))) < 64 << 20
        assert peak_growth(server, lambda: answers.append(post(wide))) < 64 << 20
        for status, answer in answers:
            assert status == 200 and answer["quarantine_rows"] == 5_000, answer
        status, answer = post(distinct)
        assert status == 400 and "row group 0 of" in answer["error"], answer
        assert "bytes of event columns uncompressed, more than its 5,000 rows could as events" in answer["error"]
    finally:
        server.terminate()
    server = Server(tmp_path / "limited", "--max-batch-events", "10").start()
    base = f"http://{server.http_address}"
    try:
        lines = ndjson([{**TUTORIAL_EVENT, "user_id": f"u{i}"} for i in range(25)])

        def send(body: bytes) -> dict:
            request = urllib.request.Request(f"{base}/v0/events?name=ab_test_events&wait=true", data=body,
                                             method="POST", headers={"Idempotency-Key": "k"})
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        # In batches of at most 10, each a sequence of the key's producer: all 25 lines after the
        # first 15 are those batches again (stored already) and at least one more, of the lines
        # after them (one batch of 5,000 lines would be the first body's again, a duplicate whole).
        assert send(b"".join(lines.splitlines(keepends=True)[:15]))["successful_rows"] == 15
        again = send(lines)
        assert again["successful_rows"] + again["already_stored_rows"] == 25, again
        assert 0 < again["successful_rows"] <= 10 and again["already_stored_rows"] >= 15, again
    finally:
        server.terminate()


def test_a_large_upload_streams_in_without_being_held_whole(tmp_path):
    server = Server(tmp_path / "data", "--http-max-upload-bytes", str(1 << 30)).start()
    path = tmp_path / "big.ndjson"
    n = 100_000
    padding = "x" * 2000  # a field that is not an event's: read past, so the events stored are small
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({**TUTORIAL_EVENT, "user_id": f"user_{i}", "extra": padding}) + "\n")
    size = path.stat().st_size

    def status_kb(field: str) -> int:
        text = Path(f"/proc/{server.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field)))

    before = status_kb("VmRSS:")
    with open(path, "rb") as body:
        request = urllib.request.Request(f"http://{server.http_address}/v0/datasources?name=ab_test_events"
                                         "&mode=append&format=ndjson", data=body, method="POST",
                                         headers={"Content-Length": str(size), "Content-Type": "application/x-ndjson"})
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    assert answer["successful_rows"] == n and answer["error"] is False
    grown = (status_kb("VmHWM:") - before) * 1024
    assert grown < size / 2, (grown, size)  # the file (~210 MB) never sat in the server whole
    with Client(server.address) as client:
        assert sum(r.metrics.events for r in client.summary("test_5").rows) == n


def test_datasources_describe_and_take_csv_ndjson_and_parquet(http, tmp_path):
    csv_body = b"timestamp;user_id;test_id;variant;conversion;revenue;campaign\n2025-04-28 18:42:22;c1;files;A;1;2.5;x\n"
    status, answer = http.json("POST", "/v0/datasources?name=ab_test_events&mode=append&format=csv", csv_body,
                               headers={"Content-Type": "text/csv"})
    assert status == 200 and answer["successful_rows"] == 1 and "campaign" in answer["warnings"][0]
    table = pa.table({"timestamp": pa.array([dt.datetime(2025, 4, 28, tzinfo=dt.timezone.utc)] * 3),
                      "user_id": ["p1", "p2", "p3"], "test_id": ["files"] * 3, "variant": ["B"] * 3,
                      "conversion": pa.array([1, 0, 5], pa.int64())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    boundary = "abstreamboundary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"ndjson\"; filename=\"ndjson\"\r\n\r\n"
                 .encode() + sink.getvalue().to_pybytes() + f"\r\n--{boundary}--\r\n".encode())
    status, answer = http.json("POST", "/v0/datasources?name=ab_test_events&mode=append&format=parquet", multipart,
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and answer["successful_rows"] == 2 and answer["quarantine_rows"] == 1
    assert answer["error"] == "There was an error with file contents: 1 rows in quarantine."
    assert answer["quarantined"] == [{"line": 3, "field": "conversion", "error": "conversion must be 0 or 1, got 5"}]
    gz = gzip.compress(ndjson([{**TUTORIAL_EVENT, "test_id": "files", "user_id": "g1"}]))
    status, answer = http.json("POST", "/v0/datasources?name=ab_test_events&mode=append&format=ndjson", gz,
                               headers={"Content-Encoding": "gzip"})
    assert status == 200 and answer["successful_rows"] == 1
    status, described = http.json("GET", "/v0/datasources/ab_test_events")
    assert status == 200 and described["statistics"]["row_count"] == 4
    assert dt.datetime.strptime(described["created_at"], "%Y-%m-%d %H:%M:%S.%f")
    _, listed = http.json("GET", "/v0/datasources")
    assert [d["name"] for d in listed["datasources"]] == ["ab_test_events", "ab_test_events_quarantine"]
    assert listed["datasources"][1]["statistics"]["row_count"] == 1
    assert http.json("GET", "/v0/datasources/other")[0] == 404
    status, ws = http.json("GET", "/v0/workspace")
    assert status == 200 and {"id", "name", "user_email", "user_id", "scope"} <= set(ws) and ws["scope"] == "admin"
    assert http.json("GET", "/v1/workspace")[1] == ws
    assert http.json("GET", "/v0/regions")[1] == {"regions": []}


# ---- the platform's own clients ----------------------------------------------------------------------

def tb_env(home: Path) -> dict:
    return {"PATH": f"{TB.parent}:{os.environ['PATH']}", "HOME": str(home), "TB_CLI_TELEMETRY_OPTOUT": "1",
            "TB_VERSION_WARNING": "0", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost", "LANG": "C.UTF-8"}


def tb(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(TB), *args], capture_output=True, text=True, timeout=120, cwd=home,
                          env={**tb_env(home), **(env or {})})


def test_a_query_whose_client_went_away_is_stopped_not_run_to_its_end(tmp_path):
    """aiohttp runs a handler to its end after its client has gone: a query's is cancelled once
    the connection closes (counted as 499), and its thread stops at its next check instead of
    computing an answer nobody reads, for up to --max-query-seconds (60 s)."""
    import threading

    from abstream.core.errors import DeadlineExceeded

    server = Http(tmp_path)
    engine, metrics = server.thread.server.core.engine, server.thread.server.metrics
    answer, begun, release, outcome = engine.summary, threading.Event(), threading.Event(), []

    def held(q):
        begun.set()
        release.wait(30)
        try:
            result = answer(q)
        except DeadlineExceeded as error:
            outcome.append(str(error))
            raise
        outcome.append("answered")
        return result

    engine.summary = held
    try:
        with socket.create_connection(("127.0.0.1", server.thread.server.http_port), timeout=10) as client:
            client.sendall(b"GET /v0/pipes/test_summary.json?test_id=gone HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Authorization: Bearer " + TOKENS["query"].encode() + b"\r\n\r\n")
            assert begun.wait(10)
        gone = metrics.http_requests.labels("pipe", "499")
        deadline = time.monotonic() + 10
        while gone._value.get() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gone._value.get() == 1
        release.set()
        deadline = time.monotonic() + 10
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outcome == ["the caller went away; the query was stopped"]
        # One whose client waits is answered as ever.
        engine.summary = answer
        status, payload = server.json("GET", "/v0/pipes/test_summary.json?test_id=gone", token=TOKENS["query"])
        assert status == 200 and payload["data"] == [], payload
    finally:
        release.set()
        server.stop()


def test_the_list_of_tests_analyses_only_the_tests_that_changed_since_it_was_last_asked_for(http):
    """Every viewer's page asks for the list every few seconds, and each ask analysed every test
    (up to 200 Summaries); a test unchanged since keeps the badge it had."""
    engine = http.thread.server.core.engine
    summary, asked = engine.summary, []

    def counted(query):
        asked.append(query.test_id)
        return summary(query)
    engine.summary = counted
    for test_id in ("idle_a", "idle_b", "busy"):
        events = [{**TUTORIAL_EVENT, "test_id": test_id, "user_id": f"{test_id}{i}", "variant": "AB"[i % 2],
                   "conversion": i % 3 == 0} for i in range(40)]
        assert http.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson(events))[0] == 200
    first = http.json("GET", "/api/tests")[1]["tests"]
    assert sorted(asked) == ["busy", "idle_a", "idle_b"]
    asked.clear()
    again = http.json("GET", "/api/tests")[1]["tests"]
    assert asked == [] and [(t["test_id"], t["status"]) for t in again] == [(t["test_id"], t["status"]) for t in first]
    more = [{**TUTORIAL_EVENT, "test_id": "busy", "user_id": "late", "timestamp": "2025-04-29 10:00:00"}]
    assert http.json("POST", "/v0/events?name=ab_test_events&wait=true", ndjson(more))[0] == 200
    http.json("GET", "/api/tests")
    assert asked == ["busy"]


def test_a_body_whose_client_left_part_way_is_counted_499_not_as_the_servers_or_the_clients_error(tmp_path):
    """A client that closes its connection mid-body is gone, not wrong: its request was counted
    500 with a traceback logged (a small body, read whole) or 400 (a streamed one)."""
    server = Http(tmp_path)
    counted = server.thread.server.metrics.http_requests
    try:
        for length in (1000, 5 << 20):  # read whole, and streamed
            with socket.create_connection(("127.0.0.1", server.thread.server.http_port), timeout=10) as client:
                client.sendall(b"POST /v0/events?name=ab_test_events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Length: %d\r\nAuthorization: Bearer %s\r\n\r\n"
                               % (length, TOKENS["ingest"].encode()) + ndjson([TUTORIAL_EVENT])[:100])
                time.sleep(0.3)
        deadline = time.monotonic() + 10
        while counted.labels("events", "499")._value.get() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {s: counted.labels("events", s)._value.get() for s in ("400", "499", "500")} == \
            {"400": 0, "499": 2, "500": 0}
    finally:
        server.stop()


@pytest.mark.skipif(not TB.exists(), reason="make test installs tinybird-cli into .venv/tinybird")
def test_the_platforms_cli_works_against_it(http, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    token = TOKENS["admin"]
    auth = tb(home, "--host", http.base, "--token", token, "auth")
    assert auth.returncode == 0 and "Auth successful" in auth.stdout, auth.stdout + auth.stderr
    assert json.loads((home / ".tinyb").read_text())["host"] == http.base
    listed = tb(home, "datasource", "ls")
    assert listed.returncode == 0 and "ab_test_events" in listed.stdout, listed.stdout + listed.stderr
    pipes_listed = tb(home, "pipe", "ls", "--format", "json")
    assert pipes_listed.returncode == 0, pipes_listed.stdout + pipes_listed.stderr
    assert {p["name"] for p in json.loads(pipes_listed.stdout)["pipes"]} == {
        "test_summary", "test_segments", "test_timeseries", "test_lift", "test_results", "ab_test_events_quarantine"}
    events = home / "events.ndjson"
    events.write_bytes(ndjson([TUTORIAL_EVENT, {**TUTORIAL_EVENT, "user_id": "user_456", "variant": "variant_b",
                                                "conversion": 0}]))
    appended = tb(home, "datasource", "append", "ab_test_events", str(events))
    assert appended.returncode == 0 and "Total rows in ab_test_events: 2" in appended.stdout, appended.stdout
    csv_file = home / "events.csv"
    csv_file.write_text("timestamp,user_id,test_id,variant,conversion,revenue\n2025-04-29 10:00:00,user_9,test_5,"
                        "variant_a,1,10.5\n")
    appended = tb(home, "datasource", "append", "ab_test_events", str(csv_file))
    assert appended.returncode == 0 and "Total rows in ab_test_events: 3" in appended.stdout, appended.stdout
    bad = home / "bad.ndjson"
    bad.write_text('{"timestamp": "2025-04-29 10:00:00", "test_id": "test_5", "variant": "v"}\n')
    refused = tb(home, "datasource", "append", "ab_test_events", str(bad))
    assert refused.returncode == 1 and "1 rows in quarantine" in refused.stdout + refused.stderr
    dates = ["--test_id", "test_5", "--start_date", "2025-04-01 00:00:00", "--end_date", "2025-04-30 23:59:59"]
    as_json = tb(home, "pipe", "data", "test_summary", *dates, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)["data"]
    assert [(r["variant"], r["users"], r["conversions"]) for r in data] == [("variant_a", 2, 2), ("variant_b", 1, 0)]
    as_csv = tb(home, "pipe", "data", "test_summary", *dates, "--format", "csv")
    assert as_csv.returncode == 0 and as_csv.stdout.splitlines()[1].startswith('"test_5","variant_a",2,2,1.0,95.05')
    table = tb(home, "pipe", "data", "test_summary", *dates)
    assert table.returncode == 0 and "variant_b" in table.stdout
    # the same with TB_HOST and TB_TOKEN, from a directory without a .tinyb
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    by_env = subprocess.run([str(TB), "pipe", "data", "test_summary", *dates, "--format", "csv"], capture_output=True,
                            text=True, timeout=120, cwd=elsewhere,
                            env={**tb_env(elsewhere), "TB_HOST": http.base, "TB_TOKEN": token})
    assert by_env.returncode == 0 and by_env.stdout == as_csv.stdout, by_env.stderr
    wrong = tb(elsewhere, "--host", http.base, "--token", "wrong", "pipe", "data", "test_summary", *dates)
    assert wrong.returncode == 1 and "Forbidden" in wrong.stdout + wrong.stderr


@pytest.mark.skipif(not (SDK / "node_modules").exists(), reason="make test installs the SDK (npm ci in tests/sdk)")
def test_the_platforms_typescript_sdk_works_against_it(http, tmp_path):
    file = tmp_path / "sdk.ndjson"
    file.write_bytes(ndjson([{**TUTORIAL_EVENT, "test_id": "sdk_test", "user_id": "sdk_file_1", "variant": "control"}]))
    result = subprocess.run(["node", "run.mjs"], capture_output=True, text=True, timeout=120, cwd=SDK,
                            env={**os.environ, "ABSTREAM_HTTP": http.base, "ABSTREAM_TOKEN": TOKENS["both"],
                                 "ABSTREAM_FILE": str(file)})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ingest"]["result"]["successful_rows"] == 1
    assert out["batch"]["result"]["successful_rows"] == 2 and out["batch"]["result"]["quarantined_rows"] == 1
    assert out["batch"]["result"]["quarantined"] == [{"line": 3, "field": "conversion",
                                                      "error": "conversion must be 0 or 1, got 7"}]
    assert out["no_wait"]["result"]["successful_rows"] == 1
    data = out["query"]["result"]["data"]
    assert {r["variant"]: r["users"] for r in data} == {"control": 1, "variant_a": 3}
    assert out["append"]["result"]["successful_rows"] == 1 and out["append"]["result"]["error"] is False
    assert out["unknown_pipe"]["error"]["statusCode"] == 404
    assert out["wrong_token"]["error"]["statusCode"] == 403
    with Client(http.grpc, token=TOKENS["admin"]) as client:
        assert sum(r.metrics.events for r in client.summary("sdk_test").rows) == 5  # 6 sent, 1 refused


# ---- the same care as gRPC -----------------------------------------------------------------------------

def test_https_with_the_grpc_certificate_and_mutual_tls(tmp_path):
    import ssl

    from tests.test_security import make_pki

    pki = make_pki(tmp_path)
    server = Http(tmp_path, tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                  tls_client_ca=str(pki["ca"]))
    try:
        url = f"https://localhost:{server.thread.server.http_port}/v0/regions"
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url, context=context, timeout=10).read()  # no client certificate
        context.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            assert json.loads(response.read()) == {"regions": []}
        with pytest.raises((urllib.error.URLError, ConnectionError, http_client_errors())):
            urllib.request.urlopen(f"http://127.0.0.1:{server.thread.server.http_port}/v0/regions", timeout=10).read()
    finally:
        server.stop()


def http_client_errors():
    import http.client

    return http.client.HTTPException


def test_metrics_and_logs_cover_http_and_never_show_a_token(tmp_path):
    server = Server(tmp_path / "data", "--tokens-file", str(tokens_file(tmp_path / "tokens.toml")),
                    "--metrics-addr", "127.0.0.1:0", "--log-format", "json").start()
    base = f"http://{server.http_address}"
    for path in ("/v0/regions", f"/v0/pipes/test_summary.json?test_id=t&token={TOKENS['query']}",
                 "/v0/pipes/test_summary.json?test_id=t&token=not-a-real-token"):
        try:
            urllib.request.urlopen(base + path, timeout=10).read()
        except urllib.error.HTTPError as error:
            assert error.code == 403
    # Request lines aiohttp's parser refuses itself, logged by it: a character that is not ASCII,
    # a raw space, a control byte.
    for line in (f"GET /api/tests/caf\u00e9?token={TOKENS['query']} HTTP/1.1".encode(),
                 f"GET /v0/pipes/x.json?token={TOKENS['query']}&q=a b HTTP/1.1".encode(),
                 f"GET /v0/pipes/x.json?token={TOKENS['query']}\x7f HTTP/1.1".encode(),
                 f"GET /v0/pipes/x.json?q=o'b&token={TOKENS['query']} x HTTP/1.1".encode()):
        host, port = server.http_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(line + b"\r\nHost: 127.0.0.1\r\n\r\n")
            assert b" 400 " in raw.recv(1000).split(b"\r\n")[0]
    time.sleep(0.5)
    log = server.log_path.read_text()
    assert "Error handling request" in log  # the refusals are logged, without what they refused
    assert TOKENS["query"] not in log and "not-a-real-token" not in log
    lines = [json.loads(line) for line in log.splitlines() if '"abstream.http"' in line]
    assert any("GET /v0/pipes/test_summary.json 200" in line["message"] and line.get("request_id") for line in lines)
    port = int(next(line for line in log.splitlines() if "metrics on" in line).rsplit(":", 1)[1].split("/")[0])
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'abstream_http_requests_total{route="pipe",status="200"} 1.0' in metrics
    assert 'abstream_http_requests_total{route="pipe",status="403"} 1.0' in metrics
    assert 'abstream_http_seconds_count{route="regions"} 1.0' in metrics


def test_without_tokens_http_listens_on_loopback_only(tmp_path):
    refused = subprocess.run([str(Path(sys.executable).parent / "abstream"), "serve", "--addr", "127.0.0.1:0",
                              "--http-addr", "0.0.0.0:0", "--data-dir", ""], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "refusing to listen on 0.0.0.0:0 without tokens" in refused.stderr
