"""The `abstream` command and the Python client as a person uses them on day one: one readable
line for every mistake, files imported exactly once, inclusive ends, TLS, typed results,
experiments with their plan, time zones and sample sizes, on real servers."""

from __future__ import annotations

import collections
import contextlib
import csv
import datetime as dt
import io
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator
from zoneinfo import ZoneInfo

import grpc
import pytest
from abstream.clients import Client, Delivery, Producer
from abstream.core.settings import Settings

from tests.conftest import ServerThread, engine_settings
from tests.process import Server
from tests.test_security import TOKENS, make_pki, tokens_file

BIN = Path(sys.executable).parent


def run(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "abstream"), *args], capture_output=True, text=True, timeout=timeout,
                          input=input, env={**os.environ, **(env or {})})


def one_line(result: subprocess.CompletedProcess) -> str:
    """The error a person sees: exactly one line on stderr, no traceback, exit code 2."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and result.returncode == 2, (result.returncode, result.stderr)
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def event(i: int, test_id: str, variant: str, when: str = "2025-04-28 18:42:22", **fields) -> dict:
    return {"timestamp": when, "user_id": f"user_{i}", "test_id": test_id, "variant": variant, "event_type": "click",
            "conversion": 0, "revenue": 0.0, **fields}


def write_ndjson(path: Path, events) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def events_of(address: str, test_id: str, **query) -> int:
    with Client(address) as client:
        return sum(r.metrics.events for r in client.summary(test_id, **query).rows)


# ---- failing clearly ------------------------------------------------------------------------------

def test_every_command_fails_fast_with_one_line_when_nothing_listens(tmp_path):
    path = write_ndjson(tmp_path / "e.ndjson", [event(i, "t", "A") for i in range(30_000)])
    addr = f"127.0.0.1:{free_port()}"
    for args in (("ingest", str(path)), ("summary", "t"), ("tests",), ("experiment", "list"), ("power", "t",
                                                                                                    "--mde", "0.1"),
                 ("export", "t", "-o", str(tmp_path / "out.ndjson")), ("import", "s3://bucket/prefix/")):
        # (export and import waited the whole --timeout, then said the server was not ready)
        started = time.monotonic()
        line = one_line(run(*args, "--addr", addr, "--timeout", "3"))
        assert time.monotonic() - started < 30, args  # retries are bounded by --timeout, not minutes
        assert line.startswith(f"abstream {args[0]}") and f"cannot reach the server at {addr}" in line, line
        assert "abstream serve" in line and "--addr" in line and "Rendezvous" not in line


def test_a_missing_or_insufficient_token_says_which_option_to_use(tmp_path):
    secured = ServerThread(Settings(addr="127.0.0.1:0", data_dir="",
                                    tokens_file=str(tokens_file(tmp_path / "tokens.toml")))).start()
    try:
        line = one_line(run("tests", "--addr", secured.address))
        assert "needs a token: pass --token or set ABSTREAM_TOKEN" in line and "metadata" not in line
        path = write_ndjson(tmp_path / "e.ndjson", [event(1, "t", "A")])
        line = one_line(run("ingest", str(path), "--addr", secured.address, "--token", TOKENS["reader"][0]))
        assert "refused" in line and "ingest" in line
        wrong = one_line(run("tests", "--addr", secured.address, "--token", "not-a-token"))
        assert "did not accept the token given by --token or ABSTREAM_TOKEN" in wrong
        ok = run("tests", "--addr", secured.address, env={"ABSTREAM_TOKEN": TOKENS["reader"][0]})
        assert ok.returncode == 0, ok.stderr
    finally:
        secured.stop()


def test_a_users_mistakes_get_messages_not_tracebacks(server, tmp_path):
    line = one_line(run("ingest", str(tmp_path / "missing.ndjson"), "--addr", server.address))
    assert f"no such file: {tmp_path / 'missing.ndjson'}" in line
    bad_start = run("summary", "t", "--start", "28/04/2025", "--addr", server.address)
    assert bad_start.returncode == 2 and "Traceback" not in bad_start.stderr
    assert "'28/04/2025' is not a date and time: use 'YYYY-MM-DD'" in bad_start.stderr
    for option in ("--guardrails", "--metric-event-type", "--session-metrics"):  # the server refuses them for a lift
        lift = run("lift", "t", option, *(["conversion=2%"] if option == "--guardrails" else
                                          ["purchase"] if option == "--metric-event-type" else []),
                   "--addr", server.address)
        assert lift.returncode == 2 and f"unrecognized arguments: {option}" in lift.stderr, lift.stderr
    serve = subprocess.run([str(BIN / "abstream"), "serve", "--addr", "127.0.0.1:0", "--data-dir", "/proc/nope"],
                           capture_output=True, text=True, timeout=60)
    assert serve.returncode != 0 and "Traceback" not in serve.stderr
    assert "/proc/nope" in serve.stderr and len(serve.stderr.strip().splitlines()) <= 3, serve.stderr
    ratio = subprocess.run([str(BIN / "abstream"), "serve", "--addr", "127.0.0.1:0", "--snapshot-log-ratio", "-1"],
                           capture_output=True, text=True, timeout=60)
    assert ratio.returncode == 2 and "Traceback" not in ratio.stderr
    assert "--snapshot-log-ratio must be at least 0, not -1.0" in ratio.stderr
    for args, words in [(("--max-batch-events", "0"), "--max-batch-events must be more than 0, not 0"),
                        (("--max-ingest-streams", "0"), "--max-ingest-streams must be more than 0, not 0"),
                        (("--max-message-bytes", "-5"), "--max-message-bytes must be more than 0, not -5"),
                        (("--grace-seconds", "-3"), "--grace-seconds must be at least 0, not -3.0")]:
        refused = subprocess.run([str(BIN / "abstream"), "serve", "--addr", "127.0.0.1:0", "--data-dir", "", *args],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr and words in refused.stderr, refused.stderr
    # A variable that does not parse is named, for serve and for the commands that read none.
    for command, variable, words in [
            (["serve", "--data-dir", ""], "ABSTREAM_MAX_MESSAGE_BYTES=16MiB",
             "ABSTREAM_MAX_MESSAGE_BYTES='16MiB' is not a whole number"),
            (["serve", "--data-dir", ""], "ABSTREAM_INSECURE=maybe", "ABSTREAM_INSECURE='maybe' is not true or false"),
            (["token", "someone"], "ABSTREAM_GRACE_SECONDS=soon", "")]:
        name, value = variable.split("=")
        done = subprocess.run([str(BIN / "abstream"), *command], capture_output=True, text=True, timeout=60,
                              env={**os.environ, name: value})
        assert "Traceback" not in done.stderr, done.stderr
        assert (done.returncode == 2 and words in done.stderr) if words else done.returncode == 0, done.stderr
    for flag in ("--retention-days", "--retention-sweep-seconds"):
        nan = subprocess.run([str(BIN / "abstream"), "serve", "--addr", "127.0.0.1:0", flag, "nan"],
                             capture_output=True, text=True, timeout=60)
        assert nan.returncode == 2 and "Traceback" not in nan.stderr, nan.stderr
        assert f"{flag} must be a finite number, not nan" in nan.stderr, nan.stderr
    line = one_line(run("summary", "", "--addr", server.address))
    assert "INVALID_ARGUMENT" in line and "test_id" in line
    for args, words in [(("quarantine", "--limit", "-1"), "argument --limit: '-1': a whole number from 1 to "),
                        (("quarantine", "--limit", "99999999999"), "'99999999999': a whole number from 1 to 4,294,967,295"),
                        (("ingest", "x.ndjson", "--batch-size", "0"), "argument --batch-size: '0': a whole number"),
                        (("power", "t", "--users", "-3"), "argument --users: '-3': a whole number from 0 to "),
                        (("tests", "--timeout", "nan"), "argument --timeout: 'nan': a number of seconds above 0"),
                        (("tests", "--timeout", "-1"), "argument --timeout: '-1': a number of seconds above 0"),
                        (("import", "s3://b/p/", "--watch", "--interval", "-1"),
                         "argument --interval: '-1': a number of seconds above 0")]:
        usage = run(*args, "--addr", server.address)
        assert usage.returncode == 2 and "Traceback" not in usage.stderr and words in usage.stderr, usage.stderr
    assert one_line(run("ingest", str(tmp_path), "--addr", server.address)) == \
        f"abstream ingest: cannot read {tmp_path}: is a directory: give the files in it"
    assert one_line(run("tests", "--addr", "")) == \
        "abstream tests: --addr (ABSTREAM_ADDR) is empty: give the server's HOST:PORT"
    assert "holds a line break" in one_line(run("tests", "--addr", server.address, "--token", "abc\ndef"))
    (tmp_path / "empty.pem").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"not a certificate\n")
    for option, name, holds in [("--ca", "empty.pem", "CERTIFICATE"), ("--ca", "notes.txt", "CERTIFICATE"),
                                ("--cert", "notes.txt", "CERTIFICATE")]:
        line = one_line(run("tests", "--addr", server.address, option, str(tmp_path / name),
                            *(("--key", str(tmp_path / "notes.txt")) if option == "--cert" else ())))
        assert line == (f"abstream tests: {option} {tmp_path / name}: not a PEM file holding a {holds.lower()} "
                        f"(no '-----BEGIN {holds}-----' line)"), line
    for end in ("9999-12-31", "9999-12-31 23:59:59"):  # the calendar's last day and second: to its last instant
        answer = run("summary", "nothing_here", "--end", end, "--addr", server.address)
        assert answer.returncode == 0 and "Traceback" not in answer.stderr, answer.stderr
        assert "there is no test 'nothing_here'" in answer.stderr, answer.stderr


@contextlib.contextmanager
def peer_answering(abort: Callable) -> Iterator[tuple[str, collections.Counter]]:
    """A gRPC server on a loopback port that answers every call with `abort(context)`: a server
    in a state ours is hard to bring about (relaying a database's error, asking for a wait).
    Yields its address and the calls it was sent, by method."""
    from concurrent import futures

    calls: collections.Counter = collections.Counter()

    class Everything(grpc.GenericRpcHandler):
        def service(self, details):
            calls[details.method.rpartition("/")[2]] += 1
            if details.method.endswith("IngestEvents"):
                return grpc.stream_stream_rpc_method_handler(lambda requests, context: abort(context))
            return grpc.unary_unary_rpc_method_handler(lambda request, context: abort(context))

    peer = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
    peer.add_generic_rpc_handlers((Everything(),))
    port = peer.add_insecure_port("127.0.0.1:0")
    peer.start()
    try:
        yield f"127.0.0.1:{port}", calls
    finally:
        peer.stop(0)


def test_a_servers_answer_that_names_a_refused_connection_is_not_taken_for_no_server(tmp_path):
    """A server relays a database's words ("Connection refused (ch1:9000)"): it answered, so the
    command says what it answered and ingest retries as for any server that is unavailable for a
    while (it said "is it running? Start one with abstream serve", and ingest gave up at once)."""
    relayed = "shard 1 has no replica that answers: Code: 210. DB::NetException: Connection refused (ch1:9000)"

    def unavailable(context):
        context.set_trailing_metadata((("x-request-id", "req-1"),))
        context.abort(grpc.StatusCode.UNAVAILABLE, relayed)

    with peer_answering(unavailable) as (addr, calls):
        line = one_line(run("summary", "t", "--addr", addr, "--timeout", "5"))
        assert f"the server at {addr} answered UNAVAILABLE: {relayed}" in line, line
        path = write_ndjson(tmp_path / "e.ndjson", [event(i, "t", "A") for i in range(10)])
        line = one_line(run("ingest", str(path), "--addr", addr, "--timeout", "3"))
        assert f"answered UNAVAILABLE: {relayed}" in line, line
        assert calls["IngestEvents"] > 1  # retried within --timeout, as a server unavailable for a while


def test_ingest_waits_as_long_as_the_server_asks_before_sending_again(tmp_path):
    """RESOURCE_EXHAUSTED with a RetryInfo of 2 s (a full disk says a minute): within --timeout 3
    the file is sent twice, 2 s apart (it was sent 5 times, its own backoff's 0.1 s doubling)."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    def asking(seconds: int):
        """An answer of a full disk that asks for `seconds` before the next try."""
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds)))
        status = rpc_status.to_status(status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                                                        message="the disk is full", details=[detail]))
        return lambda context: context.abort_with_status(status._replace(
            trailing_metadata=(*status.trailing_metadata, ("x-request-id", "req-2"))))

    full = asking(2)
    with peer_answering(full) as (addr, calls):
        path = write_ndjson(tmp_path / "e.ndjson", [event(i, "t", "A") for i in range(10)])
        line = one_line(run("ingest", str(path), "--addr", addr, "--timeout", "3"))
        assert "answered RESOURCE_EXHAUSTED: the disk is full" in line, line
        assert calls["IngestEvents"] == 2
    with peer_answering(full) as (addr, calls):  # the Producer too: sent at 0, 2 and 3 s, then given up
        with Producer(addr, give_up_after_s=3, linger_ms=0) as producer:
            delivery = producer.send(event(1, "t", "A"))
            with pytest.raises(grpc.RpcError) as refused:
                delivery.result(30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert calls["IngestEvents"] == 3
    with peer_answering(asking(60)) as (addr, calls):  # closed while it waits a minute: the wait ends
        producer = Producer(addr, linger_ms=0)
        delivery = producer.send(event(1, "t", "A"))
        deadline = time.monotonic() + 10
        while not calls["IngestEvents"] and time.monotonic() < deadline:
            time.sleep(0.02)
        closing = threading.Thread(target=producer.close, args=(1,))
        closing.start()
        closing.join(30)
        assert not closing.is_alive()  # it slept out the server's minute before
        assert delivery.exception(5) is not None


def test_a_server_that_accepts_and_never_answers_is_given_up_on_at_the_timeout_by_streams_too():
    """And by the calls that may take minutes (snapshot, delete-test, erase-user): they waited an
    hour, whatever --timeout said."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        for args in (("export", "x"), ("import", "s3://bucket/prefix/"), ("snapshot",), ("delete-test", "x", "--yes"),
                     ("erase-user", "u", "--yes")):
            started = time.monotonic()
            line = one_line(run(*args, "--addr", address, "--timeout", "2", timeout=60))
            assert line == f"abstream {args[0]}: the server at {address} did not answer within 2s (--timeout)", line
            assert time.monotonic() - started < 30


def test_a_failed_export_leaves_the_file_as_it_was_and_one_that_succeeds_replaces_it(server, tmp_path):
    """The file was opened, and emptied, before the server was reached: an export that then
    failed left a previous good export as 0 bytes."""
    exports = tmp_path / "exports"
    exports.mkdir()
    out = exports / "events.csv"
    out.write_text("the previous export\n")
    line = one_line(run("export", "t", "--output", str(out), "--addr", f"127.0.0.1:{free_port()}", "--timeout", "2"))
    assert line.startswith("abstream export: "), line
    assert out.read_text() == "the previous export\n"
    assert [p.name for p in exports.iterdir()] == ["events.csv"]  # nothing of the failed one left beside it
    assert run("ingest", str(write_ndjson(exports / "e.ndjson", [event(1, "t", "A")])), "--addr",
               server.address).returncode == 0
    done = run("export", "t", "--output", str(out), "--addr", server.address)
    assert done.returncode == 0 and "t: 1 events" in done.stderr, done.stderr
    assert out.read_text().splitlines()[0].startswith('"timestamp","user_id"') and len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in exports.iterdir()) == ["e.ndjson", "events.csv"]
    assert out.stat().st_mode & 0o777 == (exports / "e.ndjson").stat().st_mode & 0o777  # as any new file's


def test_a_reader_that_stops_early_ends_the_command_quietly(server, tmp_path):
    events = [event(i, "pipe", "AB"[i % 2], when=f"2025-04-{1 + i // 1440:02d} {i % 1440 // 60:02d}:{i % 60:02d}:00")
              for i in range(4000)]
    assert run("ingest", str(write_ndjson(tmp_path / "e.ndjson", events)), "--addr", server.address).returncode == 0
    reader = subprocess.Popen([str(BIN / "abstream"), "timeseries", "pipe", "--interval", "minute", "--format",
                               "ndjson", "--addr", server.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout.read(10)  # `| head -c 10`: ~1 MB of rows follow, far more than a pipe holds
    reader.stdout.close()
    assert reader.wait(timeout=60) == 0
    errors = reader.stderr.read()
    assert b"Traceback" not in errors and b"BrokenPipe" not in errors and errors == b"", errors


# ---- files: counted, worded, exactly once -------------------------------------------------------------

def test_every_rejected_line_is_counted_once_in_the_servers_words(server, tmp_path):
    lines = [json.dumps(event(1, "bad", "A", conversion=1)),
             json.dumps(event(2, "bad", "A", conversion="yes")),  # found by the command: never sent
             "{not json",  # found by the command
             json.dumps(event(3, "bad", "B", conversion=2)),  # found by the server: quarantined
             json.dumps({k: v for k, v in event(4, "bad", "B").items() if k != "user_id"}),  # the server
             json.dumps(event(5, "bad", "B", when="28/04/2025"))]  # the command
    path = tmp_path / "bad.ndjson"
    path.write_text("\n".join(lines) + "\n")
    result = run("ingest", str(path), "--addr", server.address)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[0] == ("accepted 1, rejected 5 (2 by the server, kept in its quarantine; "
                                             "3 not sent)")
    out = result.stdout
    assert f'not sent: conversion: conversion must be 0 or 1, got "yes"  ({path}:2)' in out
    assert f"conversion: conversion must be 0 or 1, got 2  ({path}:4)" in out
    assert f"user_id: user_id is required and was empty or absent  ({path}:5)" in out
    assert f"({path}:3)" in out and "not valid JSON" in out
    assert "not sent: timestamp: timestamp must be 'YYYY-MM-DD HH:MM:SS'" in out and f"({path}:6)" in out
    assert "invalid literal" not in out and "line: " not in out.replace("not sent: line:", "")
    with Client(server.address) as client:
        assert client.quarantine("bad").total == 2  # what the server rejected, nothing the command kept back


def test_a_line_too_long_for_any_request_is_not_sent_and_every_other_line_is_stored(server, tmp_path):
    """A string of a megabyte or more made the server refuse the whole batch (its Arrow stream
    decompressed to more than its rows may take): no line of the file was stored."""
    huge = 1_500_000
    lines = [event(1, "huge", "A"), event(2, "huge", "A"), event(3, "huge", "B", session_id="s" * huge),
             event(4, "huge", "B"), event(5, "huge", "A", event_type="e" * huge),  # a dictionary-encoded column
             event(6, "huge", "B", country="c" * 300),  # sent: the server rejects it, into its quarantine
             event(7, "huge", "A")]
    path = write_ndjson(tmp_path / "huge.ndjson", lines)
    result = run("ingest", str(path), "--addr", server.address)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[0] == ("accepted 4, rejected 3 (1 by the server, kept in its quarantine; "
                                             "2 not sent)"), result.stdout
    assert f"not sent: session_id: session_id is {huge:,} bytes long; at most 256 are accepted  ({path}:3)" \
        in result.stdout
    assert f"not sent: event_type: event_type is {huge:,} bytes long; at most 256 are accepted  ({path}:5)" \
        in result.stdout
    assert f"country: country is 300 bytes long; at most 256 are accepted  ({path}:6)" in result.stdout
    assert events_of(server.address, "huge") == 4

    rows = ["timestamp,user_id,test_id,variant"] + [f"2025-04-28 18:42:{i:02},u{i},huge_csv,A" for i in range(5)]
    rows[3] = rows[3].replace(",u2,", ",u" + "2" * 1_200_000 + ",")
    csv_path = tmp_path / "huge.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    result = run("ingest", str(csv_path), "--addr", server.address)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[0] == "accepted 4, rejected 1 (not sent: not readable as events)", result.stdout
    assert f"user_id: user_id is 1,200,001 bytes long; at most 256 are accepted  ({csv_path}:4)" in result.stdout
    assert events_of(server.address, "huge_csv") == 4


def test_a_file_is_stored_once_however_often_it_is_sent(server, tmp_path):
    path = write_ndjson(tmp_path / "e.ndjson", [event(i, "once", "AB"[i % 2]) for i in range(50_000)])
    first = run("ingest", str(path), "--addr", server.address, "--batch-size", "5000")
    assert first.returncode == 0 and first.stdout.startswith("accepted 50,000, rejected 0"), first.stdout
    again = run("ingest", str(path), "--addr", server.address, "--batch-size", "5000")
    assert again.returncode == 0
    assert again.stdout.startswith("accepted 0, rejected 0; 50,000 already stored"), again.stdout
    copy = tmp_path / "renamed.ndjson"
    copy.write_bytes(path.read_bytes())  # the producer id is the content's, not the name's
    assert "50,000 already stored" in run("ingest", str(copy), "--addr", server.address, "--batch-size",
                                          "5000").stdout
    assert events_of(server.address, "once") == 50_000
    forced = run("ingest", str(path), "--addr", server.address, "--allow-duplicates")
    assert forced.stdout.startswith("accepted 50,000")
    assert events_of(server.address, "once") == 100_000
    piped = json.dumps(event(0, "stdin", "A")) + "\n"
    for _ in range(2):
        sent = run("ingest", "--producer-id", "nightly-1", "--input-format", "ndjson", "-", "--addr", server.address,
                   input=piped)
        assert sent.returncode == 0
    assert events_of(server.address, "stdin") == 1


class Progress:
    """Reads a running `abstream ingest`'s progress lines from its standard error."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.text = b""
        self._process = process
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self._process.stderr.read1(4096):
            self.text += chunk

    def wait_for_lines(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while b" / " not in self.text:
            assert time.monotonic() < deadline and self._process.poll() is None, self.text
            time.sleep(0.01)


def test_an_interrupted_import_resumes_without_storing_anything_twice(tmp_path):
    port = free_port()
    server = Server(tmp_path / "data", "--addr", f"127.0.0.1:{port}").start()
    total = 200_000
    path = write_ndjson(tmp_path / "e.ndjson", [event(i, "resume", "AB"[i % 2]) for i in range(total)])
    env = {**os.environ, "ABSTREAM_PROGRESS": "1"}
    command = [str(BIN / "abstream"), "ingest", str(path), "--addr", server.address, "--batch-size", "2000"]

    # The server killed mid-import and back within --timeout: the command resumes by itself.
    cli = subprocess.Popen([*command, "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    Progress(cli).wait_for_lines()
    server.kill()
    time.sleep(0.5)
    server.start()
    out, _ = cli.communicate(timeout=180)
    assert cli.returncode == 0 and out.decode().startswith("accepted "), out
    assert events_of(server.address, "resume") == total

    # Killed and not back within --timeout: the command gives up; run again, it sends the rest.
    second = write_ndjson(tmp_path / "f.ndjson", [event(i, "resume2", "AB"[i % 2]) for i in range(total)])
    cli = subprocess.Popen([*command[:2], str(second), *command[3:], "--timeout", "2"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env)
    progress = Progress(cli)
    progress.wait_for_lines()
    server.kill()
    cli.wait(timeout=120)
    assert cli.returncode == 2 and b"cannot reach the server" in progress.text
    server.start()
    stored_before = events_of(server.address, "resume2")
    assert 0 < stored_before < total
    rerun = run(*command[1:2], str(second), *command[3:])
    assert rerun.returncode == 0, rerun.stderr
    accepted, already = rerun.stdout.split(";", 1)
    assert accepted.startswith(f"accepted {total - stored_before:,}") and f"{stored_before:,} already stored" in already
    assert events_of(server.address, "resume2") == total


def test_ndjson_is_read_in_blocks_that_keep_every_line_number(tmp_path):
    """Blocks of bytes parsed by Arrow: blank lines, CRLF endings, a line longer than a block and
    a last line without an end keep their numbers, so rejections and sequences name real lines."""
    from abstream.clients import files

    good = [json.dumps(event(i, "blocks", "A")) for i in range(40)]
    long = json.dumps(event(99, "blocks", "B", session_id="s" * 5000))
    lines = good[:10] + ["", "   "] + good[10:20] + [long, "{bad"] + good[20:]
    path = tmp_path / "e.ndjson"
    path.write_bytes("\r\n".join(lines).encode())  # CRLF, and no end to the last line
    for batch in (2, 7, 1000):
        chunks = list(files.read(str(path), "ndjson", batch))
        numbers = [int(n) for c in chunks for n in c.lines]
        expected = [i + 1 for i, line in enumerate(lines) if line.strip() and line != "{bad"]
        assert numbers == expected, batch
        assert [p[:2] for c in chunks for p in c.problems] == [(lines.index("{bad") + 1, "line")]
        assert all(c.table.num_rows <= batch for c in chunks)
        lasts = [c.last for c in chunks]
        assert lasts == sorted(set(lasts)) and lasts[-1] == len(lines)  # increasing: the sequences
        users = [u for c in chunks for u in c.table.column("user_id").to_pylist()]
        assert users == [json.loads(lines[n - 1])["user_id"] for n in expected]


def test_csv_headers_are_checked_before_any_row_is_sent(server, tmp_path):
    missing = tmp_path / "missing.csv"
    missing.write_text("time,user,test_id,variant\n2025-04-28 18:42:22,u1,t,A\n")
    line = one_line(run("ingest", str(missing), "--addr", server.address))
    assert "the header names no timestamp, user_id column" in line and "found: 'time', 'user'" in line
    assert events_of(server.address, "t") == 0

    european = tmp_path / "european.csv"
    european.write_text("Timestamp;User_ID;TEST_ID;Variant;Conversion;Revenue;campaign\n"
                        "2025-04-28 18:42:22;u1;csv;A;1;10.5;spring\n"
                        "2025-04-28 18:43:22;u2;csv;B;0;0;spring\n")
    result = run("ingest", str(european), "--addr", server.address)
    assert result.returncode == 0 and result.stdout.startswith("accepted 2, rejected 0"), result.stdout
    assert "ignoring columns that are not event fields: 'campaign'" in result.stderr
    with Client(server.address) as client:
        rows = {r.variant: r.metrics for r in client.summary("csv").rows}
    assert rows["A"].conversions == 1 and rows["A"].total_revenue == 10.5 and rows["B"].users == 1

    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8": a byte-order mark, read as the first name's
    excel.write_bytes("\ufeffTimestamp,User_ID,Test_ID,Variant\r\n2025-04-28 18:42:22,u1,bom,A\r\n".encode())
    result = run("ingest", str(excel), "--addr", server.address)
    assert result.returncode == 0 and result.stdout.startswith("accepted 1, rejected 0"), result.stdout + result.stderr
    assert events_of(server.address, "bom") == 1

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "is empty; a CSV needs a header line" in one_line(run("ingest", str(empty), "--addr", server.address))
    header_only = tmp_path / "header.csv"
    header_only.write_text("timestamp,user_id,test_id,variant\n")
    assert run("ingest", str(header_only), "--addr", server.address).stdout.startswith("accepted 0, rejected 0")


def test_a_file_that_fails_after_others_were_stored_leaves_their_report_said(server, tmp_path):
    """Several files: when a later one cannot be read, the command ends (exit 2) but says first
    what the ones before it stored, which a rerun would otherwise send again unawares."""
    good = tmp_path / "good.ndjson"
    good.write_text(json.dumps(event(1, "partly", "A")) + "\n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is no parquet file PAR1")
    result = run("ingest", str(good), str(tmp_path / "broken.parquet"), "--addr", server.address)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("accepted 1, rejected 0"), result.stdout
    assert "broken.parquet" in result.stderr
    again = run("ingest", str(good), "--addr", server.address)
    assert again.returncode == 0 and "1 already stored" in again.stdout and "--allow-duplicates" in again.stdout


def test_gzipped_ndjson_and_csv_are_read_inflated_from_files_and_standard_input(server, tmp_path):
    """NDJSON and CSV as log shippers and gzip write them: by their first bytes, whatever their
    name, from files and standard input; one cut short says so (exit 2)."""
    import gzip

    lines = [json.dumps(event(i, "zipped", "AB"[i % 2])) for i in range(30)]
    (tmp_path / "e.ndjson.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    rows = ["timestamp,user_id,test_id,variant"] + [f"2025-04-28 18:42:22,c{i},zipped,A" for i in range(20)]
    (tmp_path / "e.csv.gz").write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    for name, accepted in (("e.ndjson.gz", 30), ("e.csv.gz", 20)):
        result = run("ingest", str(tmp_path / name), "--addr", server.address)
        assert result.returncode == 0 and result.stdout.startswith(f"accepted {accepted}, rejected 0"), result
    piped = subprocess.run([str(BIN / "abstream"), "ingest", "-", "--addr", server.address, "--allow-duplicates"],
                           input=gzip.compress(lines[0].encode() + b"\n"), capture_output=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.startswith(b"accepted 1, rejected 0"), piped
    assert events_of(server.address, "zipped") == 51
    (tmp_path / "cut.ndjson.gz").write_bytes((tmp_path / "e.ndjson.gz").read_bytes()[:60])
    assert "it ends inside its gzip data (cut short?)" in one_line(run("ingest", str(tmp_path / "cut.ndjson.gz"),
                                                                       "--addr", server.address))


def test_a_pipe_is_read_as_it_comes_gzipped_or_not(server, tmp_path):
    """`abstream ingest <(zcat events.gz)` gives a pipe's path: it is read once, as standard input
    is (it was refused as "no such file"); gzipped, it is inflated as it comes (opening it again
    by its name found it empty); Parquet or Arrow from a pipe is refused, saying why."""
    import gzip

    lines = [json.dumps(event(i, "piped", "AB"[i % 2])) for i in range(40)]
    for name, payload, accepted in (("plain", ("\n".join(lines) + "\n").encode(), 40),
                                    ("zipped", gzip.compress(("\n".join(lines[:25]) + "\n").encode()), 25)):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda f=fifo, p=payload: f.write_bytes(p), daemon=True)
        writer.start()
        # With progress shown, as on a terminal: a pipe's lines are not counted by reading it twice.
        result = run("ingest", str(fifo), "--addr", server.address, "--allow-duplicates",
                     env={"ABSTREAM_PROGRESS": "1"})
        writer.join(30)
        assert result.returncode == 0 and result.stdout.startswith(f"accepted {accepted}, rejected 0"), result
    assert events_of(server.address, "piped") == 65
    said = run("ingest", str(tmp_path / "plain"), "--input-format", "parquet", "--addr", server.address)
    assert said.returncode == 2 and "parquet is read from a file, not as it comes" in said.stderr, said
    writer = threading.Thread(target=lambda: fifo.write_bytes(lines[0].encode() + b"\n"), daemon=True)
    writer.start()
    told = run("ingest", str(fifo), "--addr", server.address)
    writer.join(30)
    assert told.returncode == 0 and "is read as it comes, and sent at least once; give --producer-id" in told.stderr


def test_a_file_cut_short_is_an_error_even_when_the_call_that_read_the_cut_was_refused_and_retried(tmp_path):
    """A token's ingest rate refuses the file's second batch while the reader, ahead of the
    acks, has already reached where the gzip data ends: the call is retried with what was not
    acked, and the cut must still be said (exit 2), not lost with the refused call (it printed
    "accepted" and exited 0)."""
    import gzip

    secured = ServerThread(Settings(addr="127.0.0.1:0", data_dir="",
                                    tokens_file=str(tokens_file(tmp_path / "tokens.toml", {"slow": 3_000})))).start()
    try:
        # Read through a buffer of 1 MiB: ~2.4 MB, so that batches are sent before the cut is read.
        rows = ["timestamp,user_id,test_id,variant,session_id"] + [
            f"2025-04-28 18:42:22,user_{i},cut_rate,{'AB'[i % 2]},session_{i:08d}" for i in range(40_000)]
        whole = gzip.compress(("\n".join(rows) + "\n").encode())
        (tmp_path / "cut.csv.gz").write_bytes(whole[:len(whole) * 3 // 4])
        result = run("ingest", str(tmp_path / "cut.csv.gz"), "--addr", secured.address, "--token",
                     TOKENS["slow"][0], "--batch-size", "500")
        assert "it ends inside its gzip data (cut short?)" in one_line(result)
        assert 10_000 <= events_of_token(secured.address, "cut_rate", TOKENS["slow"][0]) < 40_000
    finally:
        secured.stop()


def events_of_token(address: str, test_id: str, token: str) -> int:
    with Client(address, token=token) as client:
        return sum(r.metrics.events for r in client.summary(test_id).rows)


def test_json_output_is_json_when_a_total_is_not_finite_and_ndjson_exports_need_no_pandas(server, tmp_path):
    """Two revenues of 1e308 sum past the largest double: --format json and ndjson say null (as
    the HTTP API does), never Infinity, which JSON parsers refuse. An NDJSON export of times
    with nanoseconds is written without pandas (pyarrow gives such times to Python only
    through it, and it is not a dependency)."""
    path = write_ndjson(tmp_path / "huge.ndjson", [{**event(i, "huge", "A"), "revenue": 1e308} for i in range(2)]
                        + [event(9, "huge", "A", when="2025-04-28T18:42:22.123456789Z")])
    assert run("ingest", str(path), "--addr", server.address).returncode == 0

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))

    result = run("summary", "huge", "--addr", server.address, "--format", "json")
    assert result.returncode == 0, result.stderr
    (row,) = strict(result.stdout)["rows"]
    assert row["total_revenue"] is None and row["events"] == 3
    result = run("summary", "huge", "--addr", server.address, "--format", "ndjson")
    assert strict(result.stdout.splitlines()[0])["total_revenue"] is None
    blocked = tmp_path / "blocked"
    (blocked / "pandas").mkdir(parents=True)
    (blocked / "pandas" / "__init__.py").write_text('raise ImportError("pandas is not installed here")\n')
    result = run("export", "huge", "--addr", server.address, "--output", "-", "--format", "ndjson",
                 env={"PYTHONPATH": str(blocked)})
    assert result.returncode == 0, result.stderr
    times = sorted(strict(line)["timestamp"] for line in result.stdout.splitlines())
    assert times == ["2025-04-28T18:42:22.123456789Z", "2025-04-28T18:42:22Z", "2025-04-28T18:42:22Z"]


def test_input_slow_to_come_is_not_taken_for_a_stalled_server_and_a_token_gets_checked(server, tmp_path):
    """Standard input with a pause longer than --timeout before its last line (a producer piping
    events as they happen): nothing was waiting for an ack meanwhile, so it is stored, not
    failed as "the server acknowledged nothing". A token gRPC could not send is said in one
    line by ingest as by every command."""
    sending = subprocess.Popen([str(BIN / "abstream"), "ingest", "-", "--addr", server.address, "--producer-id",
                                "piped", "--timeout", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    sending.stdin.write(json.dumps(event(1, "piped", "A")) + "\n")
    sending.stdin.flush()
    time.sleep(4)
    sending.stdin.write(json.dumps(event(2, "piped", "B")) + "\n")
    out, err = sending.communicate(timeout=60)  # closes its input: the end of the file
    assert sending.returncode == 0 and out.startswith("accepted 2, rejected 0"), (out, err)
    assert events_of(server.address, "piped") == 2
    path = write_ndjson(tmp_path / "e.ndjson", [event(1, "t", "A")])
    for token in ("abc\n", "tökén"):
        line = one_line(run("ingest", str(path), "--addr", server.address, "--token", token))
        assert "--token (ABSTREAM_TOKEN) holds a line break, a control character or a character other" in line


def test_a_batch_larger_than_the_server_takes_is_not_retried_and_says_to_lower_the_batch_size(tmp_path):
    """Sending it again cannot pass: the command ends at once, naming the option (it was retried
    until --timeout, then the server's words alone were shown)."""
    running = ServerThread(Settings(addr="127.0.0.1:0", data_dir="", max_message_bytes=1 << 20)).start()
    try:
        noise = random.Random(1)  # session ids that do not compress: 20,000 of them are ~2.5 MB
        path = write_ndjson(tmp_path / "e.ndjson", [event(i, "big", "A", session_id=f"{noise.getrandbits(800):0200x}")
                                                    for i in range(20_000)])
        result = run("ingest", str(path), "--addr", running.address, "--batch-size", "20000", "--timeout", "30")
        assert result.returncode == 2, result
        line = result.stderr.strip().splitlines()[-1]
        assert "takes smaller requests than --batch-size 20,000 made" in line and "lower --batch-size" in line, line
        assert "larger than max" in line
        fits = run("ingest", str(path), "--addr", running.address, "--batch-size", "2000")
        assert fits.returncode == 0 and fits.stdout.startswith("accepted 20,000, rejected 0"), fits
    finally:
        running.stop()


def test_parquet_and_arrow_files_are_read_as_they_are(server, tmp_path):
    import pyarrow as pa
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    rows = [event(i, "columnar", "AB"[i % 2], conversion=i % 3 == 0, revenue=float(i)) for i in range(1000)]
    table = pa.Table.from_pylist([{**r, "timestamp": dt.datetime(2025, 4, 28, tzinfo=dt.timezone.utc),
                                   "conversion": int(r["conversion"]), "context": "x" * 3000} for r in rows])
    pq.write_table(table, tmp_path / "e.parquet")
    feather.write_feather(table, tmp_path / "e.arrow")
    streamed = table.set_column(table.schema.get_field_index("test_id"), "test_id", pa.array(["streamed"] * 1000))
    with pa.OSFile(str(tmp_path / "s.arrows"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(streamed)
    for name in ("e.parquet", "e.arrow"):
        # A column that is no event field is not sent (a wide one took requests past the server's limit).
        result = run("ingest", str(tmp_path / name), "--addr", server.address, "--allow-duplicates")
        assert result.returncode == 0 and result.stdout.startswith("accepted 1,000, rejected 0"), result
        assert "ignoring columns that are not event fields: 'context'" in result.stderr
    result = run("ingest", str(tmp_path / "s.arrows"), "--input-format", "arrow", "--addr", server.address)
    assert result.returncode == 0 and result.stdout.startswith("accepted 1,000, rejected 0"), result
    assert "ignoring columns that are not event fields: 'context'" in result.stderr
    with Client(server.address) as client:
        metrics = {r.variant: r.metrics for r in client.summary("columnar").rows}
    assert metrics["A"].events == 1000 and metrics["A"].conversions == 2 * sum(
        1 for i in range(0, 1000, 2) if i % 3 == 0)
    assert metrics["B"].total_revenue == 2 * sum(float(i) for i in range(1, 1000, 2))


# ---- ranges, output ---------------------------------------------------------------------------------

def test_an_end_includes_the_whole_day_hour_minute_or_second_it_names(server, tmp_path):
    stamps = ["2025-05-01 00:00:00", "2025-05-01T18:42:22.700Z", "2025-05-01T23:59:59.999999Z",
              "2025-05-02 00:00:00", "2025-04-30T23:59:59.999Z"]
    path = write_ndjson(tmp_path / "e.ndjson", [event(i, "ends", "A", when=s) for i, s in enumerate(stamps)])
    assert run("ingest", str(path), "--addr", server.address).returncode == 0

    def events(*args: str) -> int:
        result = run("summary", "ends", *args, "--addr", server.address, "--format", "json")
        assert result.returncode == 0, result.stderr
        return sum(r["events"] for r in json.loads(result.stdout)["rows"])

    assert events("--start", "2025-05-01", "--end", "2025-05-01") == 3
    assert events("--start", "2025-05-01", "--end", "2025-05-01 18:42:22") == 2  # 18:42:22.700 is inside
    assert events("--start", "2025-05-01", "--end", "2025-05-01 18:42:21") == 1
    # An end to the minute or the hour: that whole minute or hour (not its first second).
    assert events("--start", "2025-05-01", "--end", "2025-05-01 18:42") == 2
    assert events("--start", "2025-05-01", "--end", "2025-05-01T18") == 2
    assert events("--start", "2025-05-01", "--end", "2025-05-01 18:41") == 1
    assert events("--start", "2025-05-01", "--end", "2025-05-01t18:42Z") == 2  # RFC 3339 allows a lowercase t
    # An end with a fraction is that instant (it was widened to its whole second, the text read twice).
    assert events("--start", "2025-05-01", "--end", "2025-05-01T18:42:22.000Z") == 1
    assert events("--start", "2025-05-01", "--end", "2025-05-01T18:42:22.700Z") == 2
    assert events("--end", "2025-04-30") == 1
    assert events("--start", "20250501", "--end", "20250501") == 3  # every form of a date: its whole day
    assert events("--end", "2025-W18-4") == events("--end", "2025W184") == 4  # Thursday 2025-05-01
    assert events_of(server.address, "ends", start="2025-05-01", end="2025-05-01") == 3  # the client too
    assert events_of(server.address, "ends", start="20250501", end="20250501") == 3
    assert "a date means the end of that day" in " ".join(run("summary", "--help").stdout.split())


def test_output_says_what_is_empty_unknown_or_not_computable(server, tmp_path):
    events = [event(1, "thin", "control", conversion=1), event(2, "thin", "variant_a")]
    assert run("ingest", str(write_ndjson(tmp_path / "e.ndjson", events)), "--addr", server.address).returncode == 0
    table = run("summary", "thin", "--addr", server.address)
    assert table.returncode == 0
    analysis = table.stdout.split("compared with 'control'")[1]
    assert "the control has 1 user; at least 2 per arm are needed" in analysis  # a status, not zeros
    assert "0.0000 .. 0.0000" not in analysis and "+0.00%" not in analysis

    unknown = run("summary", "no_such_test", "--addr", server.address, "--format", "csv")
    assert unknown.returncode == 0 and unknown.stdout.splitlines() == [
        "variant,users,conversions,conversion_rate,total_revenue,revenue_per_user,events,converted_users,"
        "user_conversion_rate"]
    assert "there is no test 'no_such_test'" in unknown.stderr and "abstream tests" in unknown.stderr
    segments = run("segments", "thin", "country", "--addr", server.address, "--start", "2030-01-01", "--format", "csv")
    assert segments.stdout.splitlines()[0].startswith("variant,segment,users") and len(segments.stdout.splitlines()) == 1
    assert "no events of test 'thin' in that range" in segments.stderr, segments.stderr
    filtered = run("summary", "thin", "--device", "no_such_device", "--addr", server.address)
    assert filtered.returncode == 0 and "no events of test 'thin' with those filters" in filtered.stderr, filtered.stderr
    tests = run("tests", "--addr", server.address, "--format", "csv").stdout.splitlines()
    assert tests[0].split(",")[:2] == ["test_id", "variants"] and tests[1].startswith("thin,control;variant_a,")


def test_a_table_shows_control_characters_in_ids_as_escapes(server, tmp_path):
    """A newline in a test id does not split its row, and a terminal escape sequence in a variant
    (here: clear the screen) is shown, not acted on."""
    events = [event(1, "two\nlines", "a\x1b[2J"), event(2, "two\nlines", "b")]
    assert run("ingest", str(write_ndjson(tmp_path / "e.ndjson", events)), "--addr", server.address).returncode == 0
    tests = run("tests", "--addr", server.address)
    row = [line for line in tests.stdout.splitlines() if "two" in line]
    assert len(row) == 1 and row[0].startswith("two\\nlines  ") and "a\\x1b[2J, b" in row[0], tests.stdout
    assert "\x1b" not in tests.stdout
    summary = run("summary", "two\nlines", "--addr", server.address)
    assert "a\\x1b[2J" in summary.stdout and "\x1b" not in summary.stdout


def test_summary_and_segments_take_every_analysis_option_and_filters(server, tmp_path):
    events = ([event(i, "opts", "base", device="mobile" if i % 2 else "desktop", conversion=i % 4 == 0)
               for i in range(400)]
              + [event(1000 + i, "opts", "new", device="mobile" if i % 2 else "desktop", conversion=i % 3 == 0)
                 for i in range(400)])
    events = [{**e, "conversion": int(e["conversion"])} for e in events]
    assert run("ingest", str(write_ndjson(tmp_path / "e.ndjson", events)), "--addr", server.address).returncode == 0
    result = json.loads(run("summary", "opts", "--control", "base", "--confidence", "0.9", "--correction", "holm",
                            "--expected-weights", "base=1,new=3", "--prior", "0,0.01", "--device", "mobile",
                            "--addr", server.address, "--format", "json").stdout)
    assert sum(r["events"] for r in result["rows"]) == 400  # only mobile
    assert result["analysis"]["control_variant"] == "base" and result["analysis"]["sample_ratio_mismatch"]
    assert result["health"]["status"] == "unhealthy" and result["health"]["srm"] == "unhealthy"
    table = run("summary", "opts", "--expected-weights", "base=1,new=3", "--addr", server.address).stdout.splitlines()
    assert table[0] == "health: unhealthy" and table[1].startswith("  - sample ratio mismatch (p = ")
    both = [event(5000, "opts", "base"), event(5000, "opts", "new")]  # one user in both variants
    assert run("ingest", str(write_ndjson(tmp_path / "both.ndjson", both)), "--addr", server.address).returncode == 0
    kept = json.loads(run("summary", "opts", "--exclude-multi-variant-users", "--addr", server.address,
                          "--format", "json").stdout)
    assert kept["health"]["multi_variant_users"] == 1 and kept["health"]["multi_variant_users_excluded"]
    assert sum(r["users"] for r in kept["rows"]) == 800
    fieller = json.loads(run("summary", "opts", "--control", "base", "--relative-interval", "fieller",
                             "--addr", server.address, "--format", "json").stdout)
    with Client(server.address) as client:
        expected = client.summary("opts", control="base", relative_interval="fieller").analysis.comparisons
    assert [(c["relative"]["ci_low"], c["relative"]["ci_high"]) for c in fieller["analysis"]["comparisons"]] == [
        (c.relative.ci_low, c.relative.ci_high) for c in expected]
    guarded = run("summary", "opts", "--control", "base", "--guardrails", "conversion=50%", "--addr", server.address)
    with Client(server.address) as client:
        verdict = next(c.guardrail for c in client.summary("opts", control="base", guardrails={"conversion": 0.5})
                       .analysis.comparisons if c.metric == "conversion")
    shown = "non-inferior" if verdict.non_inferior else "NOT shown non-inferior"
    assert f"{shown} at -50.00% (bound {verdict.lower_bound:+.2%}, p {verdict.p_value:.4f})" in guarded.stdout
    of_type = json.loads(run("summary", "opts", "--metric-event-type", "purchase", "--addr", server.address,
                             "--format", "json").stdout)
    assert sum(r["users"] for r in of_type["rows"]) == 802 and sum(r["conversions"] for r in of_type["rows"]) == 0  # all clicks
    assert "guardrails are metric=margin" in run("summary", "opts", "--guardrails", "conversion", "--addr",
                                                 server.address).stderr
    spend = [event(i, "caps", "AB"[i % 2], revenue=float(i % 7) * 10) for i in range(300)]
    assert run("ingest", str(write_ndjson(tmp_path / "spend.ndjson", spend)), "--addr", server.address).returncode == 0
    capped = run("summary", "caps", "--cap-percentile", "50", "--addr", server.address)
    with Client(server.address) as client:
        cap = client.summary("caps", revenue_cap={"percentile": 50}).analysis.revenue_cap
    assert capped.stdout.rstrip().endswith(f"revenue_per_user compared capped at {cap.threshold:,.2f} (the 50th "
                                           f"percentile of {cap.pooled_users:,} users); {cap.capped_users:,} users "
                                           "were above it")
    assert cap.pooled_users == 300 and cap.threshold == 30.0 and cap.capped_users > 0
    sessions = json.loads(run("summary", "opts", "--session-metrics", "--addr", server.address, "--format",
                              "json").stdout)["analysis"]["comparisons"]
    with Client(server.address) as client:
        expected = client.summary("opts", session_metrics=True).analysis.comparisons
    assert [(c["metric"], c["relative"]["estimate"]) for c in sessions] == [
        (c.metric, c.relative.estimate) for c in expected] and "events_per_session" in {c["metric"] for c in sessions}
    as_json = json.loads(run("summary", "caps", "--cap-value", "1", "--addr", server.address, "--format", "json").stdout)
    assert as_json["analysis"]["revenue_cap"]["threshold"] == 1.0
    lifted = json.loads(run("lift", "opts", "--control", "base", "--interval", "hour", "--addr", server.address,
                            "--format", "json").stdout)["rows"]
    with Client(server.address) as client:
        over_time = client.timeseries("opts", "hour", cumulative=True, lift=True, control="base").lifts
    assert [(r["bucket"], r["variant"], r["metric"]) for r in lifted] == [
        (when.isoformat(), c.variant, c.metric) for when, a in over_time for c in a.comparisons] and lifted
    # Numbers as numbers for programs: the relative lift and its interval, or none and why.
    assert [(r["lift"], r["ci_low"], r["ci_high"], r["p_value"]) for r in lifted] == [
        (c.relative.estimate, c.relative.ci_low, c.relative.ci_high, c.relative.p_value) if c.relative.status == "ok"
        else (None, None, None, None) for _, a in over_time for c in a.comparisons]
    assert all(isinstance(r["lift"], float) or r["status"] != "ok" for r in lifted)
    aged = json.loads(run("lift", "opts", "--control", "base", "--interval", "hour", "--since-first-exposure",
                          "--addr", server.address, "--format", "json").stdout)["rows"]
    with Client(server.address) as client:
        by_age = client.timeseries("opts", "hour", lift=True, since_first_exposure=True, control="base").lifts
    assert [(r["age"], r["variant"], r["metric"]) for r in aged] == [
        (str(age), c.variant, c.metric) for age, a in by_age for c in a.comparisons] and aged
    # --comparisons: the analysis itself, a row per treatment and metric (and segment), numbers for programs.
    with Client(server.address) as client:
        whole = client.summary("opts", control="base").analysis.comparisons
        by_device = client.segments("opts", "device", control="base").analyses
    rows = list(csv.DictReader(io.StringIO(run("summary", "opts", "--control", "base", "--comparisons", "--format",
                                               "csv", "--addr", server.address).stdout)))
    assert [(r["variant"], r["metric"], float(r["lift"]) if r["lift"] else None) for r in rows] == [
        (c.variant, c.metric, c.relative.estimate if c.relative.status == "ok" else None) for c in whole]
    assert any(r["lift"] for r in rows) and all(r["status"] == "ok" for r in rows if r["lift"])
    lines = [json.loads(line) for line in run("segments", "opts", "device", "--control", "base", "--comparisons",
                                              "--format", "ndjson", "--addr", server.address).stdout.splitlines()]
    assert [(r["segment"], r["variant"], r["metric"], r["lift"], r["p_value"]) for r in lines] == [
        (segment, c.variant, c.metric, *((c.relative.estimate, c.relative.p_value) if c.relative.status == "ok"
                                          else (None, None)))
        for segment, a in by_device.items() for c in a.comparisons] and {r["segment"] for r in lines} >= {
        "mobile", "desktop"}
    as_json = json.loads(run("summary", "opts", "--control", "base", "--comparisons", "--format", "json", "--addr",
                             server.address).stdout)  # with what to read them by
    assert as_json["test_id"] == "opts" and as_json["control_variant"] == "base" and len(as_json["rows"]) == len(whole)
    assert as_json["health"]["status"] in ("healthy", "warning", "unhealthy") and "sample_ratio_mismatch" in as_json
    shown = run("summary", "opts", "--control", "base", "--comparisons", "--addr", server.address).stdout.splitlines()
    assert shown[0].startswith("health: ")  # for people, as the per-variant table has it
    head = next(i for i, line in enumerate(shown) if line.startswith("variant "))
    assert shown[head].split() == ["variant", "metric", "control", "treatment", "lift", "interval", "p_value",
                                   "chance_to_win"] and len(shown) == head + 2 + len(whole)
    refused = run("summary", "caps", "--cap-value", "5", "--cap-nonzero-only", "--addr", server.address)
    assert refused.returncode != 0 and "revenue_cap.nonzero_only" in refused.stderr
    with Client(server.address) as client:
        wide = client.summary("opts", control="base", confidence=0.99, device="mobile")
        narrow = client.summary("opts", control="base", confidence=0.9, device="mobile")
    w, n = wide.analysis.comparisons[0].absolute, narrow.analysis.comparisons[0].absolute
    assert w.ci_high - w.ci_low > n.ci_high - n.ci_low
    cli = next(c for c in result["analysis"]["comparisons"] if c["metric"] == "conversion")
    assert math.isclose(cli["absolute"]["ci_high"] - cli["absolute"]["ci_low"], n.ci_high - n.ci_low)
    segments = run("segments", "opts", "device", "--control", "base", "--addr", server.address)
    assert "device 'mobile': compared with 'base'" in segments.stdout
    assert "device 'desktop': compared with 'base'" in segments.stdout


def test_help_describes_every_option_and_each_command_has_its_own_examples():
    serve = run("serve", "--help").stdout
    options = serve.split("options:")[1]
    described = [line for line in options.splitlines() if line.strip().startswith("--")]
    assert len(described) > 20
    for i, line in enumerate(options.splitlines()):
        if line.strip().startswith("--"):
            follows = options.splitlines()[i + 1] if i + 1 < len(options.splitlines()) else ""
            assert len(line.split("  ", 2)) > 2 or follows.startswith(" " * 10), line  # a description follows
    flat = " ".join(serve.split())
    assert "--fsync {always,interval} always: every ack waits for an fsync" in flat
    assert "(env ABSTREAM_FSYNC, default 'always')" in flat and "examples:" in serve
    summary, ingest = run("summary", "--help").stdout, run("ingest", "--help").stdout
    assert "--control" in summary and "--correction" in summary and "--device" in summary
    assert "abstream summary checkout" in summary and "abstream ingest events.ndjson" not in summary
    assert "abstream ingest events.csv events.parquet" in ingest and "abstream summary" not in ingest
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("abstream ")


# ---- the Python client ------------------------------------------------------------------------------

def test_a_bad_event_resolves_to_a_rejected_delivery(server):
    with Producer(server.address, linger_ms=5) as producer:
        good = producer.send(event(1, "deliveries", "A"))
        bad_time = producer.send(event(2, "deliveries", "A", when="28/04/2025"))
        bad_type = producer.send({**event(3, "deliveries", "A"), "revenue": "lots"})
        assert producer.flush(timeout=30)
    assert good.result() == Delivery(True)
    assert bad_time.result().accepted is False and bad_time.result().field == "timestamp"
    assert "28/04/2025" in bad_time.result().message
    assert bad_type.result().accepted is False and bad_type.result().field == "revenue"
    assert events_of(server.address, "deliveries") == 1


def test_results_are_typed_and_pandas_is_optional(server, monkeypatch):
    from abstream.clients.client import Analysis, Snapshot

    with Producer(server.address) as producer:
        for i in range(20):
            producer.send(event(i, "typed", "AB"[i % 2], conversion=i % 3 == 0))
    with Client(server.address) as client:
        summary = client.summary("typed")
        assert isinstance(summary.analysis, Analysis) and summary.analysis.control_variant == "A"
        assert summary.analysis.comparisons[0].relative.status in ("ok", "not_enough_data")
        snapshot = client.snapshot()
        assert isinstance(snapshot, Snapshot) and snapshot.events == 20
        assert (Path(server.settings.data_dir) / snapshot.path).exists()
        assert isinstance(snapshot.elapsed, dt.timedelta)
        monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
        with pytest.raises(ImportError, match=r"abstream\[pandas\]"):
            summary.to_pandas()
        assert summary.to_arrow().num_rows == 2


def test_cli_and_client_over_tls_and_mutual_tls(tmp_path):
    pki = make_pki(tmp_path)
    tls = ServerThread(Settings(addr="127.0.0.1:0", data_dir="", tls_cert=str(pki["server_cert"]),
                                tls_key=str(pki["server_key"]), tls_client_ca=str(pki["ca"]))).start()
    try:
        addr = f"localhost:{tls.server.port}"
        path = write_ndjson(tmp_path / "e.ndjson", [event(1, "secure", "A")])
        auth = ("--ca", str(pki["ca"]), "--cert", str(pki["client_cert"]), "--key", str(pki["client_key"]))
        sent = run("ingest", str(path), "--addr", addr, *auth)
        assert sent.returncode == 0 and sent.stdout.startswith("accepted 1"), sent.stderr
        assert "secure" in run("tests", "--addr", addr, *auth).stdout
        no_cert = one_line(run("tests", "--addr", addr, "--ca", str(pki["ca"]), "--timeout", "5"))
        assert "closed the connection" in no_cert and "--cert and --key" in no_cert
        plaintext = one_line(run("tests", "--addr", addr, "--timeout", "5"))
        assert "closed the connection" in plaintext and "pass --tls or --ca" in plaintext
        started = time.monotonic()  # ingest says so at once too: no retrying for --timeout
        plaintext = one_line(run("ingest", str(path), "--addr", addr, "--timeout", "30"))
        assert "closed the connection" in plaintext and "pass --tls or --ca" in plaintext
        assert time.monotonic() - started < 20, "ingest retried a TLS mismatch until its --timeout"
        half = run("tests", "--addr", addr, "--ca", str(pki["ca"]), "--cert", str(pki["client_cert"]))
        assert "needs both a client certificate and its key" in one_line(half)
        untrusted = one_line(run("tests", "--addr", addr, "--tls", "--timeout", "5"))  # the system's roots only
        assert "(TLS: CERTIFICATE_VERIFY_FAILED)" in untrusted and "pass --ca with the one that signed it" in untrusted
        mismatched = run("tests", "--addr", addr, "--timeout", "5", *auth[:4], "--key", str(pki["server_key"]))
        assert mismatched.returncode == 2 and "Traceback" not in mismatched.stderr
        assert "the client certificate and key given do not go together" in mismatched.stderr, mismatched.stderr
        plain = ServerThread(Settings(addr="127.0.0.1:0", data_dir="")).start()
        try:
            not_tls = one_line(run("tests", "--addr", plain.address, "--tls", "--timeout", "5"))
            assert "(TLS: WRONG_VERSION_NUMBER)" in not_tls and "it does not seem to serve TLS: drop --tls" in not_tls
        finally:
            plain.stop()
        with Client(addr, tls=pki["ca"].read_bytes(), cert=pki["client_cert"].read_bytes(),
                    key=pki["client_key"].read_bytes()) as client:
            assert [t.test_id for t in client.list_tests().rows] == ["secure"]
        with Client(addr, tls=pki["ca"].read_bytes(), timeout=5) as client, pytest.raises(grpc.RpcError):
            client.list_tests()  # no client certificate
    finally:
        tls.stop()


# ---- experiments --------------------------------------------------------------------------------------

@pytest.fixture(params=["embedded", "clickhouse"])
def engine(request, tmp_path):
    """Settings for a server on each engine; the test starts (and restarts) it."""
    return engine_settings(request.param, tmp_path, request)


def test_experiments_carry_their_plan_into_every_query(engine, tmp_path):
    server = ServerThread(engine).start()
    try:
        before = [event(i, "plan", "a_new", when="2025-04-27 12:00:00") for i in range(50)]
        # 700 users in the control, 300 in the treatment: a 70/30 plan, not an equal split
        during = ([event(i, "plan", "z_base", conversion=int(i % 5 == 0)) for i in range(700)]
                  + [event(1000 + i, "plan", "a_new", conversion=int(i % 4 == 0)) for i in range(300)])
        path = write_ndjson(tmp_path / "e.ndjson", before + during)
        assert run("ingest", str(path), "--addr", server.address).returncode == 0
        with Client(server.address) as client:
            unplanned = client.summary("plan")
        assert unplanned.analysis.control_variant == "a_new" and unplanned.analysis.sample_ratio_mismatch

        created = run("experiment", "create", "plan", "--control", "z_base", "--split", "z_base=70,a_new=30",
                      "--start", "2025-04-28", "--hypothesis", "the new page converts more", "--addr", server.address,
                      "--format", "json")
        assert created.returncode == 0, created.stderr
        plan = json.loads(created.stdout)["rows"][0]
        assert plan["control_variant"] == "z_base" and plan["split"] == {"z_base": 70.0, "a_new": 30.0}
        assert plan["start_time"].startswith("2025-04-28T00:00:00") and plan["stop_time"] is None
        again = run("experiment", "create", "plan", "--addr", server.address)
        assert "FAILED_PRECONDITION" in one_line(again) and "experiment update" in again.stderr
        assert "NOT_FOUND" in one_line(run("experiment", "update", "nothing", "--control", "x", "--addr",
                                           server.address))
        assert "INVALID_ARGUMENT" in one_line(run("experiment", "create", "other", "--control", "c", "--split",
                                                  "a=1,b=1", "--addr", server.address))

        with Client(server.address) as client:
            planned = client.summary("plan")
            assert planned.analysis.control_variant == "z_base"  # the plan's control
            assert not planned.analysis.sample_ratio_mismatch  # the plan's split
            assert sum(r.metrics.events for r in planned.rows) == 1000  # from the plan's start
            earlier = client.summary("plan", start="2025-04-01")
            assert earlier.rows[0].metrics.events == 350  # asked: as asked
            assert earlier.health.events_before_start == 0  # the 50 before the plan's start are analysed
            assert planned.health.events_before_start == 50
            assert client.summary("plan", control="a_new").analysis.control_variant == "a_new"
            assert sum(r.metrics.events for r in client.timeseries("plan", "day").rows) == 1000
            (info,) = [t for t in client.list_tests().rows if t.test_id == "plan"]
            assert info.experiment.control_variant == "z_base" and info.experiment.hypothesis.startswith("the new")
            # A range where the plan's control has no users: nothing compared, and said (it was an
            # INVALID_ARGUMENT naming control_variant, which the caller never set).
            for only_treated in (client.summary("plan", start="2025-04-27", end="2025-04-27").analysis,
                                 *client.segments("plan", "device", start="2025-04-27", end="2025-04-27").analyses.values()):
                assert only_treated.control_variant == "z_base" and only_treated.comparisons
                assert {c.status for c in only_treated.comparisons} == {"no_control"}

            # A variant the plan has no share for: said in health, left out of the sample ratio
            # check (it was an INVALID_ARGUMENT naming expected_weights, which the caller never set).
            stray = [event(i, "strays", "A", conversion=i % 2) for i in range(100)] + \
                [event(100 + i, "strays", "B") for i in range(100)] + [event(200 + i, "strays", "C") for i in range(3)]
            assert run("ingest", str(write_ndjson(tmp_path / "s.ndjson", stray)), "--addr",
                       server.address).returncode == 0
            client.create_experiment("strays", control="A", split={"A": 1, "B": 1})
            health = client.summary("strays").health
            assert health.status == "unhealthy" and health.srm == "healthy", health
            assert "3 users are in 'C', which the experiment's plan does not have" in health.reasons[0]
            with pytest.raises(grpc.RpcError) as asked:  # weights the caller gives must name every variant
                client.summary("strays", expected_weights={"A": 1, "B": 1})
            assert asked.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected_weights" in asked.value.details()

        listed = run("tests", "--addr", server.address).stdout
        assert "control=z_base split=a_new=30,z_base=70 running" in listed
        updated = json.loads(run("experiment", "update", "plan", "--hypothesis", "it converts 10% more",
                                 "--addr", server.address, "--format", "json").stdout)["rows"][0]
        assert updated["control_variant"] == "z_base" and updated["hypothesis"] == "it converts 10% more"
        epoch = run("experiment", "stop", "plan", "--at", "1970-01-01T00:00:00Z", "--addr", server.address)
        assert epoch.returncode == 2 and "stop_time: is before the experiment's start_time" in epoch.stderr, epoch.stderr
        stopped = json.loads(run("experiment", "stop", "plan", "--at", "2025-04-28 18:42:21", "--addr",
                                 server.address, "--format", "json").stdout)["rows"][0]
        assert stopped["stop_time"].startswith("2025-04-28T18:42:21")
        assert events_of(server.address, "plan") == 0  # every event is after the stop
        assert events_of(server.address, "plan", end="2025-04-29") == 1000  # unless asked
    finally:
        server.stop()
    restarted = ServerThread(engine).start()  # durable: the same data (directory or cluster database)
    try:
        with Client(restarted.address) as client:
            (plan,) = [p for p in client.list_experiments() if p.test_id == "plan"]
        assert plan.control_variant == "z_base" and plan.hypothesis == "it converts 10% more"
        assert plan.stop_time == dt.datetime(2025, 4, 28, 18, 42, 21, tzinfo=dt.timezone.utc)
        assert plan.split == {"z_base": 70.0, "a_new": 30.0}
    finally:
        restarted.stop()


def test_experiments_survive_a_crash_of_the_server_process(tmp_path):
    server = Server(tmp_path / "data").start()
    assert run("experiment", "create", "crash", "--control", "c", "--addr", server.address).returncode == 0
    server.kill()
    server.start()
    listed = run("experiment", "list", "--addr", server.address, "--format", "json")
    assert [p["control_variant"] for p in json.loads(listed.stdout)["rows"]] == ["c"]


def test_the_servers_threads_carry_their_names_where_the_system_shows_them(tmp_path):
    """top -H, perf and /proc name each thread of the server by what it does, not "python"."""
    server = Server(tmp_path / "data").start()
    path = write_ndjson(tmp_path / "e.ndjson", [event(i, "named", "AB"[i % 2]) for i in range(1000)])
    assert run("ingest", str(path), "--addr", server.address).returncode == 0
    assert events_of(server.address, "named") == 1000
    tasks = Path(f"/proc/{server.process.pid}/task")
    names = {(task / "comm").read_text().strip() for task in tasks.iterdir()}
    assert {"abstream-store", "abstream-seal", "abstream-work", "abstream-query"} <= names, names  # a pool starts its thread when used


# ---- time zones and sample sizes ------------------------------------------------------------------------

MADRID = ZoneInfo("Europe/Madrid")


def test_day_and_week_buckets_in_a_time_zone_across_daylight_saving(engine, tmp_path):
    server = ServerThread(engine).start()
    try:
        start = dt.datetime(2025, 3, 27, tzinfo=dt.timezone.utc)
        spring = [start + dt.timedelta(minutes=20 * k) for k in range(6 * 72)]  # Mar 27 .. Apr 2
        autumn_start = dt.datetime(2025, 10, 23, tzinfo=dt.timezone.utc)
        autumn = [autumn_start + dt.timedelta(minutes=20 * k) for k in range(6 * 72)]
        stamps = spring + autumn
        events = [event(i, "tz", "AB"[i % 2], when=t.isoformat()) for i, t in enumerate(stamps)]
        assert run("ingest", str(write_ndjson(tmp_path / "e.ndjson", events)), "--addr", server.address,
                   "--timeout", "60").returncode == 0

        with Client(server.address) as client:
            series = client.timeseries("tz", "day", time_zone="Europe/Madrid")
            weeks = client.timeseries("tz", "week", time_zone="Europe/Madrid")
            utc = client.timeseries("tz", "day")
        # Independently: each event's own local date, by converting it (not by offsets or boundaries).
        def local_midnight(day: dt.date) -> dt.datetime:
            return dt.datetime(day.year, day.month, day.day, tzinfo=MADRID).astimezone(dt.timezone.utc)

        def expected(week: bool) -> collections.Counter:
            days = (t.astimezone(MADRID).date() for t in stamps)
            return collections.Counter(local_midnight(d - dt.timedelta(days=d.weekday() if week else 0)) for d in days)

        def got(result) -> collections.Counter:
            counts: collections.Counter = collections.Counter()
            for row in result.rows:
                counts[row.bucket_start] += row.metrics.events
            return counts

        days = got(series)
        assert days == expected(week=False) and got(weeks) == expected(week=True)
        starts = sorted(days)
        lengths = {a.astimezone(MADRID).date(): (b - a) for a, b in zip(starts, starts[1:]) if (b - a).days < 2}
        assert lengths[dt.date(2025, 3, 30)] == dt.timedelta(hours=23)
        assert lengths[dt.date(2025, 10, 26)] == dt.timedelta(hours=25)
        assert days[dt.datetime(2025, 3, 29, 23, tzinfo=dt.timezone.utc)] == 23 * 3
        assert days[dt.datetime(2025, 10, 25, 22, tzinfo=dt.timezone.utc)] == 25 * 3
        assert all(b.hour == 0 for b in {r.bucket_start for r in utc.rows})  # without a zone: UTC midnights

        cli = run("timeseries", "tz", "--interval", "day", "--time-zone", "Europe/Madrid", "--addr", server.address,
                  "--format", "ndjson")
        assert cli.returncode == 0 and '"bucket_start": "2025-03-29T23:00:00+00:00"' in cli.stdout
        assert "is not an IANA time zone name" in one_line(run("timeseries", "tz", "--time-zone", "Mars/Olympus",
                                                               "--addr", server.address))
        assert "minute and hour buckets are UTC" in one_line(run("timeseries", "tz", "--interval", "hour",
                                                                 "--time-zone", "Europe/Madrid", "--addr",
                                                                 server.address))
    finally:
        server.stop()


def test_sample_size_from_the_tests_own_baseline(server, tmp_path):
    from scipy.stats import norm

    # control: 1000 users, 200 converted, revenue 0 or 50; four days of arrivals
    control = [event(i, "power", "control", when=f"2025-04-{28 + i % 3} 10:00:00" if i else "2025-05-02 10:00:00",
                     conversion=int(i % 5 == 0), revenue=50.0 if i % 5 == 0 else 0.0) for i in range(1000)]
    treatment = [event(5000 + i, "power", "treatment") for i in range(10)]
    assert run("ingest", str(write_ndjson(tmp_path / "e.ndjson", control + treatment)), "--addr",
               server.address).returncode == 0
    z = norm.ppf(1 - 0.05 / 2) + norm.ppf(0.8)
    p = 0.2
    expected_conversion = math.ceil(2 * p * (1 - p) * z * z / (0.1 * p) ** 2)
    revenue = [50.0 if i % 5 == 0 else 0.0 for i in range(1000)]
    mean = sum(revenue) / 1000
    variance = sum((r - mean) ** 2 for r in revenue) / 999
    expected_revenue = math.ceil(2 * variance * z * z / (0.1 * mean) ** 2)
    with Client(server.address) as client:
        result = client.power("power", 0.1)
    by_metric = {m.metric: m for m in result.rows}
    assert result.control_variant == "control"
    assert by_metric["conversion"].users_per_variant == expected_conversion
    assert math.isclose(by_metric["conversion"].baseline_mean, 0.2)
    assert by_metric["revenue_per_user"].users_per_variant == expected_revenue
    users_per_day = 1000 / 4  # first event Apr 28 10:00, last May 2 10:00
    assert math.isclose(by_metric["conversion"].days, expected_conversion / users_per_day, rel_tol=1e-9)
    cli = run("power", "power", "--mde", "0.1", "--addr", server.address)
    assert cli.returncode == 0 and f"{expected_conversion:,}" in cli.stdout and "+10.0% relative lift" in cli.stdout
    assert "INVALID_ARGUMENT" in one_line(run("power", "power", "--mde", "0", "--addr", server.address))
    # the lift the control's 1,000 users (or 5,000) detect, and their power for +10%, as the formula gives
    conversion = by_metric["conversion"]
    assert conversion.at_users_per_variant == 1000
    assert math.isclose(conversion.detectable_effect, math.sqrt(2 * p * (1 - p) / 1000) * z / p, rel_tol=1e-12)
    assert math.isclose(conversion.power, norm.cdf(0.1 * p / math.sqrt(2 * p * (1 - p) / 1000) - norm.ppf(0.975)),
                        rel_tol=1e-9)
    with Client(server.address) as client:
        at = {m.metric: m for m in client.power("power", 0.1, users_per_variant=5000).rows}
        # round trip: the lift 5,000 users detect at 80%, asked back, has power 0.8 and needs 5,000 users
        back = {m.metric: m for m in client.power("power", at["conversion"].detectable_effect,
                                                  users_per_variant=5000).rows}
    assert at["conversion"].at_users_per_variant == 5000
    assert math.isclose(back["conversion"].power, 0.8, rel_tol=1e-12)
    assert back["conversion"].users_per_variant in (5000, 5001)
    json_rows = json.loads(run("power", "power", "--mde", "0.1", "--users", "5000", "--addr", server.address,
                               "--format", "json").stdout)["rows"]
    assert {r["metric"]: r["power"] for r in json_rows} == {m: at[m].power for m in at}
    empty = json.loads(run("power", "nothing", "--mde", "0.1", "--addr", server.address, "--format", "json").stdout)
    assert all(r["users_per_variant"] == 0 and "no events" in r["status_message"] for r in empty["rows"])
    # planned to start Apr 29: the users and the days they took are both counted from then
    with Client(server.address) as client:
        client.create_experiment("power", control="control", start="2025-04-29 00:00:00")
        planned = {m.metric: m for m in client.power("power", 0.1).rows}["conversion"]
    since = [e for e in control if e["timestamp"] >= "2025-04-29"]
    p = sum(e["conversion"] for e in since) / len(since)
    n = math.ceil(2 * p * (1 - p) * z * z / (0.1 * p) ** 2)
    days = 3 + 10 / 24  # Apr 29 00:00 to May 2 10:00
    assert planned.at_users_per_variant == len(since) and planned.users_per_variant == n
    assert math.isclose(planned.days, n / (len(since) / days), rel_tol=1e-9)


def test_the_documented_trial_certificates_work(tmp_path):
    """docs/operations.md's OpenSSL commands, run as written, make a CA, a server and a client
    certificate that the server and the command accept."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    block = text.split("For a trial, a CA of your own")[1].split("```sh\n")[1].split("```")[0]
    for command in (line for line in block.splitlines() if line.startswith("openssl ")):
        made = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, (command, made.stderr)
    server = ServerThread(Settings(addr="127.0.0.1:0", data_dir="", tls_cert=str(tmp_path / "server.pem"),
                                   tls_key=str(tmp_path / "server.key"),
                                   tls_client_ca=str(tmp_path / "ca.pem"))).start()
    try:
        listed = run("tests", "--addr", f"localhost:{server.server.port}", "--ca", str(tmp_path / "ca.pem"),
                     "--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key"))
        assert listed.returncode == 0 and listed.stdout.strip() == "(no rows)", listed.stderr
    finally:
        server.stop()
