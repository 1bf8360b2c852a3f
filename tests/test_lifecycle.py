"""Data lifecycle against real servers and real files: deleting a test, erasing a user (from
queries at once, from every file in the data directory before the call returns), retention,
export, and SIGKILL at any moment of a removal leaving the before or the after state."""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from abstream.clients import Client
from abstream.core.auth import hash_token

from tests.process import Server

BIN = Path(sys.executable).parent
NS = 1_000_000_000
SECRET_USER = "erase-me-7f3a9c"


def table(n: int, test_id: str, start_s: int, users: int = 500, seed: int = 1, secret_every: int = 0,
          spacing_ns: int = NS) -> pa.Table:
    """`n` events from `start_s` on, one every `spacing_ns` (give or take a second's jitter)."""
    rng = random.Random(seed)
    ids = [SECRET_USER if secret_every and i % secret_every == 0 else f"user_{rng.randrange(users)}" for i in range(n)]
    return pa.table({"timestamp": pa.array([start_s * NS + i * spacing_ns + rng.randrange(spacing_ns) for i in range(n)],
                                           pa.timestamp("ns", "UTC")),
                     "user_id": ids, "test_id": [test_id] * n, "variant": [rng.choice("ab") for _ in range(n)],
                     "event_type": ["view"] * n, "conversion": [rng.random() < 0.2 for _ in range(n)],
                     "revenue": [round(rng.uniform(0, 50), 2) for _ in range(n)],
                     "session_id": [f"s{i % 97}" for i in range(n)], "device": ["mobile"] * n, "country": ["DE"] * n})


RECENT = int(time.time()) - 5 * 86400


def counts(server: Server, token: str | None = None) -> dict[str, int]:
    with Client(server.address, token=token) as client:
        return {t.test_id: t.events for t in client.list_tests().rows}


def users_of(server: Server, test_id: str, token: str | None = None) -> int:
    with Client(server.address, token=token) as client:
        return sum(r.metrics.users for r in client.summary(test_id).rows)


def files_hold(data_dir: Path, needle: str) -> list[str]:
    """Every file of the data directory in which `needle` appears: its bytes searched, and each
    Arrow file's strings read with pyarrow too."""
    found = []
    for path in data_dir.rglob("*"):
        if not path.is_file():
            continue
        if needle.encode() in path.read_bytes():
            found.append(str(path))
        elif path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                contents = pa.ipc.open_file(source).read_all()
            for column in contents.columns:
                if pa.types.is_string(column.type) and needle in column.to_pylist():
                    found.append(f"{path}:{column}")
    return found


def ingest(server: Server, *tables: pa.Table, token: str | None = None) -> None:
    with Client(server.address, token=token) as client:
        for t in tables:
            client.ingest_table(t)


def test_a_deleted_test_is_gone_from_the_next_query_and_after_restarts(tmp_path):
    server = Server(tmp_path / "data").start()
    ingest(server, table(20_000, "doomed", RECENT), table(5_000, "kept", RECENT, seed=2))
    with Client(server.address) as client:
        client.create_experiment("doomed", control="a", hypothesis="h")
        bad = pa.table({"timestamp": pa.array([RECENT * NS], pa.timestamp("ns", "UTC")), "user_id": [""],
                        "test_id": ["doomed"], "variant": ["a"]})
        client.ingest_table(bad)  # one quarantined event of the test
        assert len(client.quarantine("doomed").rows) == 1
        assert client.delete_test("doomed") == 20_000
        assert "doomed" not in {t.test_id for t in client.list_tests().rows}  # the very next query
        assert client.summary("doomed").rows == [] and client.quarantine("doomed").rows == []
        assert [e.test_id for e in client.list_experiments()] == []
        assert client.delete_test("doomed") == 0
    assert counts(server) == {"kept": 5_000}
    server.kill()  # replayed from the log
    server = Server(tmp_path / "data").start()
    assert counts(server) == {"kept": 5_000}
    server.terminate()  # and from the final snapshot
    server = Server(tmp_path / "data").start()
    assert counts(server) == {"kept": 5_000}
    server.terminate()


