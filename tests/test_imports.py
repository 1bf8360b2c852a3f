"""Imports from S3 (a real S3 server: moto's, on loopback) and from server paths, exactly once:
re-runs read only what is new, a server killed mid-import resumes without storing twice, and a
corrupt object is reported while the rest are imported."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from abstream.clients import Client
from abstream.core.auth import hash_token

from tests.kafka import free_port, reachable
from tests.test_hostile import peak_growth
from tests.process import Server

boto3 = pytest.importorskip("boto3", reason="moto[server] (with boto3) is installed by make test")
BIN = Path(sys.executable).parent
BUCKET = "experiment-events"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server, and the environment every AWS tool (and the server) reads it from."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not reachable(port):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    yield env
    process.kill()
    process.wait(10)


@pytest.fixture
def bucket(s3, monkeypatch, request):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)  # the servers these tests start inherit it
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], region_name="us-east-1")
    name = f"{BUCKET}-{abs(hash(request.node.name)) % 10**8}"
    client.create_bucket(Bucket=name)
    return client, name


def events(n: int, test_id: str, start: int = 0) -> pa.Table:
    users = [f"user_{start + i}" for i in range(n)]
    return pa.table({"timestamp": pa.array([1_745_000_000_000_000_000 + (start + i) * 1_000_000_000 for i in range(n)],
                                           pa.timestamp("ns", "UTC")),
                     "user_id": users, "test_id": [test_id] * n, "variant": [("a", "b")[i % 2] for i in range(n)],
                     "event_type": ["click"] * n, "conversion": [i % 4 == 0 for i in range(n)],
                     "revenue": [float(i % 50) for i in range(n)], "session_id": users, "device": ["mobile"] * n,
                     "country": ["AU"] * n})


def parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue()


def ndjson_gz(table: pa.Table) -> bytes:
    rows = table.to_pylist()
    for r in rows:
        r["timestamp"] = r["timestamp"].strftime("%Y-%m-%d %H:%M:%S")
        r["conversion"] = int(r["conversion"])
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


def csv_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pacsv.write_csv(table.set_column(5, "conversion", table.column("conversion").cast(pa.int64())), sink)
    return sink.getvalue()


def abstream_import(server: Server, uri: str, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "abstream"), "import", uri, "--addr", server.address, *args,
                           *(("--token", token) if token else ())], capture_output=True, text=True, timeout=300)


def stored(server: Server, test_id: str) -> int:
    with Client(server.address) as client:
        return sum(t.events for t in client.list_tests().rows if t.test_id == test_id)


def test_every_object_once_then_only_the_new_ones(bucket, tmp_path):
    client, name = bucket
    client.put_object(Bucket=name, Key="events/2025-04-01.parquet", Body=parquet_bytes(events(3000, "s3_test")))
    client.put_object(Bucket=name, Key="events/2025-04-02.csv", Body=csv_bytes(events(2000, "s3_test", 3000)))
    client.put_object(Bucket=name, Key="events/2025-04-03.ndjson.gz", Body=ndjson_gz(events(1000, "s3_test", 5000)))
    client.put_object(Bucket=name, Key="elsewhere/other.parquet", Body=parquet_bytes(events(10, "not_this")))
    server = Server(tmp_path / "data").start()
    first = abstream_import(server, f"s3://{name}/events/")
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.splitlines()
    assert f"s3://{name}/events/2025-04-01.parquet: 3,000 stored, 0 quarantined" in lines
    assert f"s3://{name}/events/2025-04-02.csv: 2,000 stored, 0 quarantined" in lines
    assert f"s3://{name}/events/2025-04-03.ndjson.gz: 1,000 stored, 0 quarantined" in lines
    assert lines[-1] == "3 objects: 6,000 events stored, 0 quarantined"
    assert stored(server, "s3_test") == 6000 and stored(server, "not_this") == 0

    again = abstream_import(server, f"s3://{name}/events/")
    assert again.returncode == 0 and again.stdout.count("imported before") == 3, again.stdout
    client.put_object(Bucket=name, Key="events/2025-04-04.parquet", Body=parquet_bytes(events(500, "s3_test", 6000)))
    server.terminate()
    server = Server(tmp_path / "data").start()  # remembered across a restart
    with Client(server.address) as c:
        progress = list(c.import_events(f"s3://{name}/events/"))
    finished = [p for p in progress if p.state != "started"]
    assert [p.state for p in finished] == ["skipped", "skipped", "skipped", "imported"]
    assert finished[-1].accepted == 500 and finished[-1].objects_done == finished[-1].objects_total == 4
    assert stored(server, "s3_test") == 6500
    with Client(server.address) as c:  # what the rows hold, not only how many
        rows = c.summary("s3_test").rows
        assert sum(r.metrics.users for r in rows) == 6500
        assert sum(r.metrics.conversions for r in rows) == sum(1 for i in range(6500) if i % 4 == 0) - \
            sum(1 for i in range(3000, 5000) if i % 4 == 0) + sum(1 for i in range(2000) if i % 4 == 0)
    server.terminate()


def test_parquet_without_optional_columns_is_read_and_an_unreadable_one_fails_alone(bucket, tmp_path):
    client, name = bucket
    required = events(40, "narrow").select(["timestamp", "user_id", "test_id", "variant"])
    client.put_object(Bucket=name, Key="n/1-required-only.parquet", Body=parquet_bytes(required))
    listed = required.set_column(1, "user_id", pa.array([[u] for u in required.column("user_id").to_pylist()]))
    client.put_object(Bucket=name, Key="n/2-list-users.parquet", Body=parquet_bytes(listed))
    client.put_object(Bucket=name, Key="n/3-after.ndjson.gz", Body=ndjson_gz(events(10, "narrow", 40)))
    client.put_object(Bucket=name, Key="n/4-UPPER.NDJSON.GZ", Body=ndjson_gz(events(5, "narrow", 50)))
    server = Server(tmp_path / "data").start()
    result = abstream_import(server, f"s3://{name}/n/")
    assert result.returncode == 1, result.stdout + result.stderr  # one object failed, the others imported
    lines = result.stdout.splitlines()
    assert f"s3://{name}/n/1-required-only.parquet: 40 stored, 0 quarantined" in lines, lines
    assert f"s3://{name}/n/3-after.ndjson.gz: 10 stored, 0 quarantined" in lines, lines
    failed = next(line for line in lines if "2-list-users" in line)
    assert "FAILED: cannot read" in failed and "user_id: column of type list<element: string> cannot be read as string" in failed
    assert f"s3://{name}/n/4-UPPER.NDJSON.GZ: 5 stored, 0 quarantined" in lines, lines
    missing = abstream_import(server, "s3://no-such-bucket-here/x/")
    assert missing.returncode == 2 and "there is no bucket 'no-such-bucket-here'" in missing.stderr, missing.stderr
    assert stored(server, "narrow") == 55
    server.terminate()


def test_watch_imports_objects_as_they_land(bucket, tmp_path):
    client, name = bucket
    client.put_object(Bucket=name, Key="landing/1.parquet", Body=parquet_bytes(events(10, "watch_test")))
    server = Server(tmp_path / "data").start()
    watching = subprocess.Popen([str(BIN / "abstream"), "import", f"s3://{name}/landing/", "--watch", "--interval",
                                 "0.3", "--addr", server.address], stdout=subprocess.PIPE, text=True)
    try:
        assert watching.stdout.readline().startswith(f"s3://{name}/landing/1.parquet: 10 stored")
        assert watching.stdout.readline().startswith("1 objects: 10 events stored")
        client.put_object(Bucket=name, Key="landing/2.parquet", Body=parquet_bytes(events(20, "watch_test", 10)))
        assert watching.stdout.readline().startswith(f"s3://{name}/landing/2.parquet: 20 stored")
        assert stored(server, "watch_test") == 30
    finally:
        watching.kill()
        watching.wait(10)
        server.terminate()


def test_a_corrupt_object_is_reported_and_the_rest_imported(bucket, tmp_path):
    client, name = bucket
    client.put_object(Bucket=name, Key="in/a.parquet", Body=parquet_bytes(events(100, "corrupt_test")))
    client.put_object(Bucket=name, Key="in/b.parquet", Body=b"PAR1 this is not a parquet file at all")
    bad_lines = b'{"timestamp": "2025-04-01 00:00:00", "user_id": "u1", "test_id": "corrupt_test", "variant": "a"}\n' \
                b'not json\n{"timestamp": "2025-04-01 00:00:01", "user_id": "u2", "test_id": "corrupt_test"}\n'
    client.put_object(Bucket=name, Key="in/c.ndjson", Body=bad_lines)
    header, *row = csv_bytes(events(2, "corrupt_test", 200)).split(b"\n")[:3]
    # A field past Python's CSV reader's default limit, in a row of two fields; a line past 4 MiB.
    client.put_object(Bucket=name, Key="in/d.csv", Body=header + b"\n" + row[0] + b"\n" + b"x" * 200_000
                      + b",1\n" + row[1] + b"\n")
    client.put_object(Bucket=name, Key="in/e.csv", Body=header + b"\n" + row[0].replace(b"user_200", b"user_300")
                      + b"\n" + b"y" * (5 << 20) + b"\n" + row[1].replace(b"user_201", b"user_301") + b"\n")
    client.put_object(Bucket=name, Key="in/f.parquet.gz", Body=gzip.compress(parquet_bytes(events(10, "corrupt_test",
                                                                                                  400))))
    client.put_object(Bucket=name, Key="in/g.parquet.gz", Body=gzip.compress(bytes(256 << 20), compresslevel=1))
    server = Server(tmp_path / "data").start()
    imported: list[subprocess.CompletedProcess] = []
    grown = peak_growth(server, lambda: imported.append(abstream_import(server, f"s3://{name}/in/")))
    result = imported[0]
    assert result.returncode == 1  # two objects failed
    out = result.stdout
    assert f"s3://{name}/in/a.parquet: 100 stored" in out
    assert f"s3://{name}/in/b.parquet: FAILED: cannot read s3://{name}/in/b.parquet" in out
    assert f"s3://{name}/in/c.ndjson: 1 stored, 2 quarantined" in out
    assert f"s3://{name}/in/d.csv: 2 stored, 1 quarantined" in out, out
    assert f"s3://{name}/in/e.csv: 2 stored, 1 quarantined" in out, out
    assert f"s3://{name}/in/f.parquet.gz: 10 stored" in out, out
    assert f"s3://{name}/in/g.parquet.gz: FAILED: cannot read s3://{name}/in/g.parquet.gz: s3://{name}/in/g.parquet.gz " \
           "inflated is more than" in out, out
    assert grown < 64 << 20  # inflated into a temporary file, not into memory (256 MiB)
    assert stored(server, "corrupt_test") == 115
    with Client(server.address) as c:
        reasons = [r.message for r in c.quarantine().rows]
    assert any(m.startswith(f"s3://{name}/in/c.ndjson line 2: ") for m in reasons), reasons
    assert any(m.startswith(f"s3://{name}/in/c.ndjson line 3: ") and "variant" in m for m in reasons), reasons
    assert any(m.startswith(f"s3://{name}/in/d.csv line 3: ") and "has 2 fields where the header names 10" in m
               for m in reasons), reasons
    assert any(m.startswith(f"s3://{name}/in/e.csv line 3: ") and "longer than 4 MiB" in m for m in reasons), reasons
    server.terminate()


def test_a_server_killed_mid_import_resumes_without_storing_twice(bucket, tmp_path):
    """The import is slowed by its token's ingest rate so that the kill lands inside the object."""
    client, name = bucket
    rows = 400_000
    client.put_object(Bucket=name, Key="big/all.parquet", Body=parquet_bytes(events(rows, "resume_s3"), 50_000))
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "importer"\nsha256 = "{hash_token("tok")}"\n'
                      'scopes = ["admin", "ingest", "query"]\ningest_rate = 100000\n')
    server = Server(tmp_path / "data", "--tokens-file", str(tokens)).start()
    running = subprocess.Popen([str(BIN / "abstream"), "import", f"s3://{name}/big/", "--addr", server.address,
                                "--token", "tok"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def count() -> int:
        with Client(server.address, token="tok") as c:
            return sum(t.events for t in c.list_tests().rows)

    deadline = time.monotonic() + 60
    while count() < 200_000:
        assert time.monotonic() < deadline and running.poll() is None, running.communicate()
        time.sleep(0.1)
    server.kill()
    running.wait(60)
    assert running.returncode == 2  # the CLI says the server went away
    server = Server(tmp_path / "data", "--tokens-file", str(tokens)).start()
    before = count()
    # A batch is visible before its fsync returns (its ack waits for it), so the kill may take
    # the newest visible batches of 50,000 with it (killed at 100,000 visible, under the load of
    # the whole suite, it once left 50,000): the kill lands inside the object all the same.
    assert 50_000 <= before < rows
    result = abstream_import(server, f"s3://{name}/big/", token="tok")
    assert result.returncode == 0, result.stderr
    assert f"{rows - before:,} stored, 0 quarantined, {before:,} stored before" in result.stdout
    assert count() == rows
    with Client(server.address, token="tok") as c:
        assert sum(r.metrics.users for r in c.summary("resume_s3").rows) == rows
    server.terminate()


def test_a_directory_on_the_server_and_arrow_files(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    with pa.OSFile(str(folder / "one.arrow"), "wb") as sink, pa.ipc.new_file(sink, events(50, "local_test").schema) as w:
        w.write_table(events(50, "local_test"))
    (folder / "two.csv").write_bytes(csv_bytes(events(25, "local_test", 50)))
    (folder / "three.csv").write_bytes("\ufeff".encode() + csv_bytes(events(10, "local_test", 75)))  # a BOM
    (folder / "notes.txt").write_text("not events")
    (tmp_path / "secret.csv").write_bytes(csv_bytes(events(5, "outside")))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "more.csv").write_bytes(csv_bytes(events(5, "outside")))
    (folder / "link.csv").symlink_to(tmp_path / "secret.csv")  # links in the root that lead out of it
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    server = Server(tmp_path / "data", "--import-root", str(folder)).start()
    outside = abstream_import(server, str(tmp_path / "secret.csv"))
    assert outside.returncode == 2 and "is not under the server's --import-root" in outside.stderr
    escape = abstream_import(server, f"{folder}/../secret.csv")
    assert escape.returncode == 2 and "is not under the server's --import-root" in escape.stderr
    result = abstream_import(server, str(folder))
    assert result.returncode == 1
    assert f"{folder}/one.arrow: 50 stored" in result.stdout and f"{folder}/two.csv: 25 stored" in result.stdout
    assert f"{folder}/three.csv: 10 stored" in result.stdout, result.stdout
    assert f"{folder}/notes.txt: FAILED: " in result.stdout and "cannot tell the format" in result.stdout
    for link in (f"{folder}/link.csv", f"{folder}/linked/more.csv"):
        assert f"{link}: FAILED: {link} is a link to a file outside the server's --import-root" in result.stdout
    assert stored(server, "local_test") == 85 and stored(server, "outside") == 0
    bad = abstream_import(server, "ftp://somewhere/x")
    assert bad.returncode == 2 and "ftp:// is not supported" in bad.stderr
    with Client(server.address) as client, pytest.raises(grpc.RpcError) as xml:
        list(client.import_events(str(folder), format="xml"))
    assert (xml.value.code(), xml.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                       "format: must be parquet, arrow, csv or ndjson, not 'xml'")
    server.terminate()
    server = Server(tmp_path / "data").start()  # without --import-root: no local file at all
    refused = abstream_import(server, str(folder))
    assert refused.returncode == 2 and "--import-root" in refused.stderr
    assert stored(server, "outside") == 0
    server.terminate()


def test_an_import_when_the_log_fails_fails_and_is_imported_after_a_restart(tmp_path):
    """The log fails (a full disk: a file size limit on the server) under an import: the object
    is reported failed, with the log's reason, not "imported" (the sequence the failed batch
    left in memory was taken for what is stored, and the rest skipped), nor retried for ever;
    the next import on that server is refused at once, and after a restart the object is
    imported whole."""
    import resource

    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "one.csv").write_bytes(csv_bytes(events(50, "logfail")))
    server = Server(tmp_path / "data", "--import-root", str(folder)).start()
    segment = max((tmp_path / "data" / "wal").glob("wal-*.log"))
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (segment.stat().st_size + 100, resource.RLIM_INFINITY))
    result = abstream_import(server, str(folder))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"{folder}/one.csv: FAILED: {folder}/one.csv not imported: the write-ahead log could not be written (" \
        in result.stdout, result.stdout
    time.sleep(1.5)  # the server's next tick notices the log failed
    again = abstream_import(server, str(folder))
    assert again.returncode != 0 and "the write-ahead log could not be written" in again.stderr, again
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    assert server.terminate() == 0
    server.start()
    assert stored(server, "logfail") == 0
    result = abstream_import(server, str(folder))
    assert result.returncode == 0 and f"{folder}/one.csv: 50 stored" in result.stdout, result.stdout
    assert stored(server, "logfail") == 50
    server.terminate()