def test_an_erased_user_is_in_no_query_and_in_no_file_once_the_call_returns(tmp_path):
    data = tmp_path / "data"
    server = Server(data, "--snapshot-every-events", "10000").start()
    sent = {"erase_a": table(30_000, "erase_a", RECENT, secret_every=100),
            "erase_b": table(10_000, "erase_b", RECENT, seed=3, secret_every=50)}
    ingest(server, *sent.values())
    with Client(server.address) as client:
        client.snapshot()  # snapshots and log segments that hold the user
        client.ingest_table(pa.table({"timestamp": pa.array([RECENT * NS], pa.timestamp("ns", "UTC")),
                                      "user_id": [SECRET_USER], "test_id": ["erase_a"], "variant": [""]}))
        assert client.quarantine().rows  # a rejected event of the user, as sent
    assert files_hold(data, SECRET_USER)
    def pairs(t: pa.Table, without: str | None) -> int:  # distinct (variant, user): what Summary's users add up to
        return len({(v, u) for v, u in zip(t.column("variant").to_pylist(), t.column("user_id").to_pylist())
                    if u != without})

    assert {t: users_of(server, t) for t in sent} == {t: pairs(x, None) for t, x in sent.items()}
    with Client(server.address) as client:
        assert client.erase_user(SECRET_USER) == 300 + 200
        assert client.quarantine().rows == []
    assert {t: users_of(server, t) for t in sent} == {t: pairs(x, SECRET_USER) for t, x in sent.items()}
    assert counts(server) == {"erase_a": 29_700, "erase_b": 9_800}
    assert files_hold(data, SECRET_USER) == []  # a backup taken now holds no copy
    server.kill()
    server = Server(data).start()
    assert counts(server) == {"erase_a": 29_700, "erase_b": 9_800}
    assert files_hold(data, SECRET_USER) == []
    server.terminate()


def test_erasing_from_some_tests_leaves_the_others(tmp_path):
    server = Server(tmp_path / "data").start()
    ingest(server, table(1_000, "only_a", RECENT, secret_every=10), table(1_000, "only_b", RECENT, secret_every=10))
    with Client(server.address) as client:
        assert client.erase_user(SECRET_USER, ["only_a"]) == 100
        assert client.erase_user("nobody-at-all") == 0
        assert counts(server) == {"only_a": 900, "only_b": 1_000}
        assert client.erase_user(SECRET_USER, "only_b") == 100  # one test by its id alone, not its letters
    assert counts(server) == {"only_a": 900, "only_b": 900}
    server.terminate()


@pytest.mark.parametrize("operation", ["delete", "erase"])
def test_sigkill_during_a_removal_leaves_before_or_after_never_a_mix(tmp_path, operation):
    data = tmp_path / "data"
    server = Server(data).start()
    ingest(server, table(200_000, "big", RECENT, users=5_000, secret_every=7), table(3_000, "other", RECENT, seed=5))
    expected_before = {"big": 200_000, "other": 3_000}
    expected_after = {"other": 3_000} if operation == "delete" else {"big": 200_000 - len(range(0, 200_000, 7)),
                                                                     "other": 3_000}
    rng = random.Random(7)
    outcomes = set()
    for attempt in range(6):
        def remove() -> None:
            try:
                with Client(server.address) as client:
                    client.delete_test("big") if operation == "delete" else client.erase_user(SECRET_USER)
            except grpc.RpcError:
                pass  # the server was killed under it

        caller = threading.Thread(target=remove)
        caller.start()
        time.sleep(rng.uniform(0.0, 0.4))
        server.kill()
        caller.join(30)
        server = Server(data).start()
        now = counts(server)
        assert now in (expected_before, expected_after), (attempt, now)
        outcomes.add("after" if now == expected_after else "before")
        if now == expected_after:
            if operation == "erase":
                assert files_hold(data, SECRET_USER) == [], attempt  # a crash mid-purge is finished at start
            break
    with Client(server.address) as client:  # done for good now, whatever happened before
        client.delete_test("big") if operation == "delete" else client.erase_user(SECRET_USER)
    assert counts(server) == expected_after
    server.kill()
    server = Server(data).start()
    assert counts(server) == expected_after  # nothing comes back
    server.terminate()