def test_an_object_of_unreadable_lines_fails_past_the_limit_and_the_others_are_imported(tmp_path):
    """150,000 lines of junk (1.2 KB gzipped) fail their object after 100,000, as an HTTP body's
    do, rather than each going to the quarantine (pushing out what it held) through the one
    thread that stores every stream's events; the object beside it is imported."""
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "junk.ndjson.gz").write_bytes(gzip.compress(b"x\n" * 150_000))
    (folder / "good.csv").write_bytes(csv_bytes(events(20, "beside_junk")))
    server = Server(tmp_path / "data", "--import-root", str(folder)).start()
    result = abstream_import(server, str(folder))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"{folder}/junk.ndjson.gz: FAILED: cannot read {folder}/junk.ndjson.gz: more than 100,000 lines of " \
        in result.stdout, result.stdout
    assert f"{folder}/good.csv: 20 stored" in result.stdout
    with Client(server.address) as client:
        assert client.quarantine().total <= 100_000
    server.terminate()


def test_an_import_watching_a_server_that_hangs_ends_with_one_line_instead_of_waiting_for_ever(tmp_path):
    """A stream without a deadline (an import, an export) on a server that hangs (SIGSTOP: its
    connection stays open, and nothing answers) ends once a keepalive ping goes unanswered:
    within 30 s, not never."""
    import signal

    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "one.csv").write_bytes(csv_bytes(events(10, "hang_watch")))
    server = Server(tmp_path / "data", "--import-root", str(folder)).start()
    watching = subprocess.Popen([str(BIN / "abstream"), "import", str(folder), "--addr", server.address, "--watch",
                                 "--interval", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while stored(server, "hang_watch") < 10:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            out, err = watching.communicate(timeout=120)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
    finally:
        watching.kill()
    assert watching.returncode == 2 and "Traceback" not in err, (out, err)
    assert f"the server at {server.address} stopped answering" in err, err
    server.terminate()


def test_a_parquet_object_that_decodes_past_what_its_rows_could_hold_fails_alone_unread(bucket, tmp_path):
    """A few MB of compressed, distinct long strings decode to gigabytes: such an object fails
    alone, its row groups' sizes read from its footer, and the objects beside it are imported."""
    client, name = bucket
    n, long = 5_000, "x" * 20_000
    bomb = events(n, "bomb_test").set_column(7, "session_id", pa.array([f"{i:06d}{long}" for i in range(n)]))
    sink = io.BytesIO()
    pq.write_table(bomb, sink, compression="zstd", use_dictionary=False)
    assert len(sink.getvalue()) < 4 << 20  # 100 MB of strings
    client.put_object(Bucket=name, Key="b/a_bomb.parquet", Body=sink.getvalue())
    client.put_object(Bucket=name, Key="b/b_fine.parquet", Body=parquet_bytes(events(20, "fine_test")))
    server = Server(tmp_path / "data").start()
    try:
        result = abstream_import(server, f"s3://{name}/b/")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "a_bomb.parquet: FAILED: " in result.stdout and "bytes of event columns uncompressed, more than its " \
            "5,000 rows could as events" in result.stdout, result.stdout
        assert stored(server, "fine_test") == 20 and stored(server, "bomb_test") == 0
    finally:
        server.terminate()


def test_a_request_names_only_an_s3_endpoint_the_operator_allowed(bucket, tmp_path):
    """The endpoint an import names is where the server connects: its own (AWS_ENDPOINT_URL) and
    those listed with --import-endpoints only, so that an admin token cannot make it reach other
    hosts of its network."""
    client, name = bucket
    client.put_object(Bucket=name, Key="e/one.parquet", Body=parquet_bytes(events(10, "endpoint_test")))
    own = os.environ["AWS_ENDPOINT_URL"]
    elsewhere = f"http://127.0.0.1:{free_port()}"
    server = Server(tmp_path / "data").start()
    try:
        assert abstream_import(server, f"s3://{name}/e/", "--endpoint-url", own).returncode == 0
        refused = abstream_import(server, f"s3://{name}/e/", "--endpoint-url", elsewhere)
        assert refused.returncode == 2 and f"'{elsewhere}' is not an endpoint this server imports from" in refused.stderr
        assert "--import-endpoints" in refused.stderr and stored(server, "endpoint_test") == 10
    finally:
        server.terminate()
    server = Server(tmp_path / "data", "--import-endpoints", f"{elsewhere},https://s3.example.com").start()
    try:  # listed: tried (nothing listens there)
        tried = abstream_import(server, f"s3://{name}/e/", "--endpoint-url", elsewhere)
        assert tried.returncode != 0 and "is not an endpoint this server imports from" not in tried.stderr
    finally:
        server.terminate()


def test_import_needs_the_admin_scope(tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "writer"\nsha256 = "{hash_token("w")}"\nscopes = ["ingest"]\n')
    server = Server(tmp_path / "data", "--tokens-file", str(tokens)).start()
    result = abstream_import(server, str(tmp_path), token="w")
    assert result.returncode == 2 and "admin" in result.stderr
    server.terminate()


def test_writers_side_files_are_skipped_keys_are_taken_whole_and_gzip_is_known_by_its_bytes(bucket, tmp_path):
    """Spark and Hadoop write `_temporary/…/part-*` and then copy it to its own name (imported
    twice), and a `_SUCCESS` marker (failed on every run); `#` in a key cut the URI there as a
    URL's fragment (`run#2/` imported every run); a gzipped object named `.ndjson` was read as
    text, its bytes quarantined, and marked imported."""
    client, name = bucket
    client.put_object(Bucket=name, Key="out/run#1/part-0.parquet", Body=parquet_bytes(events(10, "side_one")))
    client.put_object(Bucket=name, Key="out/run#2/part-0.parquet", Body=parquet_bytes(events(20, "side_two")))
    client.put_object(Bucket=name, Key="out/run#2/_temporary/0/part-0.parquet", Body=parquet_bytes(events(20, "side_two")))
    client.put_object(Bucket=name, Key="out/run#2/_SUCCESS", Body=b"")
    client.put_object(Bucket=name, Key="out/run#2/.part-1.crc", Body=b"\0\1")
    client.put_object(Bucket=name, Key="out/run#2/zipped.ndjson", Body=ndjson_gz(events(30, "side_two", 20)))
    server = Server(tmp_path / "data").start()
    try:
        result = abstream_import(server, f"s3://{name}/out/run#2/")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines() == [f"s3://{name}/out/run#2/part-0.parquet: 20 stored, 0 quarantined",
                                              f"s3://{name}/out/run#2/zipped.ndjson: 30 stored, 0 quarantined",
                                              "2 objects: 50 events stored, 0 quarantined"]
        assert (stored(server, "side_two"), stored(server, "side_one")) == (50, 0)
        # What is typed is not tested: a key prefix starting with _, or an object named whole.
        typed = abstream_import(server, f"s3://{name}/out/run#2/_temp")
        assert typed.returncode == 0 and "_temporary/0/part-0.parquet: 20 stored" in typed.stdout, typed.stdout
        named = abstream_import(server, f"s3://{name}/out/run#2/_temporary/0/part-0.parquet")
        assert named.returncode == 0 and "imported before" in named.stdout, named.stdout + named.stderr
    finally:
        server.terminate()


def test_a_watch_goes_on_while_the_store_cannot_be_reached(bucket, monkeypatch, tmp_path):
    """A store that does not answer was the caller's mistake (INVALID_ARGUMENT), and ended a
    `--watch` for good; it is UNAVAILABLE now, and the watch tries again at its next round."""
    _, name = bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    server = Server(tmp_path / "data").start()
    watching = subprocess.Popen([str(BIN / "abstream"), "import", f"s3://{name}/landing/", "--watch", "--interval",
                                 "0.2", "--addr", server.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        for _ in range(2):
            said = watching.stderr.readline()
            assert "cannot list" in said and "trying again in 1 s" in said, said  # as long as the server asks
        assert watching.poll() is None
    finally:
        watching.kill()
        watching.communicate(timeout=10)
        once = abstream_import(server, f"s3://{name}/landing/")
        server.terminate()
    assert once.returncode == 2 and "UNAVAILABLE" in once.stderr + once.stdout, once.stderr


def test_a_server_stopping_mid_import_begins_no_more_objects(bucket, tmp_path):
    """Stopping, the server read and refused every object left (a FAILED line each, and the
    stop held for them); the import now ends at the next object, saying why."""
    client, name = bucket
    for i in range(40):
        client.put_object(Bucket=name, Key=f"many/{i:03d}.csv", Body=csv_bytes(events(2000, "stopping", 2000 * i)))
    server = Server(tmp_path / "data").start()
    running = subprocess.Popen([str(BIN / "abstream"), "import", f"s3://{name}/many/", "--addr", server.address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert running.stdout.readline().startswith(f"s3://{name}/many/000.csv: 2,000 stored")
    server.process.send_signal(2)  # SIGINT: a graceful stop
    out, err = running.communicate(timeout=60)
    server.process.wait(60)
    assert out.count("FAILED") <= 1 and len(out.splitlines()) < 10, out  # the object under way, at most
    assert running.returncode == 2 and "the server is stopping" in err, err
    server = Server(tmp_path / "data").start()
    try:
        rest = abstream_import(server, f"s3://{name}/many/")
        assert rest.returncode == 0 and rest.stdout.splitlines()[-1].startswith("40 objects"), rest.stdout
        assert stored(server, "stopping") == 80_000
    finally:
        server.terminate()


def test_an_arrow_object_that_decompresses_past_what_its_rows_could_hold_fails_alone_unread(bucket, tmp_path):
    """An Arrow file's buffers may be compressed: 2 MB of zstd-compressed zeros decompressed to
    2 GB, every batch read whole. Its messages' metadata is read first, and such an object fails
    alone; an honest one of a record batch larger than a request is sent in pieces."""
    client, name = bucket
    rows = 10
    zeros = pa.table({"timestamp": pa.array([1_745_000_000_000_000_000] * rows, pa.timestamp("ns", "UTC")),
                      "user_id": ["u"] * rows, "test_id": ["bomb_arrow"] * rows, "variant": ["a"] * rows,
                      "padding": pa.array(np.zeros((rows, 25_000_000 // rows), np.int64).tolist(),
                                          pa.list_(pa.int64()))})
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, zeros.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(zeros)
    assert len(sink.getvalue()) < 1 << 20  # 200 MB of zeros
    client.put_object(Bucket=name, Key="arrow/a_bomb.arrow", Body=sink.getvalue())
    big = events(300_000, "big_arrow")
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, big.schema) as writer:
        writer.write_table(big, max_chunksize=300_000)  # one record batch, more than a request takes
    client.put_object(Bucket=name, Key="arrow/b_big.arrow", Body=sink.getvalue())
    server = Server(tmp_path / "data").start()
    try:
        result = abstream_import(server, f"s3://{name}/arrow/")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "a_bomb.arrow: FAILED: " in result.stdout and "more than its 10 rows could hold as events" \
            in result.stdout, result.stdout
        assert "b_big.arrow: 300,000 stored" in result.stdout, result.stdout
        assert stored(server, "big_arrow") == 300_000 and stored(server, "bomb_arrow") == 0
    finally:
        server.terminate()


def test_an_object_without_events_is_recorded_imported_too(bucket, tmp_path):
    """A CSV of its header alone, or an empty file, sent nothing, so nothing recorded it: it was
    read again, and said imported, at every run (every round of a --watch)."""
    client, name = bucket
    client.put_object(Bucket=name, Key="quiet/header.csv", Body=b"timestamp,user_id,test_id,variant\n")
    client.put_object(Bucket=name, Key="quiet/empty.ndjson", Body=b"")
    client.put_object(Bucket=name, Key="quiet/some.csv", Body=csv_bytes(events(5, "quiet_test")))
    server = Server(tmp_path / "data").start()
    try:
        first = abstream_import(server, f"s3://{name}/quiet/")
        assert first.returncode == 0 and first.stdout.count(": 0 stored, 0 quarantined") == 2, first.stdout
        server.terminate()
        server = Server(tmp_path / "data").start()  # recorded durably, as events are
        again = abstream_import(server, f"s3://{name}/quiet/")
        assert again.returncode == 0 and again.stdout.count("imported before") == 3, again.stdout
        assert stored(server, "quiet_test") == 5
    finally:
        server.terminate()