def test_export_is_the_events_as_ingested(tmp_path):
    server = Server(tmp_path / "data").start()
    sent = table(250_000, "exported", RECENT, users=10_000)
    ingest(server, sent, table(100, "not_exported", RECENT))
    out = tmp_path / "exported.parquet"
    result = subprocess.run([str(BIN / "abstream"), "export", "exported", "--output", str(out), "--addr",
                             server.address], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "exported: 250,000 events" in result.stderr
    got = pq.read_table(out)
    key = [("timestamp", "ascending"), ("user_id", "ascending")]
    columns = ["timestamp", "user_id", "test_id", "variant", "event_type", "conversion", "revenue", "session_id",
               "device", "country"]
    expected = sent.select(columns).sort_by(key)
    got = got.select(columns).sort_by(key)
    assert got.num_rows == expected.num_rows
    for name in columns:
        a, b = got.column(name), expected.column(name)
        if name == "conversion":
            a, b = a.cast(pa.int64()), b.cast(pa.int64())
        assert a.to_pylist() == b.to_pylist(), name
    ranged = subprocess.run([str(BIN / "abstream"), "export", "exported", "--format", "csv", "--start",
                             dt.datetime.fromtimestamp(RECENT, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                             "--end", dt.datetime.fromtimestamp(RECENT + 99, dt.timezone.utc).strftime(
                                 "%Y-%m-%d %H:%M:%S"), "--addr", server.address],
                            capture_output=True, text=True, timeout=60)
    assert ranged.returncode == 0 and len(ranged.stdout.splitlines()) == 1 + 100  # a header and 100 seconds' events
    # a test with no events: files with the columns and no rows, as readable as any other
    empty = tmp_path / "empty.parquet"
    nothing = subprocess.run([str(BIN / "abstream"), "export", "planned_only", "--output", str(empty), "--addr",
                              server.address], capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 0 and "planned_only: 0 events" in nothing.stderr, nothing.stderr
    assert pq.read_table(empty).num_rows == 0 and pq.read_table(empty).schema.names[:len(columns)] == columns
    header = subprocess.run([str(BIN / "abstream"), "export", "planned_only", "--format", "csv", "--addr",
                             server.address], capture_output=True, text=True, timeout=60)
    assert header.returncode == 0 and header.stdout.splitlines()[0].startswith('"timestamp","user_id"'), header
    assert len(header.stdout.splitlines()) == 1
    server.terminate()


def test_retention_hides_at_once_and_the_sweep_removes(tmp_path):
    """Events past their test's retention are in no answer and no export the moment they are;
    the sweep removes them from memory once the oldest is past it by an eighth of the retention
    (at most a day): removing rewrites the test's events, which every minute would cost a test
    ingested around the clock as much as storing it did."""
    now = int(time.time())
    server = Server(tmp_path / "data", "--retention-days", "30", "--retention-sweep-seconds", "1").start()

    def exported(client: Client, test_id: str) -> int:
        return sum(t.num_rows for t in client.export(test_id))

    with Client(server.address) as client:
        client.set_retention("long_kept", 100)
        old = table(1_000, "short_kept", now - 40 * 86400)
        soon = table(200, "short_kept", now - 30 * 86400 + 6, seed=4, spacing_ns=1_000_000)  # past it in ~6 s
        fresh = table(300, "short_kept", now - 86400, seed=5)
        client.ingest_table(pa.concat_tables([old, soon, fresh]))
        client.ingest_table(table(1_000, "long_kept", now - 40 * 86400, seed=6))
        visible = sum(r.metrics.events for r in client.summary("short_kept").rows)
        assert visible in (500, 300)  # the 40-day-old ones never seen; the others until they age out
        assert exported(client, "short_kept") in (500, 300)
        assert sum(r.metrics.events for r in client.summary("long_kept").rows) == 1_000
        deadline = time.monotonic() + 30
        while counts(server).get("short_kept") != 500:  # 10 days past: removed by the next sweep
            assert time.monotonic() < deadline, counts(server)
            time.sleep(0.2)
        while sum(r.metrics.events for r in client.summary("short_kept").rows) != 300:
            assert time.monotonic() < deadline, "the 200 events did not age out"
            time.sleep(0.2)
        assert exported(client, "short_kept") == 300
        time.sleep(2.5)  # sweeps: the 200, seconds past it, are held still
        assert counts(server) == {"short_kept": 500, "long_kept": 1_000}
        assert "retention removed 1000 events" in server.log()
        assert client.set_retention("long_kept", 0).retention_days is None  # back to the server's 30 days
        deadline = time.monotonic() + 30
        while "long_kept" in counts(server):
            assert time.monotonic() < deadline, counts(server)
            time.sleep(0.2)
    server.kill()
    server = Server(tmp_path / "data", "--retention-days", "30").start()
    assert counts(server) == {"short_kept": 500}
    with Client(server.address) as client:
        assert sum(r.metrics.events for r in client.summary("short_kept").rows) == 300
        assert exported(client, "short_kept") == 300
    server.terminate()


def test_the_sweep_removes_quarantined_events_past_their_tests_retention_for_good(tmp_path):
    """Rejected events hold user ids as stored ones do: past their test's retention (by when
    they were received; its own, else the server's) the sweep removes them, logged, so a restart
    from the log has them gone too; a test whose own retention is longer keeps its own."""
    seconds = 1 / 86_400
    server = Server(tmp_path / "data", "--retention-days", str(2 * seconds), "--retention-sweep-seconds", "0.2").start()

    def quarantined() -> list[str]:
        with Client(server.address) as client:
            return sorted(q.event["test_id"] for q in client.quarantine(limit=100).rows)

    with Client(server.address) as client:
        for test_id, days in [("q_short", seconds), ("q_week", 7), ("q_ever", 1e300)]:
            assert client.set_retention(test_id, days).retention_days == days
        bad = table(6, "", int(time.time()) - 60).set_column(5, "conversion", pa.array([7] * 6, pa.int64()))
        for test_id in ("q_short", "q_week", "q_ever", "q_other"):  # q_other: the server's 2 s
            sent = bad.set_column(2, "test_id", pa.array([test_id] * 6))
            assert [ack.rejected for ack in client.ingest_table(sent)] == [6]
    kept = ["q_ever"] * 6 + ["q_week"] * 6
    deadline = time.monotonic() + 30
    while quarantined() != kept:
        assert time.monotonic() < deadline, quarantined()
        time.sleep(0.2)
    assert "quarantine_retention removed" in server.log()
    server.kill()  # no snapshot: the restart replays the log, the removals included
    server = Server(tmp_path / "data").start()
    assert quarantined() == kept
    server.terminate()


def test_a_retention_past_the_oldest_storable_event_keeps_them_all_and_the_sweep_goes_on(tmp_path):
    now = int(time.time())
    server = Server(tmp_path / "data", "--retention-days", "30", "--retention-sweep-seconds", "1").start()
    with Client(server.address) as client:
        assert client.set_retention("for_ever", 1e300).retention_days == 1e300
        client.set_retention("ten_thousand_years", 3_652_500)
        client.ingest_table(pa.concat_tables([table(100, "for_ever", now - 40 * 86400),
                                              table(100, "ten_thousand_years", now - 40 * 86400, seed=2),
                                              table(100, "short_kept", now - 40 * 86400, seed=3)]))
        assert sum(r.metrics.events for r in client.summary("for_ever").rows) == 100
        assert sum(r.metrics.events for r in client.summary("ten_thousand_years").rows) == 100
        deadline = time.monotonic() + 30
        while "short_kept" in counts(server):  # the server's 30 days still apply to the others
            assert time.monotonic() < deadline, counts(server)
            time.sleep(0.2)
        assert counts(server) == {"for_ever": 100, "ten_thousand_years": 100}
        for call in (lambda: client.set_retention("", 3), lambda: client.delete_test("")):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                       "test_id: is required")
        assert "" not in {e.test_id for e in client.list_experiments()}
    server.terminate()


def test_a_token_for_a_prefix_removes_only_its_own_tests(tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "team"\nsha256 = "{hash_token("team")}"\nscopes = ["admin", "ingest", "query"]\n'
                      'test_prefix = "team_"\n'
                      f'[[token]]\nname = "root"\nsha256 = "{hash_token("root")}"\nscopes = ["admin", "ingest", "query"]\n')
    server = Server(tmp_path / "data", "--tokens-file", str(tokens)).start()
    ingest(server, table(100, "team_x", RECENT, secret_every=10), table(100, "other_y", RECENT, secret_every=10),
           token="root")
    with Client(server.address, token="team") as client:
        for call in (lambda: client.delete_test("other_y"), lambda: client.erase_user(SECRET_USER),
                     lambda: client.erase_user(SECRET_USER, ["other_y"]), lambda: list(client.export("other_y"))):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert client.erase_user(SECRET_USER, ["team_x"]) == 10
        assert client.delete_test("team_x") == 90
    assert counts(server, token="root") == {"other_y": 100}
    server.terminate()


def test_a_batch_encoded_before_an_erasure_and_applied_after_it_keeps_its_users(tmp_path):
    """A stream encodes its next batch while another is applied: an erasure in between rebuilt
    the user dictionary, and the batch's events were stored under the erased user's old code,
    as the placeholder that replaced its name, for good (a second erasure did not find them)."""
    from abstream.core import events
    from abstream.core.engine import append
    from abstream.core.types import ValidatedBatch
    from abstream.store import Durability, EventStore

    store = EventStore(durability=Durability(tmp_path / "data"))
    append(store, table(200, "race", 1_745_000_000, secret_every=4))
    now = time.time_ns()
    checked, rejections = events.check(table(100, "race", 1_745_001_000, seed=2, secret_every=2), now)
    prepared = store.prepare(ValidatedBatch(checked, rejections, now, "", 0))  # encoded: the user still known
    assert store.erase_user(SECRET_USER) == 50
    store.commit(store.apply(prepared))
    users = set(pa.concat_tables(store.export("race")).column("user_id").to_pylist())
    assert SECRET_USER in users and not [u for u in users if u.startswith("\x00")]
    assert store.erase_user(SECRET_USER) == 50  # the batch's events, erased in turn
    store.close()
    store = EventStore(durability=Durability(tmp_path / "data"))
    assert store.event_count == 200 and SECRET_USER not in set(pa.concat_tables(store.export("race")).column(
        "user_id").to_pylist())
    store.close()


def test_a_user_erased_from_parts_that_overlap_in_time_leaves_exact_answers(tmp_path):
    """Two sealed parts of one test covering the same hours (a backfill): the rewritten test is
    sorted again, so ranged queries still find every event."""
    server = Server(tmp_path / "data").start()
    late = table(300_000, "overlap", RECENT + 10_000, users=3_000, secret_every=11, spacing_ns=NS // 10)
    backfill = table(300_000, "overlap", RECENT, users=3_000, seed=9, secret_every=13, spacing_ns=NS // 5)
    ingest(server, late, backfill)
    with Client(server.address) as client:
        assert client.erase_user(SECRET_USER) == len(range(0, 300_000, 11)) + len(range(0, 300_000, 13))
        both = pa.concat_tables([late, backfill])
        ts = both.column("timestamp").cast(pa.int64()).to_numpy()
        for lo, hi in ((RECENT + 5_000, RECENT + 20_000), (RECENT, RECENT + 60_000), (RECENT + 30_000, RECENT + 40_000)):
            inside = (ts >= lo * NS) & (ts < (hi + 1) * NS)  # an end to the second takes in that second
            users = set(zip(np.asarray(both.column("variant"))[inside], np.asarray(both.column("user_id"))[inside]))
            users = {p for p in users if p[1] != SECRET_USER}
            start, end = (dt.datetime.fromtimestamp(x, dt.timezone.utc) for x in (lo, hi))
            rows = client.summary("overlap", start, end).rows
            assert sum(r.metrics.users for r in rows) == len(users), (lo, hi)
            events = int(inside.sum()) - sum(1 for u, i in zip(np.asarray(both.column("user_id")), inside)
                                             if i and u == SECRET_USER)
            assert sum(r.metrics.events for r in rows) == events, (lo, hi)
    server.terminate()


def test_retention_keeps_the_experiments_start(tmp_path):
    now = int(time.time())
    server = Server(tmp_path / "data", "--retention-days", "30").start()
    with Client(server.address) as client:
        client.ingest_table(pa.concat_tables([table(100, "planned", now - 10 * 86400),
                                              table(50, "planned", now - 5 * 86400, seed=2)]))
        client.create_experiment("planned", start=dt.datetime.fromtimestamp(now - 7 * 86400, dt.timezone.utc))
        assert sum(r.metrics.events for r in client.summary("planned").rows) == 50
    server.terminate()


@pytest.mark.parametrize("kind", ["many-parts", "rolled-up", "chdb", "clickhouse"])
def test_every_engine_deletes_erases_retains_and_exports_alike(kind, request):
    """The engine methods behind DeleteTest, EraseUser, retention and ExportEvents, on the
    embedded engine, on chDB and on the real cluster (2 shards x 2 replicas): each removal is
    complete when it returns, rejected events go with their test or user, and removals that
    touch several months (partitions) and follow one another leave nothing behind."""
    from abstream.core.engine import append
    from abstream.core.events import Rejection
    from abstream.core.types import Experiment

    from tests import engines

    engine = engines.make(kind, request)
    day = 86_400
    months_ago = (int(time.time()) // day - 70) * day  # events over ~two months, in 2-3 partitions

    def events(test_id: str, n: int, seed: int) -> pa.Table:
        t = table(n, test_id, months_ago, users=300, seed=seed, secret_every=9, spacing_ns=day * NS * 60 // n)
        return t.set_column(0, "timestamp", t.column("timestamp").cast(pa.int64())).set_column(
            5, "conversion", t.column("conversion").cast(pa.int64()))

    def stored() -> dict[str, list]:
        out = {}
        for info in engine.list_tests():
            rows = pa.concat_tables(list(engine.export(info.test_id, rows=700))).to_pylist()
            assert len(rows) == info.events
            out[info.test_id] = sorted(rows, key=lambda r: (r["timestamp"], r["user_id"], r["session_id"]))
        return out

    def rows_of(t: pa.Table) -> list:
        return sorted(t.to_pylist(), key=lambda r: (r["timestamp"], r["user_id"], r["session_id"]))

    try:
        sent = {name: events(name, 3_000, seed) for seed, name in enumerate(["keep", "gone", "aged"])}
        for name, t in sent.items():
            # two rejected events per test, the first of them the user to erase
            append(engine, t.slice(0, 1_500), refuse=[Rejection(0, "device", "bad"), Rejection(1, "device", "bad")])
            append(engine, t.slice(1_500))
        # written by a gateway whose clock is a minute ahead: its deletion is still the newer version
        engine.put_experiment(Experiment("gone", control_variant="a", created_ns=1, updated_ns=time.time_ns() + 60 * NS))
        assert stored() == {name: rows_of(t.slice(2)) for name, t in sent.items()}
        assert engine.quarantine("gone", 10, "")[1] == 2

        gone = 3_000 - 2
        assert engine.delete_test("gone") == gone
        assert "gone" not in {t.test_id for t in engine.list_tests()}
        assert engine.quarantine("gone", 10, "") == ([], 0)
        assert "gone" not in engine.experiments()
        engine.put_experiment(Experiment("gone", control_variant="b", created_ns=2, updated_ns=time.time_ns()))
        assert engine.experiments()["gone"].control_variant == "b"  # made again at once: newer than the deletion
        assert engine.delete_test("gone") == 0
        assert "gone" not in engine.experiments()

        secret_in = {name: sum(1 for r in rows_of(t) if r["user_id"] == SECRET_USER) - 1 for name, t in sent.items()}
        assert engine.erase_user(SECRET_USER, ["keep"]) == secret_in["keep"]
        left = stored()
        assert not any(r["user_id"] == SECRET_USER for r in left["keep"])
        assert sum(r["user_id"] == SECRET_USER for r in left["aged"]) == secret_in["aged"]
        assert engine.erase_user(SECRET_USER, None) == secret_in["aged"]
        assert not any(r["user_id"] == SECRET_USER for rows in stored().values() for r in rows)
        quarantined, total = engine.quarantine("", 100, "")
        assert total == 2 and all(q.event["user_id"] != SECRET_USER for q in quarantined)

        horizon = (months_ago + 30 * day) * NS  # a day's start: the cluster removes whole days
        before = [r for r in stored()["aged"] if r["timestamp"] < horizon]
        assert 0 < len(before) < 3_000
        assert engine.retain({"aged": horizon}) == len(before)
        assert min(r["timestamp"] for r in stored()["aged"]) >= horizon
        assert engine.retain({"aged": horizon}) == 0

        # Quarantined events go by when they were received, past their test's horizon or the
        # others' ("keep" and "aged" have one left each, received just now; a horizon of 0 keeps).
        later = (time.time_ns() // (day * NS) + 2) * day * NS  # a day's start after now
        assert engine.retain_quarantine({}, (time.time_ns() // (day * NS) - 1) * day * NS) == 0
        assert engine.retain_quarantine({"keep": 0}, later) == 1
        assert [q.event["test_id"] for q in engine.quarantine("", 100, "")[0]] == ["keep"]
        assert engine.retain_quarantine({"keep": later}, None) == 1
        assert engine.quarantine("", 100, "") == ([], 0)

        # after the removals, new events and another removal: nothing but real tests is listed
        append(engine, events("late", 500, 9))
        assert engine.delete_test("late") == 500
        assert sorted(t.test_id for t in engine.list_tests()) == ["aged", "keep"]
        assert [r for r in stored()["keep"]] == [r for r in rows_of(sent["keep"].slice(2)) if r["user_id"] != SECRET_USER]
        ranged = pa.concat_tables(list(engine.export("keep", horizon, horizon + 10 * day * NS))).to_pylist()
        assert ranged and all(horizon <= r["timestamp"] <= horizon + 10 * day * NS for r in ranged)
    finally:
        engine.close()


def test_the_lifecycle_rpcs_on_the_cluster_engine(tmp_path, request):
    """DeleteTest, EraseUser, ExportEvents and the retention sweep through a real gateway on the
    real cluster: what the embedded engine's tests above check, as a client sees it."""
    from tests.conftest import ServerThread, engine_settings

    now = int(time.time())
    settings = engine_settings("clickhouse", tmp_path, request, retention_days=30.0, retention_sweep_seconds=1.0)
    running = ServerThread(settings).start()
    try:
        with Client(running.address) as client:
            client.ingest_table(table(2_000, "kept", now - 3 * 86400, secret_every=10))
            client.ingest_table(table(1_000, "doomed", now - 3 * 86400, seed=2))
            client.ingest_table(table(500, "aged", now - 45 * 86400, seed=3))  # hidden at once, swept soon
            client.ingest_table(table(400, "aged", now - 2 * 86400, seed=4))
            assert sum(r.metrics.events for r in client.summary("aged").rows) == 400
            assert client.delete_test("doomed") == 1_000
            assert client.erase_user(SECRET_USER) == 200
            exported = pa.concat_tables(list(client.export("kept")))
            assert exported.num_rows == 1_800 and SECRET_USER not in exported.column("user_id").to_pylist()
            deadline = time.monotonic() + 120
            while {t.test_id: t.events for t in client.list_tests().rows} != {"kept": 1_800, "aged": 400}:
                assert time.monotonic() < deadline, client.list_tests()
                time.sleep(0.5)
            pairs = set(zip(exported.column("variant").to_pylist(), exported.column("user_id").to_pylist()))
            assert sum(r.metrics.users for r in client.summary("kept").rows) == len(pairs)
    finally:
        running.stop()


def test_an_erasure_that_runs_out_of_memory_changes_nothing_and_is_not_logged(tmp_path):
    """Rewriting a large test without the user needs memory the process cannot get: the call
    fails, and the store is as it was (the other tests' newest events, which the erasure seals
    first, included), then and after a restart (the erasure, refused, is not replayed)."""
    import json

    run = subprocess.run([sys.executable, str(Path(__file__).parent / "removal_memory.py"), str(tmp_path / "data"),
                          "16"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    said = json.loads(run.stdout)
    assert said["failed"], said
    before = {test: (events, users) for test, events, users in said["before"]}
    assert before["A"][1] == 1000 and before["B"] == (20, 1)
    assert {t: (e, u) for t, e, u in said["after"]} == {**before, "C": (2, 1)}
    assert {t: (e, u) for t, e, u in said["recovered"]} == {**before, "C": (2, 1)}


def snapshotted_twice(data: Path):
    """A store in `data` with two snapshots, each holding SECRET_USER's events."""
    from abstream.core.engine import append
    from abstream.store import EventStore
    from abstream.store.durability import Durability

    store = EventStore(durability=Durability(data, snapshot_every_events=0, snapshot_every_seconds=0))
    for seed in (1, 2):
        sent = table(2_000, "t", RECENT, seed=seed, secret_every=7)
        append(store, sent.set_column(0, "timestamp", sent.column("timestamp").cast(pa.int64())))
        store.snapshot()
    return store


def test_an_erasure_whose_older_copies_cannot_be_deleted_says_so_and_finishes_when_tried_again(tmp_path, monkeypatch):
    """The erasure's purge deletes every older snapshot; one whose files cannot be deleted (here
    every deletion of a snapshot's file fails, as on a read-only mount) fails the call, naming
    them, keeps the purge pending, and erasing again finishes it."""
    import os

    from abstream.core.errors import Unavailable

    data = tmp_path / "data"
    store = snapshotted_twice(data)
    assert len(list((data / "snapshots").glob("snap-*"))) == 2
    unlink = os.unlink

    def refused(path, *args, dir_fd=None, **kwargs):
        if dir_fd is not None:  # shutil.rmtree's way: a name in a directory it opened
            raise PermissionError(13, "Permission denied", path)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(Unavailable) as pending:
        store.erase_user(SECRET_USER)
    monkeypatch.setattr(os, "unlink", unlink)
    assert "could not be deleted" in str(pending.value) and "erased from queries" in str(pending.value)
    assert (data / "purge-pending").exists()
    assert files_hold(data, SECRET_USER)  # an older snapshot holds the user still
    assert store.erase_user(SECRET_USER) == 0  # tried again: nothing left in memory, and the purge done
    assert not (data / "purge-pending").exists()
    assert not files_hold(data, SECRET_USER)
    assert len(list((data / "snapshots").glob("snap-*"))) == 1
    store.close()


def test_maintenance_leaves_the_purge_to_an_erasure_under_way(tmp_path):
    """An erasure purges its own copies: the periodic maintenance, which finishes purges left
    pending, does not start one of its own meanwhile (both deleting the same older copies, the
    erasure failed on files the other had just deleted, after succeeding); it finishes one
    left pending once no erasure runs."""
    data = tmp_path / "data"
    store = snapshotted_twice(data)
    persistence = store._persistence
    snapshot, purging, resume = persistence.snapshot, threading.Event(), threading.Event()

    def held(*args, **kwargs):  # the erasure's purge, held at its start
        purging.set()
        resume.wait(30)
        return snapshot(*args, **kwargs)

    persistence.snapshot = held
    erased: list = []
    erasure = threading.Thread(target=lambda: erased.append(store.erase_user(SECRET_USER)))
    erasure.start()
    try:
        assert purging.wait(30)
        persistence.snapshot = snapshot
        store.maintain()  # a second later, as the server's maintenance would
        assert (data / "purge-pending").exists()  # left to the erasure
        assert len(list((data / "snapshots").glob("snap-*"))) == 2
    finally:
        resume.set()
        erasure.join(30)
    assert erased and erased[0] > 0
    assert not (data / "purge-pending").exists()
    assert not files_hold(data, SECRET_USER)
    (data / "purge-pending").write_bytes(b"")  # as a server that died before finishing one leaves it
    store.maintain()
    assert not (data / "purge-pending").exists()
    store.close()
